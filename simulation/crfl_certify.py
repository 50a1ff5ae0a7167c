"""CRFL's test-time certificate (Xie et al., ICML 2021; the authors' ``smooth_mnist.py`` and
``certify_mnist.py``) for a finished ``crfl`` run.

``crfl-certify-copies`` noisy copies of the final global model (Gaussian noise of CRFL's
``sigma`` on every floating entry of the state dict, as theirs) classify the first
``crfl-certify-inputs`` clean test inputs; :func:`baselines.crfl.crfl_vote_bounds` turns
the votes into ``p_A``/``p_B`` bounds and :func:`baselines.crfl.crfl_certified_radius`
(their Theorem 2) into a certified radius per input: the backdoor-pattern norm up to which
the smoothed model's prediction on that input cannot change.

Theorem 2 certifies against an attack in one round ``t_adv``. Here ``t_adv`` is the run's
last round with attackers sampled (the last round if none was), ``R`` the attackers sampled
then, each with aggregation weight ``1 / clients-per-round`` (their default), ``tau`` the
local iterations (``local-epochs`` x the mean partition size / ``batch-size``), ``eta`` the
local learning rate, ``gamma = 1`` (no boosting: for boosted attacks such as ``pgd-replace``
the certificate is optimistic), ``q/n`` the attacker's poisoned share (``edge-case-samples``
over ``edge-case-samples`` + ``clean-samples``), ``L = sqrt(2 + 2 rho + rho^2)`` with ``rho``
the clip bound of round ``t_adv`` and the contraction over rounds ``t_adv + 1 .. T``. A
persistent attacker makes ``t_adv`` the last round: no contraction, small radii.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from baselines.crfl import CRFL, crfl_certified_radius, crfl_contraction, crfl_vote_bounds

from .data import TaskData
from .models import get_device
from .training import model_for, predict

__all__ = ["ALPHA", "certify_run", "smoothed_votes"]

#: Hoeffding's error tolerance (the authors' ``alpha``).
ALPHA = 0.001


@torch.no_grad()
def smoothed_votes(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    task: TaskData,
    sigma: float,
    copies: int,
    seed: int,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Predicted classes, shape ``(copies, len(x))``, of ``copies`` models ``state + N(0, sigma^2)``
    (noise on every floating entry, from a generator seeded with ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    votes = np.empty((copies, len(x)), dtype=np.int64)
    for copy in range(copies):
        noisy = {
            key: value + sigma * torch.randn(value.shape, generator=generator, dtype=value.dtype)
            if value.is_floating_point()
            else value
            for key, value in state.items()
        }
        model.load_state_dict(noisy)
        votes[copy] = predict(model, x, task.preprocess, batch_size, device)[1].numpy()
    return votes


def certify_run(
    task: TaskData,
    config: Mapping[str, Any],
    strategy: CRFL,
    state: Mapping[str, torch.Tensor],
    attackers: Mapping[int, int],
) -> dict[str, Any]:
    """The certificate of the final model ``state`` of a ``crfl`` run (see the module docstring).

    ``attackers``: malicious clients sampled per round. Returns the constants used, the
    smoothed model's accuracy on the inputs, and the per-input radii's quartiles (a
    misclassified input counts as radius 0, so the certified accuracy at radius ``r`` is
    the share of radii >= ``r``).
    """
    rounds = int(config["num-server-rounds"])
    inputs = min(int(config["crfl-certify-inputs"]), len(task.test_y))
    x, y = task.test_x[:inputs], task.test_y[:inputs].numpy()
    model = model_for(task, config)
    votes = smoothed_votes(
        model, state, x, task, strategy.sigma, int(config["crfl-certify-copies"]),
        int(np.random.SeedSequence([config["seed"], 0xCF1]).generate_state(1)[0]),
        config["eval-batch-size"], get_device(config["device"]),
    )  # fmt: skip
    p_a, p_b, correct = crfl_vote_bounds(votes, y, ALPHA)

    attacked = [r for r in range(1, rounds + 1) if attackers.get(r, 0) > 0]
    t_adv = attacked[-1] if attacked else rounds
    rho = strategy.clip_bound(t_adv)
    poisoned, clean = config["edge-case-samples"], config["clean-samples"]
    constants = {
        "attackers": max(1, attackers.get(t_adv, 0)),
        "local_iterations": config["local-epochs"]
        * len(task.train_y)
        / config["num-partitions"]
        / config["batch-size"],
        "learning_rate": float(config["lr"]),
        "scale_factor": 1.0,
        "poison_fraction": poisoned / (poisoned + clean),
        "lipschitz": math.sqrt(2.0 + 2.0 * rho + rho**2),
        "contraction": crfl_contraction(
            [strategy.clip_bound(t) for t in range(t_adv + 1, rounds + 1)], strategy.sigma
        ),
    }
    weights = [1.0 / config["clients-per-round"]] * constants["attackers"]
    radii = np.array(
        [
            crfl_certified_radius(a, b, sigma=strategy.sigma, aggregation_weights=weights, **constants)
            if ok
            else 0.0
            for a, b, ok in zip(p_a, p_b, correct, strict=True)
        ]
    )
    quartiles = np.quantile(radii, [0.25, 0.5, 0.75])
    return {
        "t_adv": t_adv,
        "copies": int(config["crfl-certify-copies"]),
        "inputs": inputs,
        "sigma": strategy.sigma,
        "alpha": ALPHA,
        **constants,
        "smoothed_accuracy": float(correct.mean()),
        "radius_quartiles": [float(q) for q in quartiles],
    }
