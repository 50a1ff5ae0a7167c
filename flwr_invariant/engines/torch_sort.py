"""The torch engine: :func:`flwr_invariant.aggregate.invariant_update` with ``torch.sort``.

Same algorithm and outputs (up to float rounding: torch averages the middle
values with its own summation order), run on a CUDA GPU when one is visible, else
on the CPU. Needs torch, which the plain install does not bring.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from ..aggregate import median_of, min_votes, trim_count
from ..extras import require
from .chunked import DEFAULT_CHUNK_BYTES

__all__ = ["cuda_available", "invariant_update"]


def cuda_available() -> bool:
    """Whether torch is importable and sees a CUDA device."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def invariant_update(
    global_weights: Sequence[np.ndarray],
    client_weights: Sequence[Sequence[np.ndarray]],
    *,
    tau: float,
    trim_ratio: float,
    server_learning_rate: float = 1.0,
    median_layers: Collection[int] = (),
    device: str | None = None,
    chunk_bytes: int = 64 * DEFAULT_CHUNK_BYTES,
) -> tuple[list[np.ndarray], float]:
    """:func:`flwr_invariant.aggregate.invariant_update` on torch: ``(new_weights, mask_fraction)``.

    ``device``: a torch device string; default ``"cuda"`` if available else ``"cpu"``.
    """
    torch = require("torch", "torch", 'backend="torch"')

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    num_clients = len(client_weights)
    trim = trim_count(num_clients, trim_ratio)
    votes_needed = min_votes(num_clients, tau)
    new_weights: list[np.ndarray] = []
    kept = total = 0
    for index, reference in enumerate(global_weights):
        layer = [weights[index] for weights in client_weights]
        if reference.dtype.kind != "f" or index in median_layers:
            new_weights.append(median_of(layer, reference.dtype))
            continue
        flat_ref = np.ravel(reference)
        out = np.empty_like(flat_ref)
        step = max(1, chunk_bytes // (num_clients * reference.dtype.itemsize))
        for start in range(0, flat_ref.size, step):
            window = slice(start, start + step)
            stacked = np.stack([np.ravel(a)[window] for a in layer]).astype(reference.dtype, copy=False)
            ref = torch.from_numpy(np.array(flat_ref[window])).to(device)
            values = ref - torch.from_numpy(stacked).to(device)
            mask = values.sign().sum(dim=0).abs() >= votes_needed
            middle = values.sort(dim=0).values[trim : num_clients - trim]
            mean = middle.double().mean(dim=0) * mask
            out[window] = (ref.double() - server_learning_rate * mean).cpu().numpy()
            kept += int(mask.sum())
        total += flat_ref.size
        new_weights.append(out.reshape(reference.shape))
    return new_weights, (kept / total if total else 1.0)
