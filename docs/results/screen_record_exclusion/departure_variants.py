"""Whom the departure test flags in one round, as shipped and on four alternatives (sessions 41-42).

From a run's starting model (its cached pretrained model), ``DRAWS`` rounds of ``clients-per-round``
clients, exactly ``ATTACKERS`` of them malicious (:func:`simulation.attribution.sample_round`), are
trained with the run's settings and ``ATTACK``; the round's pairwise test
(:func:`flwr_invariant.mask_rules.departure_agreement`, then
:func:`~flwr_invariant.mask_rules.collusion_weights` below 1: flagged) runs on five versions of the
pseudo-gradients' layers:

- ``shipped``: as they are (the rule's test);
- ``orthogonal``: each client's update less its projection on the coordinate-wise median, so a
  client whose update is a shorter copy of the round's common step departs by nothing;
- ``normalised``: each client's update divided by its norm;
- ``no classifier``: as shipped, without the last layer (its weight and bias);
- ``classifier only``: the last layer alone.

Tried because the honest clients the record flags most are the small ones (``banned_clients.py
--by-size``). First guess (session 41): a small partition takes fewer local steps, so a short update
departs from the median by about minus the median, the same way as every other short update. Second
(session 42): under the Dirichlet split a small partition holds few classes, and two clients that
hold the same few classes depart the same way, above all in the last layer, whose rows are the
classes. Prints the share of attackers and of honest clients flagged, and of honest clients by
quarter of partition size; and, per variant, the label similarity (cosine of the two clients' class
histograms) of the honest pairs that stand out against that of all honest pairs.

    FLWR_INVARIANT_DATA_ROOT=DATA python docs/results/screen_record_exclusion/departure_variants.py \\
        RUN_DIR/config.json ATTACK ATTACKERS DRAWS
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from flwr_invariant.mask_rules import collusion_weights, departure_agreement, outlier_threshold
from simulation.attribution import aggregated_keys, sample_round, start_state
from simulation.data import load_partitions, load_task
from simulation.training import local_update


def orthogonal(layer: np.ndarray) -> np.ndarray:
    """``(N, P)``: each row of ``layer`` ``(N, ...)`` less its projection on the rows' median."""
    flat = layer.reshape(layer.shape[0], -1).astype(np.float64)
    median = np.median(flat, axis=0)
    along = flat @ median / max(float(median @ median), 1e-30)
    return (flat - along[:, None] * median).astype(np.float32)


def normalised(layer: np.ndarray) -> np.ndarray:
    """``(N, P)``: each row of ``layer`` ``(N, ...)`` divided by its norm."""
    flat = layer.reshape(layer.shape[0], -1).astype(np.float64)
    return (flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-30)).astype(np.float32)


def each_layer(transform: Callable[[np.ndarray], np.ndarray]) -> Callable[[list[np.ndarray]], list]:
    """A variant that applies ``transform`` to every layer."""
    return lambda layers: [transform(layer) for layer in layers]


VARIANTS: dict[str, Callable[[list[np.ndarray]], list[np.ndarray]]] = {
    "shipped": list,
    "orthogonal": each_layer(orthogonal),
    "normalised": each_layer(normalised),
    "no classifier": lambda layers: layers[:-2],
    "classifier only": lambda layers: layers[-2:],
}


def standout_pairs(layers: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(N,)`` flagged (a vote weight below 1) and ``(N, N)`` bool: the pairs that stand out."""
    agreement, count = departure_agreement(layers)
    pairs = agreement[np.triu_indices(len(agreement), 1)]
    return collusion_weights(agreement, count) < 1.0, agreement > outlier_threshold(pairs, count)


def label_cosines(histograms: np.ndarray) -> np.ndarray:
    """``(N, N)`` cosine similarity of the rows of ``histograms`` ``(N, classes)``."""
    unit = histograms / np.linalg.norm(histograms, axis=1, keepdims=True)
    return unit @ unit.T


def main(config_path: str, attack: str, attackers: int, draws: int) -> None:
    config = {**json.loads(Path(config_path).read_text())["run"], "attack": attack}
    start = start_state(config)
    keys = aggregated_keys(start)
    partitions = load_partitions(config)
    task = load_task(config)
    labels = task.train_y.numpy()
    sizes = np.array([len(part) for part in partitions])
    quartiles = np.quantile(sizes, [0.25, 0.5, 0.75])
    flags: dict[str, dict[str, list[bool]]] = {name: {} for name in VARIANTS}
    all_cosines: list[float] = []  # every honest pair's, the same for every variant
    standout_cosines: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for draw in range(draws):
        honest, malicious = sample_round(config, attackers, draw)
        states = [local_update(config, pid, draw + 1, start).state_dict for pid in honest + malicious]
        layers = [np.stack([(start[key] - state[key]).numpy() for state in states]) for key in keys]
        quarters = [f"honest, size quarter {1 + np.searchsorted(quartiles, sizes[pid])}" for pid in honest]
        groups = quarters + ["attackers"] * len(malicious)  # the order of honest + malicious above
        histograms = [np.bincount(labels[partitions[pid]], minlength=task.num_classes) for pid in honest]
        cosines = label_cosines(np.stack(histograms).astype(np.float64))
        honest_pairs = np.triu_indices(len(honest), 1)
        all_cosines += cosines[honest_pairs].tolist()
        for name, variant in VARIANTS.items():
            flagged, standing_out = standout_pairs(variant(layers))
            standout_cosines[name] += cosines[honest_pairs][standing_out[honest_pairs]].tolist()
            for group, flag in zip(groups, flagged, strict=True):
                flags[name].setdefault(group, []).append(bool(flag))
                if group != "attackers":
                    flags[name].setdefault("honest", []).append(bool(flag))
    for name, by_group in flags.items():
        shares = ", ".join(f"{group} {np.mean(by_group[group]):.2f}" for group in sorted(by_group))
        print(f"{attack}, {attackers} attackers, {draws} rounds, {name}: flagged {shares}")
        out = standout_cosines[name]
        print(
            f"  honest pairs' label cosine: all {np.mean(all_cosines):.2f} ({len(all_cosines)} pairs), "
            f"standing out {np.mean(out or [np.nan]):.2f} ({len(out)} pairs)"
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
