"""``InvariantAggregation`` for Flower's Message API (``flwr.serverapp.strategy``)."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from logging import ERROR, INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from .round import InvariantSettings, aggregate_round
from .updates import decode_npy

__all__ = ["InvariantAggregation"]


class InvariantAggregation(InvariantSettings, FedAvg):
    """Invariant Aggregator (Wang et al., AISTATS 2024) as a Message API ``FedAvg``.

    The same algorithm and core as :class:`flwr_invariant.InvariantAggregation`
    (identical weights on identical inputs), for ``ServerApp``s built on
    ``flwr.serverapp.strategy``. Each reply must carry one ``ArrayRecord`` with
    the global model's keys and one ``MetricRecord`` with ``weighted_by_key``
    (only used to weight the reported metrics); replies that don't, or whose
    arrays have NaN/Inf, wrong shapes or non-numeric dtypes, are excluded and
    logged instead of failing the round.

    Parameters
    ----------
    tau, trim_ratio, server_learning_rate, backend, num_threads
        As in :class:`flwr_invariant.InvariantAggregation` (defaults 0.6, 0.45,
        1.0, "numpy", CPU count).
    **fedavg_kwargs
        Any keyword argument of ``flwr.serverapp.strategy.FedAvg``
        (``fraction_train``, ``min_train_nodes``, ``train_metrics_aggr_fn``, ...).

    ``aggregate_train`` returns a ``MetricRecord`` with ``mask_fraction``,
    ``num_excluded``, ``num_aggregated``, ``num_failures`` and ``trim_count``,
    plus ``train_metrics_aggr_fn``'s over the aggregated replies.
    """

    _global_arrays: ArrayRecord | None = None

    def __repr__(self) -> str:
        """Compute a string representation of the strategy."""
        return f"InvariantAggregation({self.settings_repr()})"

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> InvariantAggregation settings:")
        log(INFO, "\t│\t└── %s", self.settings_repr())
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global arrays sent this round, then configure like FedAvg."""
        self._global_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Invariant aggregation of the valid training replies."""
        replies = list(replies)
        valid_replies, error_replies = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid_replies:
            return None, None
        if self._global_arrays is None:
            log(ERROR, "aggregate_train: configure_train never ran, so the global arrays are unknown")
            return None, None
        keys = list(self._global_arrays.keys())
        global_weights = [_decode_array(self._global_arrays[key]) for key in keys]
        candidates = [
            (f"node {msg.metadata.src_node_id}", partial(self._reply_arrays, msg, keys))
            for msg in valid_replies
        ]
        outcome = aggregate_round(server_round, global_weights, candidates, self.invariant_config)
        metrics = MetricRecord({**outcome.metrics, "num_failures": len(error_replies)})
        if outcome.accepted:
            accepted = [valid_replies[i].content for i in outcome.accepted]
            metrics.update(self.train_metrics_aggr_fn(accepted, self.weighted_by_key))
        if outcome.weights is None:
            return None, metrics
        return ArrayRecord({key: Array(w) for key, w in zip(keys, outcome.weights, strict=True)}), metrics

    def _reply_arrays(self, message: Message, keys: list[str]) -> list[np.ndarray]:
        """The reply's arrays in the order of ``keys``; ``ValueError`` if malformed."""
        content = message.content
        if len(content.array_records) != 1:
            raise ValueError(f"sent {len(content.array_records)} ArrayRecords, expected 1")
        if len(content.metric_records) != 1:
            raise ValueError(f"sent {len(content.metric_records)} MetricRecords, expected 1")
        weight = next(iter(content.metric_records.values())).get(self.weighted_by_key)
        if not isinstance(weight, int | float):
            raise ValueError(f"its MetricRecord has no number under {self.weighted_by_key!r}")
        record = next(iter(content.array_records.values()))
        if len(record) != len(keys):
            raise ValueError(f"sent {len(record)} arrays, the global model has {len(keys)}")
        missing = [key for key in keys if key not in record]
        if missing:
            raise ValueError(f"its arrays lack the global model's keys {missing[:5]}")
        return [_decode_array(record[key]) for key in keys]


def _decode_array(array: Array) -> np.ndarray:
    if array.stype != "numpy.ndarray":
        raise ValueError(f"array serialised as {array.stype!r}, not 'numpy.ndarray'")
    return decode_npy(array.data)
