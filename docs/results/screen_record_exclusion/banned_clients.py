"""Who a record-departure-exclusion run excluded for good: attackers and honest clients, from its checkpoint.

Reads the run's last round checkpoint (its ``flag_record``, saved per partition) and the run's
malicious pool (``simulation.partition.malicious_pool``), and prints, for attackers and honest
clients apart, how many were excluded for good, the share of their rounds flagged, and the spread
of that share over the clients.

With ``--what-if`` it also prints whom other tests of the same final records would judge unusual
(records as they stand at that round, not replayed round by round): the rule's binomial test at
1e-3 and at 1e-6, and a beta-binomial test whose rate distribution is fitted (method of moments) to
the judged clients below the 80th percentile of rates, at 1e-3 and 1e-6. The beta-binomial allows
for honest clients that differ in how often they are flagged.

With ``--by-size`` it also prints the honest clients by quarter of partition size (examples in their
training partition, from ``simulation.data.load_partitions``: needs ``FLWR_INVARIANT_DATA_ROOT``):
their share of rounds flagged, how many were excluded for good, and the share of the honest clients'
examples those held.

    python docs/results/screen_record_exclusion/banned_clients.py [--what-if] [--by-size] RUN_DIR [...]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from flwr_invariant.mask_rules import RECORD_MIN_SAMPLED, unusual_records
from simulation.checkpoint import read_checkpoint
from simulation.partition import malicious_pool


def read_records(run_dir: Path) -> tuple[int, dict[int, np.ndarray], set[int], dict] | None:
    """``(round, partition -> [taken part, flagged, excluded], attackers, run config)``, or ``None``."""
    config = json.loads((run_dir / "config.json").read_text())["run"]
    checkpoint = read_checkpoint(run_dir / "checkpoint", config)
    if checkpoint is None:
        return None
    prefix = "strategy/flag_record/"
    records = {
        int(key[len(prefix) :]): np.asarray(value)[:3]  # a 4th field (flagged the last round) is unused
        for key, value in checkpoint.strategy_arrays.items()
        if key.startswith(prefix)
    }
    return checkpoint.server_round, records, set(malicious_pool(config)), config


def beta_binomial_tail(count: int, trials: int, a: float, b: float) -> float:
    """``P(X >= count)`` for ``X ~ BetaBinomial(trials, a, b)`` (log space; numpy has no beta-binomial)."""

    def log_beta(x: float, y: float) -> float:
        return math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)

    return sum(
        math.exp(
            math.lgamma(trials + 1) - math.lgamma(k + 1) - math.lgamma(trials - k + 1)
            + log_beta(k + a, trials - k + b) - log_beta(a, b)
        )
        for k in range(max(count, 0), trials + 1)
    )  # fmt: skip


def what_if(sampled: np.ndarray, flagged: np.ndarray) -> dict[str, np.ndarray]:
    """Test name -> ``(K,)`` bool of the clients that test judges unusual, from ``(K,)`` counts."""
    judged = sampled >= RECORD_MIN_SAMPLED
    rates = ((flagged + 0.5) / (sampled + 1.0))[judged]
    typical = rates[rates <= np.quantile(rates, 0.8)]
    mean, variance = float(typical.mean()), float(typical.var())
    spread = max(mean * (1 - mean) / max(variance, 1e-9) - 1, 1e-3)  # a + b of the fitted Beta
    a, b = mean * spread, (1 - mean) * spread
    pairs = zip(flagged, sampled, strict=True)
    tails = np.array([beta_binomial_tail(int(f), int(n), a, b) for f, n in pairs])
    fit = f"mean {mean:.2f}, sd {math.sqrt(variance):.2f}"
    return {
        "binomial, 1e-3 (the rule)": unusual_records(sampled, flagged),
        "binomial, 1e-6": unusual_records(sampled, flagged, alpha=1e-6),
        f"beta-binomial ({fit}), 1e-3": judged & (tails <= 1e-3),
        f"beta-binomial ({fit}), 1e-6": judged & (tails <= 1e-6),
    }


def by_size(config: dict, records: dict[int, np.ndarray], attackers: set[int]) -> list[str]:
    """Lines on the honest clients by quarter of partition size: flag rate, excluded, examples excluded."""
    from simulation.data import load_partitions  # needs the data root; only this option reads data

    honest = np.array([p for p in sorted(records) if p not in attackers])
    size = np.array([len(part) for part in load_partitions(config)])[honest]
    rows = np.stack([records[p] for p in honest])
    rate, out = rows[:, 1] / np.maximum(rows[:, 0], 1), rows[:, 2] > 0
    correlation = np.corrcoef(size.argsort().argsort(), rate.argsort().argsort())[0, 1]
    lines = [
        f"  honest by partition size: {size[out].sum() / size.sum():.2f} of their examples excluded "
        f"for good; rank correlation of size and flag rate {correlation:.2f}"
    ]
    for quarter in np.array_split(size.argsort(), 4):
        lines.append(
            f"    {size[quarter].min()}-{size[quarter].max()} examples: flagged in "
            f"{rate[quarter].mean():.2f} of their rounds, {int(out[quarter].sum())} of {len(quarter)} "
            "excluded for good"
        )
    return lines


def summary(run_dir: Path, with_what_if: bool = False, with_sizes: bool = False) -> str:
    """One paragraph on ``run_dir``: its round, then attackers' and honest clients' records."""
    read = read_records(run_dir)
    if read is None:
        return f"{run_dir.name}: no checkpoint"
    server_round, records, attackers, config = read
    lines = [f"{run_dir.name}, round {server_round}:"]
    honest = set(range(config["num-partitions"])) - attackers
    for label, group in (("attackers", attackers), ("honest", honest)):
        rows = np.array([records[p] for p in sorted(group) if p in records]).reshape(-1, 3)
        rate = rows[:, 1].sum() / max(rows[:, 0].sum(), 1)
        each = np.quantile(rows[:, 1] / np.maximum(rows[:, 0], 1), [0, 0.5, 0.9, 1])
        lines.append(
            f"  {label}: {int(rows[:, 2].sum())} of {len(group)} excluded for good; "
            f"{len(rows)} took part, flagged in {rate:.2f} of their rounds "
            f"(each's rate: min {each[0]:.2f}, median {each[1]:.2f}, "
            f"90th percentile {each[2]:.2f}, max {each[3]:.2f})"
        )
    if with_what_if:
        ids = sorted(records)
        counts = np.stack([records[p] for p in ids])
        is_attacker = np.array([p in attackers for p in ids])
        for name, unusual in what_if(counts[:, 0], counts[:, 1]).items():
            lines.append(
                f"  what if {name}: {int((unusual & is_attacker).sum())} attackers, "
                f"{int((unusual & ~is_attacker).sum())} honest clients"
            )
    if with_sizes:
        lines += by_size(config, records, attackers)
    return "\n".join(lines)


if __name__ == "__main__":
    arguments = sys.argv[1:]
    options = {"--what-if", "--by-size"}
    for argument in arguments:
        if argument not in options:
            print(summary(Path(argument), "--what-if" in arguments, "--by-size" in arguments))
