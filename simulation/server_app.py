"""Flower ``ServerApp`` (Message API) for the backdoor experiments.

Reads the run config (:mod:`simulation.config`), builds the defense from
:data:`baselines.DEFENSES` with seeded client sampling (:mod:`simulation.sampling`),
runs ``strategy.start(...)`` with the server-side ``evaluate_fn`` and records
per-round metrics (``acc_main``, ``acc_backdoor``, ``loss``, number of attackers
sampled, and the defense's train metrics).

Before round 1 the app sends one ``query`` message to every node to learn its
``partition-id``; the sampler then works on partitions, not on node ids.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from baselines.flain import FLAIN
from baselines.flain_repair import FlainRepair

from .config import resolve_config
from .pretrain import pretrain
from .sampling import RoundSampler, make_strategy

__all__ = ["app", "discover_partitions", "make_server_app", "run_experiment"]


def discover_partitions(grid: Grid, num_partitions: int, timeout: float = 120.0) -> dict[int, int]:
    """Ask every node for its ``partition-id``; returns partition id -> node id.

    Waits until ``num_partitions`` nodes are connected; raises ``RuntimeError``
    when they do not connect or do not all answer with distinct ids in
    ``[0, num_partitions)``.
    """
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < num_partitions:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of num-partitions={num_partitions} nodes connected")
        time.sleep(0.5)
    messages = [
        Message(
            content=RecordDict({"config": ConfigRecord()}), message_type=MessageType.QUERY, dst_node_id=node
        )
        for node in nodes
    ]
    node_of: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} failed the partition query: {reply.error}")
        pid = int(reply.content["metrics"]["partition-id"])
        node_of[pid] = reply.metadata.src_node_id
    if sorted(node_of) != list(range(num_partitions)):
        raise RuntimeError(f"nodes reported partitions {sorted(node_of)}, expected 0..{num_partitions - 1}")
    return node_of


def flain_repair(task: Any, config: Mapping[str, Any]) -> FlainRepair:
    """FLAIN's repair with ``flain-aux-size`` clean training examples held by the server.

    The auxiliary examples are a seeded sample of the training pool (clients may
    hold the same images, as a server's clean data would come from the same
    distribution); never the test set that ``acc_main`` is measured on.
    """
    from .training import model_for

    rng = np.random.default_rng([config["seed"], 0xF1A1])
    count = min(config["flain-aux-size"], len(task.train_y))
    chosen = torch.from_numpy(np.sort(rng.choice(len(task.train_y), count, replace=False)))
    x, y = task.train_x[chosen], task.train_y[chosen]
    batch = config["eval-batch-size"]
    batches = [(task.preprocess(x[i : i + batch]), y[i : i + batch]) for i in range(0, count, batch)]
    return FlainRepair(model_fn=lambda: model_for(task, config), aux_loader=batches)


def run_experiment(
    grid: Grid, config: Mapping[str, Any], on_round: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run one experiment on ``grid``; returns ``{"config": ..., "rounds": [per-round metrics]}``.

    With ``pretrain-rounds`` > 0 the rounds start from a benignly pretrained model
    (:mod:`simulation.pretrain`; round 0's row evaluates it) and the record gets a
    ``"pretrain"`` summary.

    Each round's row has ``round``, the server-side metrics (``acc_backdoor``;
    ``acc_main`` and ``loss`` on the rounds ``eval-every`` evaluates), ``seconds``
    (wall time since the previous evaluation), ``attackers_sampled`` and the strategy's
    metrics as ``train_*``.
    ``on_round`` gets each evaluation row (without ``train_*``) as it happens.
    """
    from .data import load_task
    from .training import make_evaluate_fn, model_for

    task = load_task(config)
    initial = ArrayRecord(model_for(task, config, pretrained_weights=True).state_dict())
    node_of = discover_partitions(grid, config["num-partitions"], config["round-timeout"])
    pretrained = None
    if config["pretrain-rounds"]:
        initial, pretrained = pretrain(grid, config, node_of, initial)
    sampler = RoundSampler(node_of, config)
    strategy = make_strategy(config, sampler)
    if isinstance(strategy, FLAIN):
        strategy.repair = flain_repair(task, config)
    evaluate = make_evaluate_fn(config)
    seconds: dict[int, float] = {}
    clock = [time.monotonic()]

    def timed_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        metrics = evaluate(server_round, arrays)
        now = time.monotonic()
        seconds[server_round] = now - clock[0]
        clock[0] = now
        if on_round is not None:
            on_round({"round": server_round, **dict(metrics), "seconds": seconds[server_round]})
        return metrics

    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=config["num-server-rounds"],
        timeout=config["round-timeout"],
        train_config=ConfigRecord({}),
        evaluate_fn=timed_evaluate,
    )
    rounds = []
    for server_round, metrics in sorted(result.evaluate_metrics_serverapp.items()):
        row: dict[str, Any] = {"round": server_round, **dict(metrics)}
        row["seconds"] = seconds.get(server_round, 0.0)
        row["attackers_sampled"] = sampler.num_attackers(server_round)
        train_metrics = result.train_metrics_clientapp.get(server_round)
        if train_metrics is not None:
            row.update({f"train_{k}": v for k, v in dict(train_metrics).items()})
        rounds.append(row)
    record: dict[str, Any] = {"config": dict(config), "rounds": rounds}
    if pretrained is not None:
        start = rounds[0]  # round 0 evaluates the pretrained model the strategy started from
        record["pretrain"] = {**pretrained, **{k: start[k] for k in ("acc_main", "acc_backdoor", "loss")}}
    return record


def make_server_app(
    overrides: Mapping[str, Any] | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> ServerApp:
    """A ``ServerApp`` whose run config is ``DEFAULTS | context.run_config | overrides``.

    ``on_result`` receives the per-round record when the run ends (run config
    ``results-file``, if set, gets it as JSON); ``on_round`` each evaluation row.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        config = resolve_config(context.run_config, overrides)
        log(INFO, "simulation config: %s", {k: config[k] for k in ("task", "defense", "attack", "backdoor")})
        record = run_experiment(grid, config, on_round)
        for row in record["rounds"]:
            shown = " ".join(f"{k} {row[k]:.4f}" for k in ("acc_main", "acc_backdoor", "loss") if k in row)
            log(INFO, "round %s: %s", row["round"], shown)
        if config["results-file"]:
            path = Path(config["results-file"])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=1, default=float))
            log(INFO, "wrote per-round metrics to %s", path)
        if on_result is not None:
            on_result(record)
        elif not config["results-file"]:
            log(WARNING, "no 'results-file' set: per-round metrics are only in the log")

    return server_app


app = make_server_app()
