"""The Invariant Aggregator (Wang et al., AISTATS 2024, Algorithm 1), stated plainly in numpy.

This module is the reference a reader checks against the paper. The engines in
:mod:`flwr_invariant.engines` compute the same numbers fast and are tested against it.
No Flower import.

Clients return weights ``w_i``; their pseudo-gradients are ``g_i = w - w_i`` against
the global weights ``w``. Per coordinate:

1. sign votes: ``v = |sum_i sign(g_i)|``, with ``sign(0) = 0``;
2. AND-mask: keep the coordinate if ``v / N >= tau`` (compared in integers,
   ``v >= min_votes(N, tau)``, so no rounding decides it);
3. trimmed mean: drop ``b = trim_count(N, trim_ratio)`` values from each tail and
   average the ``N - 2b`` left (summed in float64, in rank order);
4. step: ``w' = w - server_learning_rate * mask * trimmed_mean``.

Arrays that are not trained weights take the lower coordinate-wise median of the
returned values instead: non-floating arrays (BatchNorm's ``num_batches_tracked``)
and the layers a caller names (BatchNorm running statistics, which have no gradient).

Shapes: a "stacked" array is ``(num_clients, *layer_shape)``; a model is a list of
layer arrays; ``client_weights[i][l]`` is client i's array for layer l.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import numpy as np

__all__ = [
    "and_mask",
    "coordinate_median",
    "invariant_aggregate",
    "invariant_update",
    "median_of",
    "min_votes",
    "pseudo_gradients",
    "sign_consistency",
    "sign_votes",
    "trim_count",
    "trimmed_mean",
]


def trim_count(num_values: int, trim_ratio: float) -> int:
    """Values dropped from each tail: ``ceil(trim_ratio * N)``, at most ``(N - 1) // 2``.

    The product is rounded to 9 decimals first so that e.g. ``0.1 * 30`` (which is
    ``3.0000000000000004`` in floating point) trims 3 values, not 4.
    """
    return min(math.ceil(round(trim_ratio * num_values, 9)), (num_values - 1) // 2)


def min_votes(num_clients: int, tau: float) -> int:
    """Smallest ``k`` with ``k / N >= tau``: the mask keeps ``|sum_i sign(g_i)| >= k``.

    ``N + 1`` means nothing passes.
    """
    return next((k for k in range(num_clients + 1) if k / num_clients >= tau), num_clients + 1)


def sign_votes(stacked: np.ndarray) -> np.ndarray:
    """``|sum_i sign(x_i)|`` per coordinate: whole numbers (as float64), shape ``stacked.shape[1:]``."""
    return np.abs(np.sign(stacked).sum(axis=0, dtype=np.float64))


def sign_consistency(stacked: np.ndarray) -> np.ndarray:
    """``|mean_i sign(x_i)|`` per coordinate, in ``[0, 1]``; float64 of shape ``stacked.shape[1:]``."""
    stacked = np.asarray(stacked)
    return sign_votes(stacked) / stacked.shape[0]


def and_mask(stacked: np.ndarray, tau: float) -> np.ndarray:
    """The AND-mask: bool, shape ``stacked.shape[1:]``, True where ``sign_consistency >= tau``."""
    stacked = np.asarray(stacked)
    return sign_votes(stacked) >= min_votes(stacked.shape[0], tau)


def trimmed_mean(stacked: np.ndarray, trim_ratio: float) -> np.ndarray:
    """Coordinate-wise trimmed mean (paper Def. 3) over axis 0, in the input's floating dtype.

    Sorts each coordinate, sums the values of ranks ``[b, N - b)`` in float64 in
    rank order, divides by ``N - 2b``. ``stacked``: ``(N, ...)``.
    """
    stacked = np.asarray(stacked)
    num_values = stacked.shape[0]
    trim = trim_count(num_values, trim_ratio)
    out_dtype = stacked.dtype if stacked.dtype.kind == "f" else np.dtype(np.float64)
    return (_middle_sum(stacked, trim) / (num_values - 2 * trim)).astype(out_dtype)


def _middle_sum(stacked: np.ndarray, trim: int) -> np.ndarray:
    """Sum of the values of ranks ``[trim, N - trim)`` per coordinate, float64, added in rank order."""
    ranked = np.sort(stacked, axis=0)[trim : stacked.shape[0] - trim]
    return sum(ranked.astype(np.float64), start=np.zeros(stacked.shape[1:]))


def coordinate_median(stacked: np.ndarray) -> np.ndarray:
    """Lower coordinate-wise median over axis 0, always one of the input values.

    Used for arrays that must never be masked, averaged or cast to float (e.g.
    BatchNorm's ``num_batches_tracked``). Shape ``stacked.shape[1:]``.
    """
    stacked = np.asarray(stacked)
    lower_middle = (stacked.shape[0] - 1) // 2
    return np.asarray(np.partition(stacked, lower_middle, axis=0)[lower_middle])


def median_of(arrays: Sequence[np.ndarray], dtype: np.dtype) -> np.ndarray:
    """:func:`coordinate_median` of the clients' arrays of one layer, read as ``dtype``."""
    return coordinate_median(np.stack([np.asarray(a, dtype=dtype) for a in arrays]))


def invariant_aggregate(
    pseudo_gradients: Sequence[Sequence[np.ndarray]], tau: float, trim_ratio: float
) -> list[np.ndarray]:
    """Per layer, ``where(and_mask(tau), trimmed_mean(trim_ratio), 0)`` of the clients' pseudo-gradients.

    ``pseudo_gradients[i][l]`` is client i's array for layer l. Returns the layer
    shapes in their floating dtype (float64 for integer input).
    """
    aggregates = []
    for layer in zip(*pseudo_gradients, strict=True):
        stacked = np.stack([np.asarray(g) for g in layer])
        mean = trimmed_mean(stacked, trim_ratio)
        aggregates.append(np.where(and_mask(stacked, tau), mean, np.zeros_like(mean)))
    return aggregates


def pseudo_gradients(w: np.ndarray, layer: Sequence[np.ndarray]) -> np.ndarray:
    """``(N, *w.shape)``: ``w - w_i`` for each client's array ``w_i``, read as ``w``'s dtype."""
    stacked = np.empty((len(layer), *w.shape), dtype=w.dtype)
    for row, w_i in zip(stacked, layer, strict=True):  # into place: np.stack would copy each row again
        np.subtract(w, np.asarray(w_i, dtype=w.dtype), out=row)
    return stacked


def invariant_update(
    global_weights: Sequence[np.ndarray],
    client_weights: Sequence[Sequence[np.ndarray]],
    *,
    tau: float,
    trim_ratio: float,
    server_learning_rate: float = 1.0,
    median_layers: Collection[int] = (),
) -> tuple[list[np.ndarray], float]:
    """One server step of Algorithm 1 from the clients' returned weights (the reference engine).

    Returns the new weights (dtypes and shapes of ``global_weights``) and the mask
    fraction: kept coordinates / all coordinates of the masked layers (1.0 if
    there are none). ``median_layers``: indices of floating layers that take the
    coordinate-wise median instead. Inputs are not modified.
    """
    if not client_weights:
        raise ValueError("invariant aggregation needs at least one client update")
    new_weights: list[np.ndarray] = []
    kept = total = 0
    for index, w in enumerate(global_weights):
        layer = [weights[index] for weights in client_weights]
        if w.dtype.kind != "f" or index in median_layers:
            new_weights.append(median_of(layer, w.dtype))
            continue
        stacked = pseudo_gradients(w, layer)
        mask = and_mask(stacked, tau)
        trim = trim_count(len(layer), trim_ratio)
        step = _middle_sum(stacked, trim) * mask / (len(layer) - 2 * trim)
        new_weights.append((w - server_learning_rate * step).astype(w.dtype))
        kept += int(mask.sum())
        total += mask.size
    return new_weights, (kept / total if total else 1.0)
