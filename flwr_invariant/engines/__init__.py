"""Engines: implementations of :func:`flwr_invariant.aggregate.invariant_update`, one signature.

Every engine is called as ``engine(global_weights, client_weights, *, tau,
trim_ratio, server_learning_rate=1.0, median_layers=())`` and returns
``(new_weights, mask_fraction)``; each is tested against the reference.

- ``"numpy"`` (the default): :mod:`.chunked`, cache-sized chunks in threads; the middle ranks by a
  comparator network for few clients, by sorting each coordinate's values for many
  (:mod:`.middle_ranks`); with numba installed (the ``fast`` extra), one compiled call per chunk
  (:mod:`.compiled`);
- ``"torch"``: :mod:`.torch_sort`, ``torch.sort`` on a CUDA GPU, else the CPU (needs the
  ``torch`` extra; selecting it without torch raises ``ImportError`` naming the extra);
- ``"auto"``: torch on a CUDA GPU when there is one, numpy otherwise;
- ``"reference"``: :func:`flwr_invariant.aggregate.invariant_update` itself (slow; for checking).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

from .. import aggregate
from ..extras import require
from . import chunked

__all__ = ["BACKENDS", "Engine", "select_engine"]

BACKENDS = ("numpy", "torch", "auto", "reference")

Engine = Callable[..., tuple[list[np.ndarray], float]]


def select_engine(backend: str, num_threads: int | None = None) -> Engine:
    """The engine named by ``backend`` (see the module docstring); ``num_threads`` is numpy's."""
    if backend == "reference":
        return aggregate.invariant_update
    if backend in ("torch", "auto"):
        from . import torch_sort

        if backend == "torch":
            require("torch", "torch", 'backend="torch"')
            return torch_sort.invariant_update
        if torch_sort.cuda_available():
            return torch_sort.invariant_update
    if backend in ("numpy", "auto"):
        return partial(chunked.invariant_update, num_threads=num_threads)
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
