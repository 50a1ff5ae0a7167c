"""Run FedAvg and InvariantAggregation on the same seeds (Flower simulations); print a table.

Example (linear task, seconds on a CPU)::

    python -m simulation.compare --task linear --rounds 20 --seeds 0 1
    python -m simulation.compare --task fmnist --rounds 15 \
        --set num-partitions=30 clients-per-round=10 train-size=9000 data-root=/data

``--set key=value`` takes any run-config key of :mod:`simulation.config`. A progress bar
per run, then the table; ``--verbose`` also prints Flower's log of each run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["compare", "format_table", "parse_sets", "run_one"]


def run_one(
    config: Mapping[str, Any],
    num_cpus_per_client: int = 1,
    num_gpus_per_client: float = 0.25,
    verbose: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """One simulation (``num-partitions`` SuperNodes); returns the ServerApp's per-round record.

    ``num_gpus_per_client`` applies only when a CUDA GPU is visible (else the CPU is used).
    ``verbose``: print Flower's log too.
    """
    from .launcher import Resources, run, visible_gpus

    resources = Resources(num_cpus_per_client, num_gpus_per_client if visible_gpus() else 0.0)
    label = f"{config.get('defense', '')} seed {config.get('seed', 0)}"
    return run(config, resources, progress=progress, label=label, verbose=verbose)


def compare(
    base: Mapping[str, Any],
    defenses: Sequence[str] = ("fedavg", "invariant"),
    seeds: Sequence[int] = (0,),
    verbose: bool = False,
) -> list[dict[str, Any]]:
    """Every defense on every seed with otherwise equal config; one summary row per run.

    With ``pretrain-rounds`` and no ``pretrain-cache``, a temporary cache lets the
    defenses of a seed start from one pretrained model.
    """
    with tempfile.TemporaryDirectory(prefix="flwr-invariant-pretrain-") as scratch:
        if base.get("pretrain-rounds") and not base.get("pretrain-cache"):
            base = {**base, "pretrain-cache": scratch}
        return [
            _summary(run_one({**base, "defense": d, "seed": s}, verbose=verbose), d, s)
            for s in seeds
            for d in defenses
        ]


def _summary(record: dict[str, Any], defense: str, seed: int) -> dict[str, Any]:
    last = record["rounds"][-1]
    return {
        "defense": defense,
        "seed": seed,
        "rounds": last["round"],
        "acc_main": last["acc_main"],
        "acc_backdoor": last["acc_backdoor"],
        "max_acc_backdoor": max(r["acc_backdoor"] for r in record["rounds"][1:]),
        "loss": last["loss"],
        "attacker_rounds": sum(r["attackers_sampled"] > 0 for r in record["rounds"]),
        "record": record,
    }


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of :func:`compare`'s rows (final round, plus the peak backdoor accuracy)."""
    lines = [
        "| defense | seed | rounds | acc_main | acc_backdoor | max acc_backdoor | loss "
        "| rounds with attackers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['defense']} | {r['seed']} | {r['rounds']} | {r['acc_main']:.3f} "
            f"| {r['acc_backdoor']:.3f} | "
            f"{r['max_acc_backdoor']:.3f} | {r['loss']:.3f} | {r['attacker_rounds']} |"
        )
    return "\n".join(lines)


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` items (from ``--set``) as a dict; ``ValueError`` for an item without ``=``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        out[key] = value
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point (see the module docstring)."""
    from .superlink import exit_on_sigterm

    exit_on_sigterm()
    parser = argparse.ArgumentParser(description="FedAvg vs InvariantAggregation under a backdoor attack")
    parser.add_argument("--task", default="linear")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--defenses", nargs="+", default=["fedavg", "invariant"])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="other run-config keys")
    parser.add_argument("--json", default="", help="write all per-round records to this file")
    parser.add_argument("--verbose", action="store_true", help="print Flower's log of each run too")
    args = parser.parse_args(argv)
    base = {"task": args.task, "num-server-rounds": args.rounds, **parse_sets(args.set)}
    rows = compare(base, args.defenses, args.seeds, verbose=args.verbose)
    if args.json:
        Path(args.json).write_text(json.dumps([r["record"] for r in rows], indent=1, default=float))
    print(format_table(rows))


if __name__ == "__main__":
    main()
