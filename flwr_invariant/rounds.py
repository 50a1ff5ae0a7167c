"""The steps of one server round, in the order every strategy calls them.

1. :func:`screen_round`: check the decoded replies, log each excluded client by name;
2. the strategy aggregates the valid updates (its own code, e.g. ``InvariantConfig.aggregate``);
3. :func:`finish_round`: refuse a non-finite aggregate, merge the metrics, log the round.

No Flower import: messages go to the ``"flwr"`` logger, which is Flower's own.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .screening import Candidate, ScreenedUpdates, screen_updates

__all__ = ["RoundOutcome", "finish_round", "screen_round"]

LOGGER = logging.getLogger("flwr")


@dataclass
class RoundOutcome:
    """New global weights (``None``: keep the current ones) and the round's metrics.

    Metrics: ``num_aggregated``, ``num_excluded`` and the aggregation's own.
    """

    weights: list[np.ndarray] | None
    metrics: dict[str, float | int]


def screen_round(
    server_round: int, global_weights: Sequence[np.ndarray], candidates: Sequence[Candidate]
) -> ScreenedUpdates:
    """:func:`~flwr_invariant.screening.screen_updates`, with one warning per excluded client."""
    screened = screen_updates(global_weights, candidates)
    for label, reason in screened.excluded:
        LOGGER.warning("round %s: excluded the update of client %s: %s", server_round, label, reason)
    if not screened.updates:
        LOGGER.warning("round %s: no valid client update; the global model stays as it was", server_round)
    return screened


def finish_round(
    server_round: int,
    screened: ScreenedUpdates,
    weights: list[np.ndarray] | None,
    aggregate_metrics: Mapping[str, float | int],
) -> RoundOutcome:
    """The round's outcome from the aggregate of ``screened.updates`` (``None``: none was made).

    A missing or non-finite aggregate keeps the global model, with a log line saying why.
    """
    metrics: dict[str, float | int] = {
        "num_aggregated": len(screened.updates),
        "num_excluded": len(screened.excluded),
        **aggregate_metrics,
    }
    if weights is None:
        if screened.updates:
            LOGGER.warning(
                "round %s: the strategy produced no new weights; the global model stays", server_round
            )
        return RoundOutcome(None, metrics)
    if not all(np.isfinite(w).all() for w in weights if w.dtype.kind == "f"):
        LOGGER.error("round %s: the aggregate is not finite; the global model stays as it was", server_round)
        return RoundOutcome(None, metrics)
    LOGGER.info(
        "round %s: aggregated %d updates (%d excluded): %s",
        server_round,
        len(screened.updates),
        len(screened.excluded),
        ", ".join(f"{key}={value:.4g}" for key, value in aggregate_metrics.items()),
    )
    return RoundOutcome(weights, metrics)
