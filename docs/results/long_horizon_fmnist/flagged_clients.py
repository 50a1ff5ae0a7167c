"""Whom does the cross-round test flag, from a run's model? (issue #12, session 33)

Draws ``ROUNDS`` rounds of ``clients-per-round`` clients at random (numpy seed 12345) from a run's
population, trains each from one model (the model is not updated between draws), feeds their
pseudo-gradients round after round to a fresh ``MaskRule("cross-round-departure-exclusion")`` with
the clients' partition ids, and prints, per round, which attackers (``A`` + share) were flagged
(``x``) and how many honest clients were. The model is the run's checkpointed global model, or with
``start`` the grid's cached pretrained model.

    FLWR_INVARIANT_DATA_ROOT=DATA python docs/results/long_horizon_fmnist/flagged_clients.py RUN_DIR 4 [start]

``RUN_DIR``: a run directory of ``python -m simulation grid`` (its ``config.json``, and its
``checkpoint/`` unless ``start``); checkpoints are not committed.
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from flwr_invariant.mask_rules import MaskRule
from simulation.attribution import aggregated_keys, start_state
from simulation.checkpoint import read_checkpoint
from simulation.config import resolve_config
from simulation.partition import malicious_pool
from simulation.training import local_update


def run_model(run: Path, config: dict) -> tuple[dict[str, torch.Tensor], int]:
    """The run's checkpointed global model (copied first: the run may still be writing) and its round."""
    with tempfile.TemporaryDirectory() as copy:
        for path in (run / "checkpoint").iterdir():
            if path.name != "lock":
                shutil.copy(path, copy)
        checkpoint = read_checkpoint(Path(copy), config)
    if checkpoint is None:
        raise FileNotFoundError(f"{run}: no checkpoint")
    return {k: torch.from_numpy(np.asarray(v)) for k, v in checkpoint.model.items()}, checkpoint.server_round


def main(run: Path, rounds: int, from_start: bool) -> None:
    config = resolve_config(json.loads((run / "config.json").read_text())["run"])
    model, base = (start_state(config), 0) if from_start else run_model(run, config)
    keys = aggregated_keys(model)
    pool = malicious_pool(config)
    rule = MaskRule("cross-round-departure-exclusion", config["tau"])
    rng = np.random.default_rng(12345)
    flagged = {"attackers": [0, 0], "honest": [0, 0]}
    print(f"model of round {base}")
    for draw in range(rounds):
        drawn = rng.choice(config["num-partitions"], config["clients-per-round"], replace=False)
        ids = sorted(int(p) for p in drawn)
        states = [local_update(config, pid, base + 1 + draw, model).state_dict for pid in ids]
        layers = [np.stack([(model[key] - state[key]).numpy() for state in states]) for key in keys]
        outside, _ = rule.outside_blocs(layers, client_ids=ids)
        marks = []
        for pid, kept in zip(ids, outside, strict=True):
            kind = "attackers" if pid in pool else "honest"
            flagged[kind][0] += 1
            flagged[kind][1] += int(not kept)
            if pid in pool:
                marks.append(f"A{pool.index(pid) % config['evasion-parts']}{'.' if kept else 'x'}")
        honest = sum(1 for pid, kept in zip(ids, outside, strict=True) if pid not in pool and not kept)
        print(f"draw {draw + 1}: attackers {' '.join(marks)}; honest flagged {honest}", flush=True)
    print(", ".join(f"{kind} flagged {f} of {n}" for kind, (n, f) in flagged.items()))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:] == ["start"])
