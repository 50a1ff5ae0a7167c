"""The numpy engine's chunk step compiled with numba: the optional ``fast`` extra.

One call does, for a window of a layer's coordinates, what :mod:`.chunked` does in many
numpy calls: sign votes, mask, pseudo-gradients of the kept coordinates only, the pruned
comparator network of :mod:`.middle_ranks` over 64 coordinates at a time (vectorised
across coordinates, in L1 cache), and the middle-rank sums in float64 in rank order. It
runs without the GIL, so the engine's threads do not wait on each other. Same numbers as
:func:`flwr_invariant.aggregate.invariant_update` for finite inputs (a masked coordinate
keeps its global value exactly). Importing this module needs numba; :mod:`.chunked`
imports it only if numba is installed. No Flower import.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from .middle_ranks import comparator_network

__all__ = ["network_arrays", "pointers", "update_window"]

WINDOW = 1024  # coordinates read per client at a time: long contiguous reads
LANES = 64  # coordinates per pass of the network: every client's values stay in L1


def pointers(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The data addresses of C-contiguous arrays, as ``intp`` (the arrays must outlive their use)."""
    return np.array([a.__array_interface__["data"][0] for a in arrays], dtype=np.intp)


@cache
def network_arrays(num_values: int, trim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pruned network for ranks ``[trim, N - trim)`` as ``(low, high, kind)`` arrays.

    ``kind``: 1 keeps the minimum on ``low``, 2 the maximum on ``high``, 3 both.
    """
    network = comparator_network(num_values, tuple(range(trim, num_values - trim)))
    low = np.array([c[0] for c in network], dtype=np.intp)
    high = np.array([c[1] for c in network], dtype=np.intp)
    kind = np.array([c[2] + 2 * c[3] for c in network], dtype=np.int8)
    return low, high, kind


@intrinsic
def _as_pointer(typingctx, address, like):
    """``address`` as a pointer to values of ``like``'s dtype."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return types.CPointer(like.dtype)(address, like), codegen


@numba.njit(nogil=True, cache=True, boundscheck=False)
def update_window(reference, clients, start, stop, low, high, kind, trim, min_votes, lr, out):
    """``out[start:stop] = reference - lr * masked trimmed mean`` of ``reference - client``.

    ``reference``, ``out``: 1-D, one floating dtype; ``clients``: :func:`pointers` to N
    C-contiguous arrays of that dtype and size; ``low, high, kind``: :func:`network_arrays`.
    Returns the number of coordinates the mask kept.
    """
    n = clients.size
    size = reference.size
    values = np.zeros((n, WINDOW + LANES), dtype=reference.dtype)
    votes = np.empty(WINDOW, dtype=np.int32)
    kept_at = np.empty(WINDOW, dtype=np.intp)
    totals = np.empty(WINDOW, dtype=np.float64)
    divisor = n - 2 * trim
    kept = 0
    for first in range(start, stop, WINDOW):
        width = min(WINDOW, stop - first)
        ref = reference[first : first + width]
        votes[:width] = 0
        for i in range(n):
            client = numba.carray(_as_pointer(clients[i], reference), size)[first : first + width]
            for j in range(width):
                votes[j] += np.int32(client[j] < ref[j]) - np.int32(client[j] > ref[j])
        count = 0
        for j in range(width):
            out[first + j] = ref[j]
            if abs(votes[j]) >= min_votes:
                kept_at[count] = j
                count += 1
        kept += count
        for i in range(n):
            client = numba.carray(_as_pointer(clients[i], reference), size)[first : first + width]
            row = values[i]
            for k in range(count):
                row[k] = ref[kept_at[k]] - client[kept_at[k]]
        for lane in range(0, count, LANES):
            for c in range(low.size):
                a = values[low[c], lane : lane + LANES]
                b = values[high[c], lane : lane + LANES]
                if kind[c] == 3:
                    for j in range(LANES):
                        x, y = a[j], b[j]
                        a[j] = x if x < y else y
                        b[j] = y if x < y else x
                elif kind[c] == 1:
                    for j in range(LANES):
                        x, y = a[j], b[j]
                        a[j] = x if x < y else y
                else:
                    for j in range(LANES):
                        x, y = a[j], b[j]
                        b[j] = y if x < y else x
        totals[:count] = 0.0
        for rank in range(trim, n - trim):
            row = values[rank]
            for k in range(count):
                totals[k] += row[k]
        for k in range(count):
            out[first + kept_at[k]] = ref[kept_at[k]] - lr * (totals[k] / divisor)
    return kept
