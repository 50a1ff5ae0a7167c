"""One server round of invariant aggregation, shared by both strategy adapters.

No Flower import: messages go to the ``"flwr"`` logger, which is Flower's own.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from .aggregate import invariant_update, trim_count
from .updates import screen_updates

__all__ = ["BACKENDS", "InvariantConfig", "InvariantSettings", "RoundOutcome", "aggregate_round"]

LOGGER = logging.getLogger("flwr")
BACKENDS = ("numpy", "torch", "auto")


@dataclass(frozen=True)
class InvariantConfig:
    """Settings of the Invariant Aggregator; invalid values raise ``ValueError``.

    tau: sign-consistency threshold of the AND-mask, in [0, 1].
    trim_ratio: fraction trimmed from each tail of every coordinate, in [0, 0.5).
    server_learning_rate: step along the aggregated pseudo-gradient, > 0.
    backend: "numpy"; "torch" (CUDA if visible, else CPU); "auto" (torch on a
        CUDA GPU when there is one, numpy otherwise).
    num_threads: threads of the numpy backend (default: CPU count, at most 8).
    """

    tau: float = 0.6
    trim_ratio: float = 0.45
    server_learning_rate: float = 1.0
    backend: str = "numpy"
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1], got {self.tau!r}")
        if not 0.0 <= self.trim_ratio < 0.5:
            raise ValueError(f"trim_ratio must be in [0, 0.5), got {self.trim_ratio!r}")
        if not (math.isfinite(self.server_learning_rate) and self.server_learning_rate > 0):
            raise ValueError(
                f"server_learning_rate must be a finite number > 0, got {self.server_learning_rate!r}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {self.num_threads!r}")

    def update_fn(self) -> Callable[..., tuple[list[np.ndarray], float]]:
        """The ``invariant_update`` implementation this config selects."""
        from .torch_backend import cuda_available, invariant_update_torch

        if self.backend == "torch" or (self.backend == "auto" and cuda_available()):
            return invariant_update_torch
        return partial(invariant_update, num_threads=self.num_threads)


class InvariantSettings:
    """Mixin for a Flower strategy class: the Invariant Aggregator's keyword arguments.

    Put it before the Flower base class; every other keyword argument goes to
    the base class unchanged.
    """

    def __init__(
        self,
        *,
        tau: float = 0.6,
        trim_ratio: float = 0.45,
        server_learning_rate: float = 1.0,
        backend: str = "numpy",
        num_threads: int | None = None,
        **strategy_kwargs: Any,
    ) -> None:
        self.invariant_config = InvariantConfig(tau, trim_ratio, server_learning_rate, backend, num_threads)
        super().__init__(**strategy_kwargs)

    def settings_repr(self) -> str:
        """``tau=..., trim_ratio=..., server_learning_rate=...`` for ``__repr__``."""
        config = self.invariant_config
        return (
            f"tau={config.tau}, trim_ratio={config.trim_ratio}, "
            f"server_learning_rate={config.server_learning_rate}"
        )


@dataclass
class RoundOutcome:
    """New global weights (``None``: keep the current ones) and round metrics.

    ``accepted``: indices of the candidates that were aggregated; ``excluded``:
    ``(client_label, reason)`` of the others.
    """

    weights: list[np.ndarray] | None
    metrics: dict[str, float | int]
    accepted: list[int]
    excluded: list[tuple[str, str]]


def aggregate_round(
    server_round: int,
    global_weights: Sequence[np.ndarray],
    candidates: Iterable[tuple[str, Callable[[], Sequence[np.ndarray]]]],
    config: InvariantConfig,
) -> RoundOutcome:
    """Screen the candidates, aggregate the valid ones, report what was excluded.

    ``candidates``: ``(client_label, decode)`` pairs, ``decode()`` giving that
    client's arrays in the global model's order. Metrics: ``mask_fraction``,
    ``num_excluded``, ``num_aggregated``, ``trim_count``.
    """
    screened = screen_updates(global_weights, candidates)
    for label, reason in screened.excluded:
        LOGGER.warning("round %s: excluded the update of client %s: %s", server_round, label, reason)
    num_valid = len(screened.updates)
    metrics: dict[str, float | int] = {
        "num_aggregated": num_valid,
        "num_excluded": len(screened.excluded),
        "mask_fraction": 0.0,
        "trim_count": trim_count(num_valid, config.trim_ratio) if num_valid else 0,
    }
    if not num_valid:
        LOGGER.warning("round %s: no valid client update; the global model stays as it was", server_round)
        return RoundOutcome(None, metrics, screened.accepted, screened.excluded)
    weights, mask_fraction = config.update_fn()(
        global_weights,
        screened.updates,
        tau=config.tau,
        trim_ratio=config.trim_ratio,
        server_learning_rate=config.server_learning_rate,
    )
    if not all(np.isfinite(w).all() for w in weights if w.dtype.kind == "f"):
        LOGGER.error(
            "round %s: the aggregate overflowed to Inf (server_learning_rate=%s); "
            "the global model stays as it was",
            server_round,
            config.server_learning_rate,
        )
        return RoundOutcome(None, metrics, screened.accepted, screened.excluded)
    metrics["mask_fraction"] = mask_fraction
    LOGGER.info(
        "round %s: invariant aggregation of %d updates (%d excluded), mask kept %.1f%% of coordinates",
        server_round,
        num_valid,
        len(screened.excluded),
        100 * mask_fraction,
    )
    return RoundOutcome(weights, metrics, screened.accepted, screened.excluded)
