"""SparseFed (Panda, Mahloujifar, Bhagoji, Chakraborty, Mittal, "SparseFed: Mitigating
Model Poisoning Attacks in Federated Learning with Sparsification", AISTATS 2022)."""

from __future__ import annotations

import numpy as np

from .common import clip_rows
from .numpy_strategy import PseudoGradientStrategy, RoundUpdates

__all__ = ["SparseFed", "top_k_indices"]


def top_k_indices(vector: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` entries of largest magnitude."""
    k = max(0, min(k, vector.size))
    if k == 0:
        return np.empty(0, dtype=np.int64)
    return np.argpartition(np.abs(vector), vector.size - k)[vector.size - k :]


class SparseFed(PseudoGradientStrategy):
    """Clipped updates, server error feedback, and a top-k sparse global step.

    Each round: clip every pseudo-gradient to L2 norm ``clipping_norm``, average
    them, add the result to the server's error-feedback accumulator, apply only
    the ``top_k_fraction`` largest-magnitude coordinates of the accumulator
    (times ``server_learning_rate``) and keep the rest for later rounds. A
    backdoor that needs many small coordinate changes rarely reaches the top-k.

    Parameters
    ----------
    clipping_norm : float (default: 1.0)
        L2 bound on each client's update (the paper clips on the clients; clipping
        at the server gives the same aggregate and needs no client change).
    top_k_fraction : float (default: 0.01)
        Share of coordinates updated per round, in (0, 1].
    server_learning_rate : float (default: 1.0)
    """

    #: Attributes that carry across rounds (saved in a round checkpoint): the error feedback.
    carried_state = ("error_feedback",)

    def __init__(
        self,
        *,
        clipping_norm: float = 1.0,
        top_k_fraction: float = 0.01,
        server_learning_rate: float = 1.0,
        **fedavg_kwargs,
    ):
        if not clipping_norm > 0 or not 0 < top_k_fraction <= 1 or not server_learning_rate > 0:
            raise ValueError("clipping_norm and server_learning_rate must be > 0, top_k_fraction in (0, 1]")
        self.clipping_norm = clipping_norm
        self.top_k_fraction = top_k_fraction
        self.server_learning_rate = server_learning_rate
        self.error_feedback: np.ndarray | None = None
        super().__init__(**fedavg_kwargs)

    def server_step(self, updates: RoundUpdates) -> tuple[np.ndarray, dict[str, float | int]]:
        """The sparse step; the unapplied remainder stays in the accumulator."""
        mean = clip_rows(updates.pseudo_gradients, self.clipping_norm).mean(axis=0)
        if self.error_feedback is None or self.error_feedback.shape != mean.shape:
            self.error_feedback = np.zeros_like(mean)
        self.error_feedback += mean
        chosen = top_k_indices(self.error_feedback, int(round(self.top_k_fraction * mean.size)))
        step = np.zeros_like(mean)
        step[chosen] = self.server_learning_rate * self.error_feedback[chosen]
        self.error_feedback[chosen] = 0.0
        return step, {"num_coordinates_updated": int(len(chosen))}
