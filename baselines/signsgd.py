"""Sign-SGD with majority vote (Bernstein, Zhao, Azizzadenesheli, Anandkumar, ICLR 2019)."""

from __future__ import annotations

import numpy as np

from .numpy_strategy import PseudoGradientStrategy, RoundUpdates

__all__ = ["SignSGD", "majority_vote"]


def majority_vote(pseudo_gradients: np.ndarray) -> np.ndarray:
    """``sign(sum_i sign(g_i))`` per coordinate; ``(N, P)`` -> ``(P,)`` in {-1, 0, 1}."""
    return np.sign(np.sign(pseudo_gradients).sum(axis=0))


class SignSGD(PseudoGradientStrategy):
    """Server step ``server_learning_rate * sign(sum_i sign(g_i))`` (majority vote).

    Each client's update counts only by its sign per coordinate, so no client can
    push a coordinate harder than any other. Bernstein et al. train with small
    steps; ``server_learning_rate`` (default 1e-3) is the per-round step size.
    """

    def __init__(self, *, server_learning_rate: float = 1e-3, **fedavg_kwargs):
        if not server_learning_rate > 0:
            raise ValueError(f"server_learning_rate must be > 0, got {server_learning_rate}")
        self.server_learning_rate = server_learning_rate
        super().__init__(**fedavg_kwargs)

    def server_step(self, updates: RoundUpdates) -> tuple[np.ndarray, dict[str, float | int]]:
        """The scaled majority vote."""
        vote = majority_vote(updates.pseudo_gradients)
        return self.server_learning_rate * vote, {"vote_nonzero_fraction": float(np.mean(vote != 0))}
