"""FLTrust (Cao, Fang, Liu, Gong, "FLTrust: Byzantine-robust Federated Learning via Trust
Bootstrapping", NDSS 2021)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ArrayRecord

from flwr_invariant.screened_replies import decode_array

from .common import flat_pseudo_gradients
from .numpy_strategy import PseudoGradientStrategy, RoundUpdates

#: ``root_update(server_round, global_arrays) -> arrays after the server's training on its
#: root dataset`` (same keys), e.g. a :class:`~baselines.server_side.RootTrainer`.
RootUpdate = Callable[[int, ArrayRecord], ArrayRecord]

__all__ = ["FLTrust", "RootUpdate", "fltrust_step"]


def fltrust_step(pseudo_gradients: np.ndarray, server_gradient: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FLTrust's aggregate: ``sum_i TS_i (||g_0|| / ||g_i||) g_i / sum_i TS_i`` with trust
    scores ``TS_i = ReLU(cos(g_i, g_0))``.

    ``pseudo_gradients``: ``(N, P)``; ``server_gradient`` ``g_0``: ``(P,)``. Returns the
    step (``(P,)``, zero when every trust score is 0) and the scores ``(N,)``. A zero
    ``g_i`` has trust score 0.
    """
    grads = np.asarray(pseudo_gradients, dtype=np.float64)
    server = np.asarray(server_gradient, dtype=np.float64)
    server_norm = float(np.linalg.norm(server))
    norms = np.linalg.norm(grads, axis=1)
    denominator = norms * server_norm
    cosine = np.divide(grads @ server, denominator, out=np.zeros(len(grads)), where=denominator > 0)
    trust = np.maximum(cosine, 0.0)
    if trust.sum() == 0:
        return np.zeros(grads.shape[1], dtype=np.float32), trust
    scaled = grads * (server_norm / np.where(norms > 0, norms, 1.0))[:, None]
    return (trust @ scaled / trust.sum()).astype(np.float32), trust


class FLTrust(PseudoGradientStrategy):
    """FLTrust: the server trains the global model on its small clean root dataset like a
    client; each update counts by its positive cosine with the server's update, scaled to
    the server update's norm.

    The server's update comes from ``root_update`` (the simulation's server application
    sets a :class:`~baselines.server_side.RootTrainer` on ``fltrust-root-size`` examples
    drawn with the run's seed from the training pool, never the test set). The paper's
    global learning rate ``alpha`` is ``server_learning_rate`` on the pseudo-gradients,
    which already hold the clients' learning rate (1 = the aggregate applied as is).
    Written from the paper's Algorithm 1 (no code by the authors was found to compare with).

    Parameters
    ----------
    root_update : RootUpdate, optional
        Set before the first round; a round without it raises ``RuntimeError``.
    server_learning_rate : float (default: 1.0)
        > 0.
    """

    def __init__(
        self, *, root_update: RootUpdate | None = None, server_learning_rate: float = 1.0, **fedavg_kwargs
    ) -> None:
        if not server_learning_rate > 0:
            raise ValueError(f"server_learning_rate must be > 0, got {server_learning_rate}")
        self.root_update = root_update
        self.server_learning_rate = server_learning_rate
        super().__init__(**fedavg_kwargs)

    def __repr__(self) -> str:
        return f"FLTrust(server_learning_rate={self.server_learning_rate}, root_update={self.root_update!r})"

    def server_step(self, updates: RoundUpdates) -> tuple[np.ndarray, dict[str, float | int]]:
        """The trust-weighted, norm-matched mean of the updates."""
        if self.root_update is None:
            raise RuntimeError("FLTrust needs the server's root-dataset update: set root_update")
        keys = list(self._global_arrays.keys())
        global_weights = [decode_array(self._global_arrays[key]) for key in keys]
        trained = self.root_update(updates.server_round, self._global_arrays)
        server_gradient = flat_pseudo_gradients(global_weights, [[trained[k].numpy() for k in keys]])[0]
        step, trust = fltrust_step(updates.pseudo_gradients, server_gradient)
        metrics = {
            "num_admitted": int(np.count_nonzero(trust)),
            "fltrust_server_norm": float(np.linalg.norm(server_gradient)),
            "fltrust_mean_trust": float(trust.mean()),
        }
        return self.server_learning_rate * step, metrics
