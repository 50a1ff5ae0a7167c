"""CRFL (Xie, Chen, Chen, Li, "CRFL: Certifiably Robust Federated Learning against Backdoor
Attacks", ICML 2021)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .numpy_strategy import PseudoGradientStrategy, RoundUpdates

__all__ = ["CRFL", "crfl_certified_radius", "crfl_clip_bound", "crfl_contraction", "crfl_vote_bounds"]


def crfl_clip_bound(server_round: int, clip_start: float, clip_growth: float, clip_max: float) -> float:
    """The bound on the global model's norm in round t: ``min(clip_max, clip_start + clip_growth * t)``."""
    return min(clip_max, clip_start + clip_growth * server_round)


def crfl_contraction(clip_bounds: Sequence[float], sigma: float) -> float:
    """``prod_t (2 Phi(rho_t / sigma) - 1)`` over the given rounds' bounds ``rho_t``
    (``2 Phi(x) - 1 = erf(x / sqrt 2)``); 1 for no rounds."""
    return math.prod(math.erf(bound / (sigma * math.sqrt(2.0))) for bound in clip_bounds)


def crfl_vote_bounds(
    votes: np.ndarray, labels: np.ndarray, alpha: float = 0.001
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(p_a, p_b, correct)`` per test input from the classes ``votes`` (M copies, n inputs)
    of M noisy copies of the model (the authors' ``probability_estimation`` and ``certify``).

    ``p_a``: the top class's vote share minus Hoeffding's ``sqrt(log(1 / alpha) / (2 M))``
    (at least 1e-8); ``p_b``: the runner-up's share plus it (at most 1 - 1e-8); ``correct``:
    whether the top class (the lowest on a tie) is ``labels``' class.
    """
    votes = np.asarray(votes)
    copies, count = votes.shape
    classes = int(max(votes.max(initial=0), np.asarray(labels).max(initial=0))) + 1
    counts = np.zeros((count, classes), dtype=np.int64)
    np.add.at(counts, (np.broadcast_to(np.arange(count), votes.shape), votes), 1)
    top = counts.argmax(axis=1)
    p_top = counts[np.arange(count), top] / copies
    counts[np.arange(count), top] = 0
    p_second = counts.max(axis=1) / copies
    margin = math.sqrt(math.log(1.0 / alpha) / (2.0 * copies))
    p_a = np.maximum(1e-8, p_top - margin)
    p_b = np.minimum(1.0 - 1e-8, p_second + margin)
    return p_a, p_b, top == np.asarray(labels)


def crfl_certified_radius(
    p_a: float,
    p_b: float,
    *,
    sigma: float,
    contraction: float,
    attackers: int,
    local_iterations: float,
    learning_rate: float,
    scale_factor: float,
    poison_fraction: float,
    aggregation_weights: Sequence[float],
    lipschitz: float,
) -> float:
    """CRFL's certified radius: the largest backdoor-pattern magnitude ``||delta||`` under
    which the smoothed model's prediction on a test input cannot change (the paper's Theorem 2,
    as ``cal_prob_bound`` of the authors' ``certify_*.py``):

    ``sqrt(-log(1 - (sqrt(p_a) - sqrt(p_b))^2) sigma^2 / (2 R tau^2 L^2 sum_i p_i^2 gamma^2
    eta^2 (q/n)^2 prod_t (2 Phi(rho_t / sigma) - 1)))``.

    ``p_a``/``p_b``: lower/upper bounds of the top two class probabilities under
    parameter smoothing; ``contraction``: the product of :func:`crfl_contraction` over
    the rounds after the attack; ``attackers`` R, ``local_iterations`` tau,
    ``learning_rate`` eta, ``scale_factor`` gamma, ``poison_fraction`` q/n (poisoned
    share of a batch), ``aggregation_weights`` the attackers' ``p_i``, ``lipschitz`` L.
    ``p_a = 1`` gives ``inf``.
    """
    if not (0 <= p_a <= 1 and 0 <= p_b <= 1):
        raise ValueError(f"need 0 <= p_a, p_b <= 1, got p_a={p_a}, p_b={p_b}")
    if p_a == 1.0:
        return math.inf
    if p_a <= p_b:  # no majority the bounds can certify
        return 0.0
    numerator = -math.log(1.0 - (math.sqrt(p_a) - math.sqrt(p_b)) ** 2) * sigma**2
    denominator = (
        2.0
        * attackers
        * local_iterations**2
        * lipschitz**2
        * sum(w**2 for w in aggregation_weights)
        * scale_factor**2
        * learning_rate**2
        * poison_fraction**2
        * contraction
    )
    return math.sqrt(numerator / denominator)


class CRFL(PseudoGradientStrategy):
    """CRFL's training: the example-weighted mean of the updates, then the new global model
    is clipped to L2 norm ``rho_t`` and perturbed with Gaussian noise of std ``sigma``.

    Each round reports ``crfl_model_norm`` (before clipping), ``crfl_clip_bound``
    (``rho_t``) and ``crfl_contraction``: the product of ``2 Phi(rho_t / sigma) - 1``
    over rounds 1..t, the factor of the certified radius's denominator that training
    contributes (the paper takes it over the rounds after the attack, t_adv + 1..T:
    :func:`crfl_contraction` of those rounds' bounds, then :func:`crfl_certified_radius`).

    Where ours differs from the authors' code (``main.py``, ``utils/helper.py``):
    clipping and noise cover every floating array except batch-norm running
    statistics (theirs: clipping ``named_parameters``, noise on the whole
    ``state_dict`` of models without batch norm); the noise is part of the returned
    model, so the server-side evaluation sees the perturbed model (theirs evaluates
    the clipped model, then perturbs it before the next round). The test-time
    parameter smoothing (M noisy copies of the final model, majority vote) that
    gives ``p_a``/``p_b`` per test input needs the model: ``simulation.crfl_certify``.

    Parameters (the authors' MNIST values)
    ----------
    sigma : float (default: 0.01)
        Noise std per coordinate, > 0.
    clip_start, clip_growth, clip_max : float (default: 2.0, 0.1, 15.0)
        ``rho_t = min(clip_max, clip_start + clip_growth * t)``. These bound the norm
        of the whole model; they must be set for each model (15 fits their MNIST CNN).
    seed : int, optional
        Seed of the server's noise generator.
    """

    #: Attributes that carry across rounds (saved in a round checkpoint).
    carried_state = ("rng",)

    def __init__(
        self,
        *,
        sigma: float = 0.01,
        clip_start: float = 2.0,
        clip_growth: float = 0.1,
        clip_max: float = 15.0,
        seed: int | None = None,
        **fedavg_kwargs,
    ) -> None:
        if not sigma > 0 or not clip_start > 0 or clip_growth < 0 or not clip_max > 0:
            raise ValueError(
                "need sigma > 0, clip_start > 0, clip_growth >= 0, clip_max > 0; got "
                f"sigma={sigma}, clip_start={clip_start}, clip_growth={clip_growth}, clip_max={clip_max}"
            )
        self.sigma = sigma
        self.clip_start = clip_start
        self.clip_growth = clip_growth
        self.clip_max = clip_max
        self.rng = np.random.default_rng(seed)
        super().__init__(**fedavg_kwargs)

    def __repr__(self) -> str:
        return (
            f"CRFL(sigma={self.sigma}, clip_start={self.clip_start}, clip_growth={self.clip_growth}, "
            f"clip_max={self.clip_max})"
        )

    def clip_bound(self, server_round: int) -> float:
        """``rho_t`` of round ``server_round``."""
        return crfl_clip_bound(server_round, self.clip_start, self.clip_growth, self.clip_max)

    def server_step(self, updates: RoundUpdates) -> tuple[np.ndarray, dict[str, float | int]]:
        """``w - clip(w - mean_w(g)) - noise``, on the parameters (not batch-norm statistics)."""
        mean = (updates.num_examples / updates.num_examples.sum()) @ updates.pseudo_gradients
        model = (updates.global_flat - mean).astype(np.float64)
        parameters = np.ones(model.size, dtype=bool)
        for name, where in zip(updates.layer_names, updates.layer_slices, strict=False):
            if ".running_" in f".{name.rsplit('.', 1)[-1]}":
                parameters[where] = False
        norm = float(np.linalg.norm(model[parameters]))
        bound = self.clip_bound(updates.server_round)
        if norm > bound:
            model[parameters] *= bound / norm
        model[parameters] += self.rng.normal(0.0, self.sigma, size=int(parameters.sum()))
        bounds = [self.clip_bound(t) for t in range(1, updates.server_round + 1)]
        metrics = {
            "crfl_model_norm": norm,
            "crfl_clip_bound": bound,
            "crfl_contraction": crfl_contraction(bounds, self.sigma),
        }
        return (updates.global_flat - model).astype(np.float32), metrics
