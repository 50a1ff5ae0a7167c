"""Message API: screen training replies before any strategy aggregates them.

``ScreenedReplies`` is a mixin for any ``flwr.serverapp.strategy`` strategy
(put it first in the bases): replies with errors are counted, replies whose
arrays are malformed (wrong keys, count, shape or dtype, NaN/Inf, not ``.npy``)
are excluded with a warning naming the node, and only the rest reach the
strategy's own ``aggregate_train``. A numpy strategy overrides
``aggregate_updates`` instead and never sees a ``Message``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from logging import ERROR, INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.logger import log
from flwr.serverapp import Grid

from .rounds import finish_round, screen_round
from .screening import decode_candidate, decode_npy

__all__ = ["ScreenedReplies", "decode_array", "reply_arrays"]


def _error_source(message: Message) -> str:
    # Flower answers for an unreachable node with the SuperLink's own id as the sender.
    if message.metadata.src_node_id == SUPERLINK_NODE_ID:
        return "the SuperLink replied with an error for a node it could not reach"
    return f"node {message.metadata.src_node_id} replied with an error"


def decode_array(array: Array) -> np.ndarray:
    """Read-only numpy view of a Flower ``Array`` (``ValueError`` if not ``.npy``)."""
    if array.stype != "numpy.ndarray":
        raise ValueError(f"array serialised as {array.stype!r}, not 'numpy.ndarray'")
    return decode_npy(array.data)


def reply_arrays(message: Message, keys: Sequence[str], weighted_by_key: str) -> list[np.ndarray]:
    """A training reply's arrays in the order of ``keys``; ``ValueError`` if malformed.

    The reply must hold one ``ArrayRecord`` with exactly ``keys`` and one
    ``MetricRecord`` with a positive number under ``weighted_by_key`` (a zero or
    negative count would break the weighted metrics of the whole round).
    """
    content = message.content
    if len(content.array_records) != 1:
        raise ValueError(f"sent {len(content.array_records)} ArrayRecords, expected 1")
    if len(content.metric_records) != 1:
        raise ValueError(f"sent {len(content.metric_records)} MetricRecords, expected 1")
    weight = next(iter(content.metric_records.values())).get(weighted_by_key)
    if not isinstance(weight, int | float):
        raise ValueError(f"its MetricRecord has no number under {weighted_by_key!r}")
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"its {weighted_by_key!r} is {weight!r}; it must be a positive number")
    record = next(iter(content.array_records.values()))
    if len(record) != len(keys):
        raise ValueError(f"sent {len(record)} arrays, the global model has {len(keys)}")
    missing = [key for key in keys if key not in record]
    if missing:
        raise ValueError(f"its arrays lack the global model's keys {missing[:5]}")
    return [decode_array(record[key]) for key in keys]


class ScreenedReplies:
    """Mixin: exclude and report bad training replies, then aggregate the rest.

    Adds to the returned ``MetricRecord``: ``num_aggregated``, ``num_excluded``,
    ``num_failures`` (error replies). Requires ``weighted_by_key`` (every
    Flower ``FedAvg``-based strategy has it; a wrapper should set it).
    """

    _global_arrays: ArrayRecord | None = None
    weighted_by_key: str = "num-examples"

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global arrays sent this round, then configure as the base does."""
        self._global_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen the replies, aggregate the valid ones with ``aggregate_updates``, report."""
        replies = list(replies)
        answered = [msg for msg in replies if not msg.has_error()]
        for msg in replies:
            if msg.has_error():
                log(INFO, "round %s: %s: %s", server_round, _error_source(msg), msg.error.reason)
        if not answered:
            return None, None
        if self._global_arrays is None:
            log(ERROR, "aggregate_train: configure_train never ran, so the global arrays are unknown")
            return None, None
        keys = list(self._global_arrays.keys())
        global_weights = [decode_array(self._global_arrays[key]) for key in keys]
        candidates = [
            decode_candidate(
                f"node {msg.metadata.src_node_id}", reply_arrays, msg, keys, self.weighted_by_key
            )
            for msg in answered
        ]
        screened = screen_round(server_round, global_weights, candidates)
        weights, aggregate_metrics = None, {}
        if screened.updates:
            valid = [answered[i] for i in screened.accepted]
            weights, aggregate_metrics = self.aggregate_updates(
                server_round, global_weights, screened.updates, valid
            )
        outcome = finish_round(server_round, screened, weights, aggregate_metrics)
        metrics = MetricRecord({**outcome.metrics, "num_failures": len(replies) - len(answered)})
        if outcome.weights is None:
            return None, metrics
        return ArrayRecord({key: Array(w) for key, w in zip(keys, outcome.weights, strict=True)}), metrics

    def aggregate_updates(
        self,
        server_round: int,
        global_weights: list[np.ndarray],
        updates: list[list[np.ndarray]],
        messages: list[Message],
    ) -> tuple[list[np.ndarray] | None, dict[str, float | int]]:
        """New weights and metrics from the valid replies (``updates[i]`` is ``messages[i]``'s).

        By default, the base strategy's own ``aggregate_train`` on the valid
        messages; a numpy strategy overrides this and uses ``updates``.
        """
        arrays, metrics = super().aggregate_train(server_round, messages)
        if arrays is None:
            return None, dict(metrics or {})
        return [arrays[key].numpy() for key in self._global_arrays], dict(metrics or {})

    def train_metrics(self, messages: list[Message]) -> dict[str, float | int]:
        """``train_metrics_aggr_fn`` over the given replies (for numpy strategies)."""
        aggregated = self.train_metrics_aggr_fn([msg.content for msg in messages], self.weighted_by_key)
        return dict(aggregated or {})
