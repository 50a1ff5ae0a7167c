"""FoolsGold (Fung, Yoon, Beschastnikh, "The Limitations of Federated Learning in Sybil
Settings", RAID 2020)."""

from __future__ import annotations

import numpy as np

from .numpy_strategy import PseudoGradientStrategy, RoundUpdates

__all__ = ["FoolsGold", "foolsgold_weights"]


def foolsgold_weights(histories: np.ndarray, confidence: float = 1.0) -> np.ndarray:
    """Per-client learning-rate weights in [0, 1] from their historical updates.

    ``histories``: ``(N, P)``, each client's summed updates so far. Clients whose
    histories are very similar to another's (colluding sybils pushing the same
    objective) get weights near 0. Steps of the paper's Algorithm 1: maximum
    cosine similarity, pardoning of honest clients, ``1 - max similarity``,
    rescaling, and the logit with ``confidence`` (kappa).
    """
    count = len(histories)
    if count == 1:
        return np.ones(1)
    histories = np.asarray(histories, dtype=np.float64)
    norms = np.linalg.norm(histories, axis=1)
    denominator = np.outer(norms, norms)
    similarity = np.divide(
        histories @ histories.T, denominator, out=np.zeros((count, count)), where=denominator > 0
    )
    np.fill_diagonal(similarity, -np.inf)
    max_similarity = similarity.max(axis=1)
    # Pardoning: when j is more similar to someone than i is, scale s_ij by maxcs_i / maxcs_j.
    ratio = np.divide(
        max_similarity[:, None],
        max_similarity[None, :],
        out=np.ones((count, count)),
        where=max_similarity != 0,
    )
    with np.errstate(invalid="ignore"):
        pardoned = np.where(max_similarity[:, None] < max_similarity[None, :], similarity * ratio, similarity)
    similarity = np.where(np.eye(count, dtype=bool), -np.inf, pardoned)
    weights = np.clip(1.0 - similarity.max(axis=1), 0.0, 1.0)
    if weights.max() > 0:
        weights = weights / weights.max()
    weights[weights == 1.0] = 0.99
    with np.errstate(divide="ignore"):
        logit = confidence * (np.log(weights / (1.0 - weights)) + 0.5)
    return np.clip(np.nan_to_num(logit, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


class FoolsGold(PseudoGradientStrategy):
    """FoolsGold: down-weight clients whose update histories are too similar.

    The server keeps, per node id, the sum of that node's pseudo-gradients on
    the output layer (the last floating array with 2+ dimensions, as the
    authors' deep-learning code does) and weights this round's updates by
    :func:`foolsgold_weights` of those histories; the step is the weighted mean.

    Parameters
    ----------
    confidence : float (default: 1.0)
        The paper's kappa, the steepness of the logit.
    history_layer : int, optional
        Index among the floating arrays whose updates form the history;
        default: the last one with 2+ dimensions (else the whole model).
    """

    #: Attributes that carry across rounds (saved in a round checkpoint): the per-node histories.
    carried_state = ("histories",)

    def __init__(self, *, confidence: float = 1.0, history_layer: int | None = None, **fedavg_kwargs):
        if not confidence > 0:
            raise ValueError(f"confidence must be > 0, got {confidence}")
        self.confidence = confidence
        self.history_layer = history_layer
        self.histories: dict[int, np.ndarray] = {}
        super().__init__(**fedavg_kwargs)

    def server_step(self, updates: RoundUpdates) -> tuple[np.ndarray, dict[str, float | int]]:
        """Weighted mean of the pseudo-gradients with FoolsGold's weights."""
        window = self._history_window(updates)
        for node_id, update in zip(updates.node_ids, updates.pseudo_gradients, strict=True):
            previous = self.histories.get(node_id)
            if previous is None or previous.shape != update[window].shape:
                previous = np.zeros(update[window].shape, dtype=np.float64)
            self.histories[node_id] = previous + update[window]
        weights = foolsgold_weights(np.stack([self.histories[n] for n in updates.node_ids]), self.confidence)
        if weights.sum() == 0:
            return np.zeros(updates.pseudo_gradients.shape[1], dtype=np.float32), {
                "foolsgold_weight_mean": 0.0
            }
        step = (weights / weights.sum()) @ updates.pseudo_gradients
        return step, {
            "foolsgold_weight_mean": float(weights.mean()),
            "foolsgold_weight_min": float(weights.min()),
        }

    def _history_window(self, updates: RoundUpdates) -> slice:
        if self.history_layer is not None:
            return updates.layer_slices[self.history_layer]
        return self.output_layer_slice(updates)

    @staticmethod
    def output_layer_slice(updates: RoundUpdates) -> slice:
        """The slice of the last floating array with 2+ dimensions (all of P if none)."""
        matrices = [
            s for s, shape in zip(updates.layer_slices, updates.layer_shapes, strict=True) if len(shape) >= 2
        ]
        return matrices[-1] if matrices else slice(0, updates.pseudo_gradients.shape[1])
