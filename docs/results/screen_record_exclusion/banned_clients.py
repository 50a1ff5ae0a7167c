"""Who a record-departure-exclusion run excluded for good: attackers and honest clients, from its checkpoint.

Reads the run's last round checkpoint (its ``flag_record``, saved per partition) and the run's
malicious pool (``simulation.partition.malicious_pool``), and prints, for attackers and honest
clients apart, how many were excluded for good and their rounds taken part and flagged.

    python docs/results/screen_record_exclusion/banned_clients.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from simulation.checkpoint import read_checkpoint
from simulation.partition import malicious_pool


def summary(run_dir: Path) -> str:
    """One paragraph on ``run_dir``: its round, then attackers' and honest clients' records."""
    config = json.loads((run_dir / "config.json").read_text())["run"]
    checkpoint = read_checkpoint(run_dir / "checkpoint", config)
    if checkpoint is None:
        return f"{run_dir.name}: no checkpoint"
    prefix = "strategy/flag_record/"
    records = {
        int(key[len(prefix) :]): value
        for key, value in checkpoint.strategy_arrays.items()
        if key.startswith(prefix)
    }
    attackers = set(malicious_pool(config))
    lines = [f"{run_dir.name}, round {checkpoint.server_round}:"]
    for label, group in (
        ("attackers", attackers),
        ("honest", set(range(config["num-partitions"])) - attackers),
    ):
        rows = np.array([records[p] for p in sorted(group) if p in records]).reshape(-1, 3)
        rate = rows[:, 1].sum() / max(rows[:, 0].sum(), 1)
        lines.append(
            f"  {label}: {int(rows[:, 2].sum())} of {len(group)} excluded for good; "
            f"{len(rows)} took part, flagged in {rate:.2f} of their rounds"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        print(summary(Path(argument)))
