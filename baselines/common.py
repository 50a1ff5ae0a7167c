"""Numpy helpers shared by the baselines: flat pseudo-gradients, one server step,
row clipping and pairwise distances."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flwr_invariant.aggregate import median_of

__all__ = ["apply_step", "clip_rows", "flat_pseudo_gradients", "pairwise_distances"]


def flat_pseudo_gradients(
    global_weights: Sequence[np.ndarray], updates: Sequence[Sequence[np.ndarray]]
) -> np.ndarray:
    """``g_i = w - w_i`` over the floating layers, flattened: shape ``(N, P)``, float32."""
    float_layers = [i for i, w in enumerate(global_weights) if w.dtype.kind == "f"]
    size = sum(global_weights[i].size for i in float_layers)
    stacked = np.empty((len(updates), size), dtype=np.float32)
    for row, update in zip(stacked, updates, strict=True):
        offset = 0
        for i in float_layers:
            n = global_weights[i].size
            np.subtract(np.ravel(global_weights[i]), np.ravel(update[i]), out=row[offset : offset + n])
            offset += n
    return stacked


def apply_step(
    global_weights: Sequence[np.ndarray], updates: Sequence[Sequence[np.ndarray]], step: np.ndarray
) -> list[np.ndarray]:
    """``w - step`` on the floating layers (``step``: flat, as ``flat_pseudo_gradients``);
    non-floating layers take the lower coordinate-wise median of the clients' values."""
    new_weights = []
    offset = 0
    for i, w in enumerate(global_weights):
        if w.dtype.kind == "f":
            layer_step = step[offset : offset + w.size].reshape(w.shape)
            new_weights.append((w - layer_step).astype(w.dtype))
            offset += w.size
        else:
            new_weights.append(median_of([u[i] for u in updates], w.dtype))
    return new_weights


def clip_rows(vectors: np.ndarray, max_norm: float) -> np.ndarray:
    """Each row scaled down to L2 norm at most ``max_norm``; ``(N, P)`` -> ``(N, P)``."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors * np.minimum(1.0, max_norm / np.maximum(norms, 1e-12))


def pairwise_distances(vectors: np.ndarray, metric: str) -> np.ndarray:
    """``(N, N)`` distances between rows: squared Euclidean, or ``1 - cosine similarity``."""
    vectors = np.asarray(vectors, dtype=np.float64)
    gram = vectors @ vectors.T
    squared_norms = np.diag(gram)
    if metric == "euclidean":
        return np.maximum(squared_norms[:, None] + squared_norms[None, :] - 2 * gram, 0.0)
    if metric == "cosine":
        norms = np.sqrt(squared_norms)
        denominator = np.outer(norms, norms)
        similarity = np.divide(gram, denominator, out=np.zeros_like(gram), where=denominator > 0)
        return 1.0 - similarity
    raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
