"""FLAME (Nguyen et al., "FLAME: Taming Backdoors in Federated Learning", USENIX Security 2022)."""

from __future__ import annotations

import numpy as np

from flwr_invariant.extras import require

from .common import pairwise_distances
from .numpy_strategy import PseudoGradientStrategy, RoundUpdates

__all__ = ["FLAME", "flame_admitted", "flame_step"]


def flame_admitted(models: np.ndarray) -> np.ndarray:
    """Indices of the models in the largest HDBSCAN cluster of cosine distances.

    ``models``: ``(N, P)``. HDBSCAN with ``min_cluster_size = N // 2 + 1`` (the
    paper's majority assumption) and ``min_samples = 1``; models marked as noise
    are rejected. With fewer than 3 models every one is admitted.
    """
    count = len(models)
    if count < 3:
        return np.arange(count)
    distances = pairwise_distances(models, "cosine")
    hdbscan = require("sklearn.cluster", "simulation", "the FLAME baseline").HDBSCAN
    labels = hdbscan(
        min_cluster_size=count // 2 + 1,
        min_samples=1,
        metric="precomputed",
        allow_single_cluster=True,
        copy=True,  # scikit-learn 1.9 warns unless set; the default becomes True in 1.10
    ).fit_predict(np.maximum(distances, 0.0))
    clustered = labels[labels >= 0]
    if clustered.size == 0:
        return np.arange(count)
    return np.flatnonzero(labels == np.bincount(clustered).argmax())


def flame_step(
    pseudo_gradients: np.ndarray, global_flat: np.ndarray, noise_lambda: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, float]:
    """FLAME's filter, adaptive clipping and noise on one round's updates.

    Clusters the local models ``w - g_i``, clips each admitted update to the
    median update norm ``S`` over all clients, averages them and adds Gaussian
    noise of std ``noise_lambda * S``. Returns the step (``(P,)``), the
    admitted indices and ``S``.
    """
    admitted = flame_admitted(global_flat[None, :] - pseudo_gradients)
    norms = np.linalg.norm(pseudo_gradients, axis=1)
    clip_bound = float(np.median(norms))
    scales = np.minimum(1.0, clip_bound / np.maximum(norms[admitted], 1e-12))
    step = (scales[:, None] * pseudo_gradients[admitted]).mean(axis=0)
    noise = rng.normal(0.0, noise_lambda * clip_bound, size=step.shape).astype(step.dtype)
    return step + noise, admitted, clip_bound


class FLAME(PseudoGradientStrategy):
    """FLAME: cluster out outlying models, clip to the median norm, add noise.

    Parameters (the paper's defaults)
    ----------
    noise_lambda : float (default: 0.001)
        Noise level lambda; the paper uses 0.001 for image classification and
        0.01 for NLP. The noise std is ``lambda * S`` with ``S`` the median norm.
    seed : int, optional
        Seed of the server's noise generator.
    """

    #: Attributes that carry across rounds (saved in a round checkpoint): the noise generator.
    carried_state = ("rng",)

    def __init__(self, *, noise_lambda: float = 0.001, seed: int | None = None, **fedavg_kwargs):
        if noise_lambda < 0:
            raise ValueError(f"noise_lambda must be >= 0, got {noise_lambda}")
        self.noise_lambda = noise_lambda
        self.rng = np.random.default_rng(seed)
        super().__init__(**fedavg_kwargs)

    def server_step(self, updates: RoundUpdates) -> tuple[np.ndarray, dict[str, float | int]]:
        """FLAME's step on this round's updates."""
        step, admitted, clip_bound = flame_step(
            updates.pseudo_gradients, updates.global_flat, self.noise_lambda, self.rng
        )
        return step, {"num_admitted": int(len(admitted)), "clip_bound": clip_bound}
