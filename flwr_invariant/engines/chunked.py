"""The fast numpy engine: :func:`flwr_invariant.aggregate.invariant_update` in chunks and threads.

The trimmed mean needs, per coordinate, the values of ranks ``[b, N - b)``.
``np.partition`` / ``np.sort`` over millions of tiny columns cost seconds, so the
values are instead pushed through a min/max comparator network (Batcher's
odd-even merge sort, pruned to the ranks we need) whose every comparator is one
vectorised ``np.minimum`` / ``np.maximum`` over a cache-sized chunk of
coordinates. Chunks run in a thread pool (numpy ufuncs release the GIL).
Pseudo-gradients are formed chunk by chunk, never all at once.

Results equal the reference's bit for bit when ``trim_count > 0`` (the same values
summed in the same order); with no trimming the sum runs in client order, so the
last bits may differ.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np

from ..aggregate import median_of, min_votes, trim_count

__all__ = ["DEFAULT_CHUNK_BYTES", "invariant_aggregate", "invariant_update"]

# Bytes of client values held per chunk (N rows x chunk coordinates); fits in L2/L3.
DEFAULT_CHUNK_BYTES = 4 * 2**20


def invariant_aggregate(
    pseudo_gradients: Sequence[Sequence[np.ndarray]],
    tau: float,
    trim_ratio: float,
    *,
    num_threads: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> list[np.ndarray]:
    """:func:`flwr_invariant.aggregate.invariant_aggregate`, fast. Inputs are not modified."""
    layers = list(zip(*pseudo_gradients, strict=True))
    engine = _ChunkEngine(len(pseudo_gradients), tau, trim_ratio, num_threads, chunk_bytes)
    results = engine.run([(list(layer), None, 0.0) for layer in layers])
    return [aggregate for aggregate, _ in results]


def invariant_update(
    global_weights: Sequence[np.ndarray],
    client_weights: Sequence[Sequence[np.ndarray]],
    *,
    tau: float,
    trim_ratio: float,
    server_learning_rate: float = 1.0,
    median_layers: Collection[int] = (),
    num_threads: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[list[np.ndarray], float]:
    """:func:`flwr_invariant.aggregate.invariant_update`, fast: ``(new_weights, mask_fraction)``.

    ``num_threads``: default the CPU count, at most 8. Inputs are not modified.
    """
    engine = _ChunkEngine(len(client_weights), tau, trim_ratio, num_threads, chunk_bytes)
    float_jobs = []
    new_weights: list[np.ndarray | None] = []
    for index, reference in enumerate(global_weights):
        layer = [weights[index] for weights in client_weights]
        if reference.dtype.kind == "f" and index not in median_layers:
            float_jobs.append((layer, reference, server_learning_rate))
            new_weights.append(None)
        else:
            new_weights.append(median_of(layer, reference.dtype))
    float_results = iter(engine.run(float_jobs))
    kept = total = 0
    for index, weights in enumerate(new_weights):
        if weights is None:
            new_weights[index], layer_kept = next(float_results)
            kept += layer_kept
            total += new_weights[index].size
    return new_weights, (kept / total if total else 1.0)


@lru_cache(maxsize=256)
def _comparator_network(num_values: int, wanted: tuple[int, ...]) -> tuple:
    """Batcher odd-even merge sort comparators on ``num_values`` wires, pruned.

    Returns ``(low, high, need_min, need_max)`` tuples in execution order: only
    comparators that can influence the wires in ``wanted`` are kept, and each does
    only the half (min to ``low``, max to ``high``) that is used later.
    """
    padded = 1 << max(num_values - 1, 0).bit_length()
    comparators = []
    block = 1
    while block < padded:
        step = block
        while step >= 1:
            for start in range(step % block, padded - step, 2 * step):
                for offset in range(min(step, padded - start - step)):
                    low, high = offset + start, offset + start + step
                    # Wires >= num_values hold +inf: comparators touching them are no-ops.
                    if low // (2 * block) == high // (2 * block) and high < num_values:
                        comparators.append((low, high))
            step //= 2
        block *= 2
    needed = set(wanted)
    pruned = []
    for low, high in reversed(comparators):
        need_min, need_max = low in needed, high in needed
        if need_min or need_max:
            pruned.append((low, high, need_min, need_max))
            needed.update((low, high))
    return tuple(reversed(pruned))


def _middle_sum(rows: list[np.ndarray], trim: int, scratch: np.ndarray, total: np.ndarray) -> np.ndarray:
    """Sum over the values of ranks ``[trim, N - trim)`` per coordinate, into ``total``.

    ``rows``: N equal-length 1-D arrays, one per client, and ``scratch`` one more
    of the same length; all are overwritten. ``total``: float64, same length.
    """
    num_values = len(rows)
    wanted = tuple(range(trim, num_values - trim))
    if trim:
        for low, high, need_min, need_max in _comparator_network(num_values, wanted):
            if need_min and need_max:
                np.minimum(rows[low], rows[high], out=scratch)
                np.maximum(rows[low], rows[high], out=rows[high])
                rows[low], scratch = scratch, rows[low]
            elif need_min:
                np.minimum(rows[low], rows[high], out=rows[low])
            else:
                np.maximum(rows[low], rows[high], out=rows[high])
    total[:] = rows[wanted[0]]
    for rank in wanted[1:]:
        total += rows[rank]
    return total


class _ChunkEngine:
    """Runs masked trimmed means over chunks of layers in a thread pool."""

    def __init__(
        self,
        num_clients: int,
        tau: float,
        trim_ratio: float,
        num_threads: int | None,
        chunk_bytes: int,
    ) -> None:
        if num_clients < 1:
            raise ValueError("invariant aggregation needs at least one client update")
        self.num_clients = num_clients
        self.trim = trim_count(num_clients, trim_ratio)
        self.min_votes = min_votes(num_clients, tau)
        self.num_threads = num_threads or min(os.cpu_count() or 1, 8)
        self.chunk_bytes = chunk_bytes
        # Each thread reuses its buffers: fresh chunk-sized arrays cost an mmap and
        # page faults apiece, which took longer than the arithmetic on them.
        self._buffers = threading.local()

    def step_for(self, dtype: np.dtype) -> int:
        """Coordinates per chunk for values of ``dtype``."""
        return max(1, self.chunk_bytes // (self.num_clients * np.dtype(dtype).itemsize))

    def run(
        self, jobs: list[tuple[list[np.ndarray], np.ndarray | None, float]]
    ) -> list[tuple[np.ndarray, int]]:
        """Each job is ``(client_arrays, reference, learning_rate)``.

        Without a reference the client arrays are the pseudo-gradients and the
        result is the masked trimmed mean; with one, values are
        ``reference - client`` and the result is ``reference - lr * aggregate``.
        Returns ``(result, kept_coordinates)`` per job.
        """
        tasks = []
        outputs = []
        for arrays, reference, learning_rate in jobs:
            template = reference if reference is not None else arrays[0]
            dtype = template.dtype if template.dtype.kind == "f" else np.dtype(np.float64)
            flats = [np.ravel(a) for a in arrays]
            flat_ref = None if reference is None else np.ravel(reference)
            out = np.empty(flats[0].size, dtype=dtype)
            outputs.append((out, template.shape))
            step = self.step_for(dtype)
            for start in range(0, out.size, step):
                window = slice(start, min(start + step, out.size))
                tasks.append((flats, flat_ref, learning_rate, out, window, len(outputs) - 1))
        kept = [0] * len(outputs)
        if self.num_threads > 1 and len(tasks) > 1:
            with ThreadPoolExecutor(self.num_threads) as pool:
                counts = list(pool.map(self._run_chunk, tasks))
        else:
            counts = [self._run_chunk(task) for task in tasks]
        for task, count in zip(tasks, counts, strict=True):
            kept[task[-1]] += count
        return [(out.reshape(shape), kept[i]) for i, (out, shape) in enumerate(outputs)]

    def _scratch(self, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """This thread's reusable buffers, one chunk long.

        ``values``: ``2N + 2`` rows of ``dtype`` (client values, their masked
        compaction, a spare row, the votes); ``sums``: 2 float64 rows.
        """
        key = np.dtype(dtype).str
        if getattr(self._buffers, "key", None) != key:
            length = self.step_for(dtype)
            self._buffers.key = key
            self._buffers.values = np.empty((2 * self.num_clients + 2, length), dtype=dtype)
            self._buffers.sums = np.empty((2, length), dtype=np.float64)
        return self._buffers.values, self._buffers.sums

    def _run_chunk(self, task: tuple) -> int:
        flats, flat_ref, learning_rate, out, window, _ = task
        size = window.stop - window.start
        values, sums = self._scratch(out.dtype)
        n = self.num_clients
        rows, compact = list(values[:n, :size]), list(values[n : 2 * n])
        spare, votes = values[2 * n, :size], values[2 * n + 1, :size]
        for row, flat in zip(rows, flats, strict=True):
            if flat_ref is None:
                row[:] = flat[window]
            else:
                np.subtract(flat_ref[window], flat[window], out=row)
        votes.fill(0)
        for row in rows:
            np.sign(row, out=spare)
            votes += spare
        mask = np.abs(votes, out=votes) >= self.min_votes
        kept = np.flatnonzero(mask)
        mean = sums[1, :size]
        if 4 * kept.size < size:  # gathering costs about as much as the network saves at ~50%
            # The trimmed mean only matters where the mask keeps a coordinate.
            mean.fill(0.0)
            if kept.size:
                dense = [np.take(row, kept, out=c[: kept.size]) for row, c in zip(rows, compact, strict=True)]
                mean[kept] = _middle_sum(dense, self.trim, spare[: kept.size], sums[0, : kept.size])
        else:
            np.multiply(_middle_sum(rows, self.trim, spare, sums[0, :size]), mask, out=mean)
        mean /= n - 2 * self.trim
        if flat_ref is None:
            out[window] = mean
        else:
            mean *= learning_rate
            np.subtract(flat_ref[window], mean, out=out[window], casting="same_kind")
        return int(kept.size)
