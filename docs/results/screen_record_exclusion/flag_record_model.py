"""A toy model of record-departure-exclusion's record: flags drawn at fixed rates, no training.

100 clients (the last 20 attackers), 20 drawn a round for 300 rounds; each drawn client is flagged
with its own probability (honest: ``--honest`` plus a normal spread ``--spread``, clipped to [0, 1];
attackers: ``--attacker``). The record and the test are the rule's own
(:func:`flwr_invariant.mask_rules.unusual_records`). Prints, per draw, the honest clients and attackers
excluded for good, and the median and 90th-percentile round at which attackers were.

    python docs/results/screen_record_exclusion/flag_record_model.py --alpha 1e-3 --spread 0.1
"""

from __future__ import annotations

import argparse

import numpy as np

from flwr_invariant.mask_rules import RECORD_ALPHA, unusual_records


def one_draw(seed: int, honest: float, attacker: float, spread: float, alpha: float) -> str:
    """One federation of 300 rounds; returns a line with its exclusions."""
    rng = np.random.default_rng(seed)
    rates = np.r_[np.clip(rng.normal(honest, spread, 80), 0.0, 1.0), np.full(20, attacker)]
    sampled, flagged = np.zeros(100, dtype=np.int64), np.zeros(100, dtype=np.int64)
    excluded_at = np.full(100, -1)
    for server_round in range(1, 301):
        drawn = rng.choice(100, 20, replace=False)
        sampled[drawn] += 1
        flagged[drawn] += rng.random(20) < rates[drawn]
        unusual = unusual_records(sampled, flagged, alpha=alpha)
        excluded_at[unusual & (excluded_at < 0)] = server_round
    attackers = excluded_at[80:][excluded_at[80:] >= 0]
    honest_out = int((excluded_at[:80] >= 0).sum())
    return (
        f"draw {seed}: {honest_out} of 80 honest and {len(attackers)} of 20 attackers excluded for good"
        + (
            f"; attackers at median round {np.median(attackers):.0f}, "
            f"90th percentile {np.percentile(attackers, 90):.0f}"
            if len(attackers)
            else ""
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--honest", type=float, default=0.375, help="honest flag rate (default 24/64)")
    parser.add_argument("--attacker", type=float, default=0.81, help="attackers' flag rate (default 13/16)")
    parser.add_argument("--spread", type=float, default=0.0, help="standard deviation of the honest rates")
    parser.add_argument("--alpha", type=float, default=RECORD_ALPHA)
    parser.add_argument("--draws", type=int, default=5)
    arguments = parser.parse_args()
    for seed in range(arguments.draws):
        print(one_draw(seed, arguments.honest, arguments.attacker, arguments.spread, arguments.alpha))
