"""Multi-Krum with cosine distances (Blanchard et al., NeurIPS 2017, with the metric swapped).

Euclidean Krum and Multi-Krum are Flower's own (``flwr.serverapp.strategy.Krum``,
``MultiKrum``); see ``baselines.flower_builtin``.
"""

from __future__ import annotations

import numpy as np

from .common import pairwise_distances
from .numpy_strategy import PseudoGradientStrategy, RoundUpdates

__all__ = ["MultiKrumCosine", "krum_scores", "select_multi_krum"]


def krum_scores(vectors: np.ndarray, num_malicious: int, metric: str = "euclidean") -> np.ndarray:
    """Krum score of each row: the sum of its distances to its ``N - f - 2`` nearest others.

    ``vectors``: ``(N, P)``. Returns ``(N,)``; lower is more central.
    """
    distances = pairwise_distances(vectors, metric)
    num_vectors = len(distances)
    num_closest = min(max(1, num_vectors - num_malicious - 2), max(num_vectors - 1, 0))
    np.fill_diagonal(distances, np.inf)
    nearest = np.sort(distances, axis=1)[:, :num_closest]
    return nearest.sum(axis=1)


def select_multi_krum(
    vectors: np.ndarray, num_malicious: int, num_selected: int, metric: str = "euclidean"
) -> np.ndarray:
    """Indices of the ``num_selected`` rows with the lowest Krum scores (best first)."""
    scores = krum_scores(vectors, num_malicious, metric)
    return np.argsort(scores, kind="stable")[: max(1, min(num_selected, len(scores)))]


class MultiKrumCosine(PseudoGradientStrategy):
    """Multi-Krum (Blanchard et al., NeurIPS 2017) scoring updates by cosine distance.

    Each update's score is the sum of its cosine distances ``1 - cos(g_i, g_j)``
    to its ``N - f - 2`` nearest updates; the ``m`` lowest-scoring updates are
    averaged, weighted by their number of examples as Flower's ``MultiKrum``.

    Parameters
    ----------
    num_malicious_nodes : int (default: 0)
        ``f``, the number of malicious clients assumed per round.
    num_nodes_to_select : int, optional
        ``m``; default ``N - f`` (the usual Multi-Krum choice).
    **fedavg_kwargs
        ``flwr.serverapp.strategy.FedAvg`` keyword arguments.
    """

    def __init__(
        self, *, num_malicious_nodes: int = 0, num_nodes_to_select: int | None = None, **fedavg_kwargs
    ):
        if num_malicious_nodes < 0:
            raise ValueError(f"num_malicious_nodes must be >= 0, got {num_malicious_nodes}")
        self.num_malicious_nodes = num_malicious_nodes
        self.num_nodes_to_select = num_nodes_to_select
        super().__init__(**fedavg_kwargs)

    def server_step(self, updates: RoundUpdates) -> tuple[np.ndarray, dict[str, float | int]]:
        """Weighted mean of the selected pseudo-gradients."""
        count = len(updates.node_ids)
        selected_count = self.num_nodes_to_select or max(1, count - self.num_malicious_nodes)
        selected = select_multi_krum(
            updates.pseudo_gradients, self.num_malicious_nodes, selected_count, "cosine"
        )
        weights = updates.num_examples[selected] / updates.num_examples[selected].sum()
        return weights @ updates.pseudo_gradients[selected], {"num_selected": int(len(selected))}
