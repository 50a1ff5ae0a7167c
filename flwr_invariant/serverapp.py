"""``InvariantAggregation`` for Flower's Message API (``flwr.serverapp.strategy``)."""

from __future__ import annotations

from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAvg

from .message_api import ScreenedReplies
from .round import InvariantSettings

__all__ = ["InvariantAggregation"]


class InvariantAggregation(InvariantSettings, ScreenedReplies, FedAvg):
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
    median_keys : tuple of str (default: ("running_mean", "running_var"))
        Floating arrays whose key ends with one of these are statistics, not
        trained weights (PyTorch BatchNorm buffers by default): they take the
        coordinate-wise median of the returned values instead of the masked
        trimmed mean (the authors' code leaves them out of the aggregation).
    **fedavg_kwargs
        Any keyword argument of ``flwr.serverapp.strategy.FedAvg``
        (``fraction_train``, ``min_train_nodes``, ``train_metrics_aggr_fn``, ...).

    ``aggregate_train`` returns a ``MetricRecord`` with ``mask_fraction``,
    ``num_excluded``, ``num_aggregated``, ``num_failures`` and ``trim_count``,
    plus ``train_metrics_aggr_fn``'s over the aggregated replies.
    """

    def __init__(
        self, *, median_keys: tuple[str, ...] = ("running_mean", "running_var"), **kwargs: Any
    ) -> None:
        self.median_keys = tuple(median_keys)
        super().__init__(**kwargs)

    def __repr__(self) -> str:
        """Compute a string representation of the strategy."""
        return f"InvariantAggregation({self.settings_repr()})"

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> InvariantAggregation settings:")
        log(INFO, "\t│\t└── %s", self.settings_repr())
        super().summary()

    def aggregate_updates(
        self,
        server_round: int,
        global_weights: list[np.ndarray],
        updates: list[list[np.ndarray]],
        messages: list[Message],
    ) -> tuple[list[np.ndarray], dict[str, float | int]]:
        """One invariant step on the valid updates, plus ``train_metrics_aggr_fn``'s metrics."""
        labels = [f"node {msg.metadata.src_node_id}" for msg in messages]
        keys = list(self._global_arrays.keys())
        median_layers = {i for i, key in enumerate(keys) if key.endswith(self.median_keys)}
        weights, metrics = self.invariant_config.aggregate(global_weights, updates, labels, median_layers)
        return weights, {**metrics, **self.train_metrics(messages)}
