"""Measure the sent140 task's pieces on this machine and estimate what one run of a grid file costs.

Loads the task as the grid file's ``[base]`` table configures it, from ``--data-root``
(a data root holding a file in the Sentiment140 format, e.g. a synthetic one written by
``benchmarks.sent140_synthetic``), then times in this process, on one torch thread:

- loading (read, split, tokenise; every Ray actor pays it once per run),
- one benign client's round and one attacker's (``local_update`` from the initial model),
- one ``InvariantAggregation`` update of ``clients-per-round`` client models (numpy engine),
- one server evaluation (clean test set and backdoor set).

Times are CPU seconds (``time.process_time``: what the work costs without other
processes competing for the cores) and wall seconds. The estimate of one run is
``rounds * (clients-per-round * client / parallel + aggregation + evaluation share)``
with ``--parallel`` clients training at once; it leaves out Ray's messaging of the
models, which an end-to-end run (``python -m simulation grid``) includes.

    python -m benchmarks.sent140_cost configs/paper_twitter.toml --data-root /tmp/s140 --parallel 2
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from flwr_invariant.engines import select_engine
from simulation.config import resolve_config
from simulation.data import load_partitions, load_task
from simulation.grid import load_grid
from simulation.partition import attacker_partitions
from simulation.training import local_update, make_evaluate_fn, model_for

__all__ = ["measure"]


def _timed(work: Callable[[], Any]) -> tuple[Any, float, float]:
    """``(result, cpu seconds, wall seconds)`` of ``work()``."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = work()
    return result, time.process_time() - cpu, time.perf_counter() - wall


def measure(config: dict[str, Any]) -> tuple[dict[str, tuple[float, float]], int]:
    """CPU and wall seconds of each piece (see the module docstring) for a resolved ``config``,
    and the model's number of parameters."""
    times: dict[str, tuple[float, float]] = {}
    task, *times["load"] = _timed(lambda: load_task(config))
    parts = load_partitions(config)
    model = model_for(task, config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pool = config["num-partitions"], config["malicious-fraction"], config["seed"]
    attacker = attacker_partitions(*pool, "pool")
    benign = next(p for p in range(len(parts)) if p not in attacker)
    for name, partition in (("benign client", benign), ("attacker", attacker[0] if attacker else benign)):
        result, *times[name] = _timed(lambda p=partition: local_update(config, p, 1, state))
    clients = [[v.numpy() for v in result.state_dict.values()]] * config["clients-per-round"]
    noisy = [[w + np.float32(1e-3) * np.random.default_rng(i).standard_normal(w.shape, dtype=np.float32)
              for w in weights] for i, weights in enumerate(clients)]  # fmt: skip
    engine = select_engine("numpy")
    global_weights = [v.numpy() for v in state.values()]
    _, *times["aggregation"] = _timed(
        lambda: engine(global_weights, noisy, tau=config["tau"], trim_ratio=config["trim-ratio"])
    )
    evaluate = make_evaluate_fn(config)
    _, *times["evaluation"] = _timed(lambda: evaluate(0, ArrayRecord(state)))
    return times, sum(v.numel() for v in state.values())


def main() -> None:
    """CLI: print the measured pieces and the estimate for one run of the grid file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", help="grid file whose [base] sets the task (e.g. configs/paper_twitter.toml)")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--parallel", type=int, default=2, help="clients training at once")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = resolve_config(load_grid(args.grid).base, {"data-root": args.data_root})
    times, parameters = measure(config)
    print(f"model: {parameters / 1e6:.2f} M parameters")
    for name, (cpu, wall) in times.items():
        print(f"{name:24s} {cpu:10.2f} CPU s {wall:10.2f} wall s")
    rounds, per_round = config["num-server-rounds"], config["clients-per-round"]
    evaluation = times["evaluation"][0] / config["eval-every"]
    round_cpu = per_round * times["benign client"][0] / args.parallel + times["aggregation"][0] + evaluation
    total = rounds * round_cpu + times["load"][0]
    print(f"estimate: {round_cpu:.1f} s per round with {args.parallel} clients at once, "
          f"{total / 3600:.1f} h for {rounds} rounds (CPU seconds, no Ray messaging)")  # fmt: skip


if __name__ == "__main__":
    main()
