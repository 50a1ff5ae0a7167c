"""One server round: screen client updates, aggregate the valid ones, report.

Shared by both strategy adapters and the numpy baselines.

No Flower import: messages go to the ``"flwr"`` logger, which is Flower's own.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from .aggregate import invariant_update, trim_count
from .updates import screen_updates

__all__ = [
    "BACKENDS",
    "Aggregator",
    "InvariantConfig",
    "InvariantSettings",
    "RoundOutcome",
    "aggregate_round",
    "report_excluded",
]

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

    def aggregate(
        self,
        global_weights: Sequence[np.ndarray],
        updates: list[list[np.ndarray]],
        labels: list[str],
        median_layers: Collection[int] = (),
    ) -> tuple[list[np.ndarray], dict[str, float | int]]:
        """An :data:`Aggregator`: one invariant step; metrics ``mask_fraction``, ``trim_count``.

        ``median_layers``: indices aggregated by coordinate-wise median instead.
        """
        weights, mask_fraction = self.update_fn()(
            global_weights,
            updates,
            tau=self.tau,
            trim_ratio=self.trim_ratio,
            server_learning_rate=self.server_learning_rate,
            median_layers=median_layers,
        )
        trimmed = trim_count(len(updates), self.trim_ratio)
        return weights, {"mask_fraction": mask_fraction, "trim_count": trimmed}


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


# (global_weights, valid client updates, their labels) -> (new weights or None, metrics)
Aggregator = Callable[
    [Sequence[np.ndarray], list[list[np.ndarray]], list[str]],
    tuple[list[np.ndarray] | None, dict[str, float | int]],
]


def report_excluded(server_round: int, excluded: Iterable[tuple[str, str]]) -> None:
    """One warning per excluded update, naming the client and the reason."""
    for label, reason in excluded:
        LOGGER.warning("round %s: excluded the update of client %s: %s", server_round, label, reason)


def aggregate_round(
    server_round: int,
    global_weights: Sequence[np.ndarray],
    candidates: Iterable[tuple[str, Callable[[], Sequence[np.ndarray]]]],
    aggregate: Aggregator,
) -> RoundOutcome:
    """Screen the candidates, aggregate the valid ones, report what was excluded.

    ``candidates``: ``(client_label, decode)`` pairs, ``decode()`` giving that
    client's arrays in the global model's order. Metrics: ``num_excluded``,
    ``num_aggregated`` and those of ``aggregate``. No new weights when no update
    is valid or the aggregate is not finite.
    """
    candidates = list(candidates)
    screened = screen_updates(global_weights, candidates)
    report_excluded(server_round, screened.excluded)
    metrics: dict[str, float | int] = {
        "num_aggregated": len(screened.updates),
        "num_excluded": len(screened.excluded),
    }
    if not screened.updates:
        LOGGER.warning("round %s: no valid client update; the global model stays as it was", server_round)
        return RoundOutcome(None, metrics, screened.accepted, screened.excluded)
    labels = [candidates[i][0] for i in screened.accepted]
    weights, aggregate_metrics = aggregate(global_weights, screened.updates, labels)
    metrics.update(aggregate_metrics)
    if weights is None:
        LOGGER.warning("round %s: the strategy produced no new weights; the global model stays", server_round)
        return RoundOutcome(None, metrics, screened.accepted, screened.excluded)
    if not all(np.isfinite(w).all() for w in weights if w.dtype.kind == "f"):
        LOGGER.error("round %s: the aggregate is not finite; the global model stays as it was", server_round)
        return RoundOutcome(None, metrics, screened.accepted, screened.excluded)
    LOGGER.info(
        "round %s: aggregated %d updates (%d excluded): %s",
        server_round,
        len(screened.updates),
        len(screened.excluded),
        ", ".join(f"{key}={value:.4g}" for key, value in aggregate_metrics.items()),
    )
    return RoundOutcome(weights, metrics, screened.accepted, screened.excluded)
