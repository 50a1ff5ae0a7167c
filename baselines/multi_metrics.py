"""Multi-metrics (Huang, Li, Chen, Shi, Gao, "Multi-Metrics Adaptively Identifies Backdoors in
Federated Learning", ICCV 2023)."""

from __future__ import annotations

import numpy as np

from .numpy_strategy import PseudoGradientStrategy, RoundUpdates

__all__ = ["MultiMetrics", "multi_metrics_features", "multi_metrics_scores"]


def multi_metrics_features(pseudo_gradients: np.ndarray) -> np.ndarray:
    """Each update's summed distances to the others under the three metrics: ``(N, P)`` -> ``(N, 3)``.

    Columns: ``sum_j (1 - cos(g_i, g_j))^2`` (the authors' code squares the cosine
    distance), ``sum_j ||g_i - g_j||_1`` (Manhattan) and ``sum_j | ||g_i|| - ||g_j|| |``
    (the "Euclidean" column of the authors' code: the difference of the L2 norms).
    A zero update has cosine similarity 0 with every other.
    """
    vectors = np.asarray(pseudo_gradients, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1)
    denominator = np.outer(norms, norms)
    cosine = np.divide(
        vectors @ vectors.T, denominator, out=np.zeros_like(denominator), where=denominator > 0
    )
    cosine_term = (1.0 - cosine) ** 2
    np.fill_diagonal(cosine_term, 0.0)
    # one row at a time: an (N, N, P) difference tensor would not fit for large models
    manhattan = np.array([np.abs(vectors - row).sum(axis=1).sum() for row in vectors])
    length = np.abs(norms[:, None] - norms[None, :]).sum(axis=1)
    return np.column_stack([cosine_term.sum(axis=1), manhattan, length])


def multi_metrics_scores(features: np.ndarray) -> np.ndarray:
    """``s_i = x_i^T Sigma^-1 x_i``, ``Sigma`` the sample covariance of the rows: ``(N, 3)`` -> ``(N,)``.

    The pseudo-inverse stands in for the inverse (the authors' ``np.linalg.inv``)
    so that a singular covariance (e.g. two identical columns, or N <= 3) gives
    scores instead of an error; for an invertible covariance they are equal.
    """
    features = np.asarray(features, dtype=np.float64)
    if len(features) < 2:
        return np.zeros(len(features))
    inverse = np.linalg.pinv(np.cov(features.T))
    return np.einsum("ij,jk,ik->i", features, inverse, features)


class MultiMetrics(PseudoGradientStrategy):
    """Multi-metrics: score each update by the whitened sum of its cosine, Manhattan and
    norm distances to the others; average the ``keep_fraction`` lowest-scoring ones.

    Where ours differs from the authors' code (``defense.py``, ``Multi_metrics``):
    it scores the pseudo-gradients ``g_i = w - w_i`` rather than the full local
    models (the paper's text speaks of gradients; differences of Manhattan distance
    are the same either way, the cosine and norm terms are not); the selected
    updates are averaged weighted by their reported examples, as theirs; at least
    one update is kept (theirs keeps ``int(0.3 * N)``, none for N < 4).

    Parameters
    ----------
    keep_fraction : float (default: 0.3)
        The paper's ``p``: the share of updates kept, in ``(0, 1]``.
    """

    def __init__(self, *, keep_fraction: float = 0.3, **fedavg_kwargs) -> None:
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
        self.keep_fraction = keep_fraction
        super().__init__(**fedavg_kwargs)

    def __repr__(self) -> str:
        return f"MultiMetrics(keep_fraction={self.keep_fraction})"

    def server_step(self, updates: RoundUpdates) -> tuple[np.ndarray, dict[str, float | int]]:
        """The example-weighted mean of the lowest-scoring updates."""
        scores = multi_metrics_scores(multi_metrics_features(updates.pseudo_gradients))
        keep = max(1, int(self.keep_fraction * len(scores)))
        chosen = np.argsort(scores, kind="stable")[:keep]
        weights = updates.num_examples[chosen] / updates.num_examples[chosen].sum()
        step = (weights @ updates.pseudo_gradients[chosen]).astype(np.float32)
        return step, {"num_admitted": int(keep)}
