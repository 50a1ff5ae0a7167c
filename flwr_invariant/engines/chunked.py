"""The fast numpy engine: :func:`flwr_invariant.aggregate.invariant_update` in chunks and threads.

The updates are cut into cache-sized chunks of coordinates, which run in a thread pool
(numpy releases the GIL). Per chunk: the pseudo-gradients of every client (formed chunk by
chunk, never all at once), the sign votes (counted as bytes), the mask, and the trimmed
mean only where the mask keeps a coordinate, by the faster method of
:mod:`.middle_ranks` for the number of clients: a comparator network over client-major
rows for few clients, a sort of coordinate-major rows for many. With numba installed (the
``fast`` extra), a chunk of a layer whose updates share its dtype is one call of the
compiled step in :mod:`.compiled` instead.

All give the reference's weights bit for bit (the same values added in the same order),
for finite inputs (the strategies screen out others). One difference that compares equal:
where the mask drops a coordinate, the sort and compiled paths keep the global value
exactly, while the reference subtracts ``lr * (middle sum * 0)``, which turns a global
``-0.0`` into ``+0.0`` when that sum is negative.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from types import ModuleType

import numpy as np

from ..aggregate import median_of, min_votes, trim_count
from ..extras import require
from .middle_ranks import network_middle_sum, sorted_middle_sum, use_sort

__all__ = ["DEFAULT_CHUNK_BYTES", "METHODS", "invariant_aggregate", "invariant_update"]

# Bytes of client values held per chunk (N rows x chunk coordinates); fits in L2/L3.
DEFAULT_CHUNK_BYTES = 4 * 2**20

# How a chunk is aggregated: "auto" is "compiled" where numba is installed and it applies,
# else the faster of "network" and "sort" for the number of clients.
METHODS = ("auto", "network", "sort", "compiled")


@cache
def compiled_module() -> ModuleType | None:
    """:mod:`.compiled` if numba is installed, else ``None``."""
    if importlib.util.find_spec("numba") is None:
        return None
    from . import compiled

    return compiled


def invariant_aggregate(
    pseudo_gradients: Sequence[Sequence[np.ndarray]],
    tau: float,
    trim_ratio: float,
    *,
    num_threads: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    method: str = "auto",
) -> list[np.ndarray]:
    """:func:`flwr_invariant.aggregate.invariant_aggregate`, fast. Inputs are not modified."""
    layers = list(zip(*pseudo_gradients, strict=True))
    engine = _ChunkEngine(len(pseudo_gradients), tau, trim_ratio, num_threads, chunk_bytes, method)
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
    method: str = "auto",
) -> tuple[list[np.ndarray], float]:
    """:func:`flwr_invariant.aggregate.invariant_update`, fast: ``(new_weights, mask_fraction)``.

    ``num_threads``: default the CPU count, at most 8. ``method``: one of :data:`METHODS`
    (the results are the same). Inputs are not modified.
    """
    engine = _ChunkEngine(len(client_weights), tau, trim_ratio, num_threads, chunk_bytes, method)
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


class _ChunkEngine:
    """Runs masked trimmed means over chunks of layers in a thread pool."""

    def __init__(
        self,
        num_clients: int,
        tau: float,
        trim_ratio: float,
        num_threads: int | None,
        chunk_bytes: int,
        method: str,
    ) -> None:
        if num_clients < 1:
            raise ValueError("invariant aggregation needs at least one client update")
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
        self.num_clients = num_clients
        self.trim = trim_count(num_clients, trim_ratio)
        self.min_votes = min_votes(num_clients, tau)
        self.sort = use_sort(num_clients, self.trim) if method in ("auto", "compiled") else method == "sort"
        self.compiled = None
        if method == "compiled":
            require("numba", "fast", 'method="compiled"')
        if method in ("auto", "compiled"):
            self.compiled = compiled_module()
        # Sign counts add up as bytes up to 255 clients.
        self.count_dtype = np.min_scalar_type(num_clients)
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
        ``reference - client`` (clients read as the reference's dtype) and the result
        is ``reference - lr * aggregate``. Returns ``(result, kept_coordinates)`` per job.
        """
        tasks: list[tuple[Callable[..., int], tuple, int]] = []
        outputs = []
        for arrays, reference, learning_rate in jobs:
            template = reference if reference is not None else arrays[0]
            dtype = reference.dtype if reference is not None else np.result_type(*arrays)
            dtype = dtype if dtype.kind == "f" else np.dtype(np.float64)
            flats = [np.ravel(a) for a in arrays]
            flat_ref = None if reference is None else np.ravel(reference)
            out = np.empty(flats[0].size, dtype=dtype)
            outputs.append((out, template.shape))
            addresses = self._compiled_addresses(flats, flat_ref)
            step = self.step_for(dtype)
            for start in range(0, out.size, step):
                window = slice(start, min(start + step, out.size))
                if addresses is None:
                    run, args = self._run_chunk, (flats, flat_ref, learning_rate, out, window)
                else:
                    run, args = self._run_compiled, (addresses, flats, flat_ref, learning_rate, out, window)
                tasks.append((run, args, len(outputs) - 1))
        kept = [0] * len(outputs)
        if self.num_threads > 1 and len(tasks) > 1:
            with ThreadPoolExecutor(self.num_threads) as pool:
                counts = list(pool.map(lambda task: task[0](*task[1]), tasks))
        else:
            counts = [run(*args) for run, args, _ in tasks]
        for task, count in zip(tasks, counts, strict=True):
            kept[task[-1]] += count
        return [(out.reshape(shape), kept[i]) for i, (out, shape) in enumerate(outputs)]

    def _compiled_addresses(self, flats: list[np.ndarray], flat_ref: np.ndarray | None) -> np.ndarray | None:
        """The clients' data addresses if the compiled step applies to this layer, else ``None``."""
        if self.compiled is None or flat_ref is None or flat_ref.dtype not in (np.float32, np.float64):
            return None
        if not all(f.dtype == flat_ref.dtype and f.flags.c_contiguous for f in flats):
            return None
        return self.compiled.pointers(flats)

    def _run_compiled(
        self,
        addresses: np.ndarray,
        flats: list[np.ndarray],  # unused: held so that the addresses stay valid
        flat_ref: np.ndarray,
        learning_rate: float,
        out: np.ndarray,
        window: slice,
    ) -> int:
        low, high, kind = self.compiled.network_arrays(self.num_clients, self.trim)
        start, stop = window.start, window.stop
        votes, trim = self.min_votes, self.trim
        return self.compiled.update_window(
            flat_ref, addresses, start, stop, low, high, kind, trim, votes, learning_rate, out
        )

    def _scratch(self, dtype: np.dtype) -> threading.local:
        """This thread's reusable buffers, one chunk long.

        ``values``: ``N + 1`` rows of ``dtype`` (client values and a spare row);
        ``compact``: ``N`` rows for the masked values; ``signs``: ``N`` bool rows;
        ``counts``: positive and negative signs; ``votes``; ``kept``: the mask;
        ``sums``: 2 float64 rows.
        """
        key = np.dtype(dtype).str
        buffers = self._buffers
        if getattr(buffers, "key", None) != key:
            n, length = self.num_clients, self.step_for(dtype)
            buffers.key = key
            buffers.values = np.empty((n + 1, length), dtype=dtype)
            buffers.compact = None if self.sort else np.empty((n, length), dtype=dtype)
            buffers.signs = np.empty((n, length), dtype=np.bool_)
            buffers.counts = np.empty((2, length), dtype=self.count_dtype)
            buffers.votes = np.empty(length, dtype=np.int64)
            buffers.kept = np.empty(length, dtype=np.bool_)
            buffers.sums = np.empty((2, length), dtype=np.float64)
        return buffers

    def _run_chunk(
        self,
        flats: list[np.ndarray],
        flat_ref: np.ndarray | None,
        learning_rate: float,
        out: np.ndarray,
        window: slice,
    ) -> int:
        size = window.stop - window.start
        buffers = self._scratch(out.dtype)
        values = buffers.values[: self.num_clients, :size]
        if flat_ref is None:
            for row, flat in zip(values, flats, strict=True):
                row[...] = flat[window]
        else:
            ref = flat_ref[window]
            for row, flat in zip(values, flats, strict=True):
                np.subtract(ref, flat[window], out=row, dtype=out.dtype)
        mask = self._mask(values, buffers)
        kept = np.flatnonzero(mask)
        mean = buffers.sums[0, :size]
        if kept.size == size or (not self.sort and 4 * kept.size >= size):
            # For the network, gathering costs about as much as it saves at ~50% kept.
            np.multiply(self._middle_sum(values, buffers, mean), mask, out=mean)
        else:
            mean.fill(0.0)
            if kept.size:
                mean[kept] = self._middle_sum(values, buffers, buffers.sums[1, : kept.size], kept)
        mean /= self.num_clients - 2 * self.trim
        if flat_ref is None:
            out[window] = mean
        else:
            mean *= learning_rate
            np.subtract(flat_ref[window], mean, out=out[window], casting="same_kind")
        return int(kept.size)

    def _mask(self, values: np.ndarray, buffers: threading.local) -> np.ndarray:
        """The AND-mask of a chunk's ``(N, size)`` values: ``|#positive - #negative| >= min_votes``."""
        size = values.shape[1]
        signs, (positive, negative) = buffers.signs[:, :size], buffers.counts[:, :size]
        for compare, count in ((np.greater, positive), (np.less, negative)):
            compare(values, 0, out=signs)
            np.add.reduce(signs.view(np.uint8), axis=0, dtype=count.dtype, out=count)
        votes = np.subtract(positive, negative, out=buffers.votes[:size], dtype=np.int64)
        return np.greater_equal(np.abs(votes, out=votes), self.min_votes, out=buffers.kept[:size])

    def _middle_sum(
        self, values: np.ndarray, buffers: threading.local, total: np.ndarray, kept: np.ndarray | None = None
    ) -> np.ndarray:
        """Middle-rank sums of the ``(N, size)`` values (only the ``kept`` coordinates), into ``total``."""
        if self.sort:
            columns = np.ascontiguousarray(values.T) if kept is None else values[:, kept].T
            return sorted_middle_sum(columns, self.trim, total)
        if kept is None:
            rows = list(values)
        else:
            compact = buffers.compact[:, : kept.size]
            rows = [np.take(row, kept, out=c) for row, c in zip(values, compact, strict=True)]
        return network_middle_sum(rows, self.trim, buffers.values[self.num_clients, : total.size], total)
