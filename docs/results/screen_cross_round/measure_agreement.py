"""Do split-evasion's colluders depart on the same coordinates across rounds? (issue #12, session 32)

Draws ``DRAWS`` rounds with 4 attackers each from a grid's seed-7 pretrained model (as
``simulation.attribution`` does: same start model, different sampled clients and shuffling), takes each
client's departure signs (``flwr_invariant.mask_rules.departure_signs``: the 10% of each layer where
it departs most from the round's coordinate-wise median) and prints the mean, median and max
agreement by kind of pair, within a round and across rounds.

    FLWR_INVARIANT_DATA_ROOT=DATA python docs/results/screen_cross_round/measure_agreement.py \\
        docs/results/screen_cross_round/grid.toml 4 split-evasion
"""

import sys

import numpy as np

from flwr_invariant.mask_rules import departure_signs
from simulation.attribution import aggregated_keys, sample_round, start_state
from simulation.config import resolve_config
from simulation.grid import load_grid
from simulation.partition import malicious_pool
from simulation.training import local_update


def main(grid: str, draws: int, attack: str) -> None:
    spec = load_grid(grid)
    overrides = next(o for _, o in spec.runs() if o["seed"] == 7 and o["attack"] == attack)
    config = resolve_config({**overrides, "defense": "invariant"})
    start = start_state(config)
    keys = aggregated_keys(start)
    pool = malicious_pool(config)
    rounds = []
    for draw in range(draws):
        benign, malicious = sample_round(config, 4, draw)
        ids = benign + malicious
        states = [local_update(config, pid, draw + 1, start).state_dict for pid in ids]
        layers = [np.stack([(start[key] - state[key]).numpy() for state in states]) for key in keys]
        signs, kept = departure_signs(layers)
        kinds = ["honest"] * len(benign) + [pool.index(p) % config["evasion-parts"] for p in malicious]
        rounds.append((ids, kinds, signs.astype(np.float32)))
    agreements: dict[str, list[float]] = {}
    for a, (ids_a, kinds_a, signs_a) in enumerate(rounds):
        for b, (ids_b, kinds_b, signs_b) in enumerate(rounds):
            gram = signs_a @ signs_b.T / kept
            for i, j in np.ndindex(gram.shape):
                if a == b and i >= j:
                    continue
                if kinds_a[i] == "honest" and kinds_b[j] == "honest":
                    kind = "honest, same client" if ids_a[i] == ids_b[j] else "honest"
                elif "honest" in (kinds_a[i], kinds_b[j]):
                    kind = "attacker-honest"
                elif ids_a[i] == ids_b[j]:
                    kind = "attacker, same client"
                else:
                    kind = "attackers, same share" if kinds_a[i] == kinds_b[j] else "attackers, other shares"
                where = "within a round" if a == b else "across rounds"
                agreements.setdefault(f"{where} | {kind}", []).append(float(gram[i, j]))
    print("| pairs | kind | count | mean | median | max |\n|---|---|--:|--:|--:|--:|")
    for name in sorted(agreements):
        values = np.array(agreements[name])
        where, kind = name.split(" | ")
        stats = f"{values.mean():.3f} | {np.median(values):.3f} | {values.max():.3f}"
        print(f"| {where} | {kind} | {values.size} | {stats} |")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
