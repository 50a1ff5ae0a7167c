"""``InvariantAggregation`` for Flower's Message API (``flwr.serverapp.strategy``)."""

from __future__ import annotations

from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAvg

from .screened_replies import ScreenedReplies
from .settings import (
    DEFAULT_BACKEND,
    DEFAULT_MASK_RULE,
    DEFAULT_SERVER_LEARNING_RATE,
    DEFAULT_TAU,
    DEFAULT_TRIM_RATIO,
    CarriedMaskMemory,
    InvariantConfig,
    check_strategy_keywords,
)

__all__ = ["InvariantAggregation"]


class InvariantAggregation(CarriedMaskMemory, ScreenedReplies, FedAvg):
    """Invariant Aggregator (Wang et al., AISTATS 2024) as a Message API ``FedAvg``.

    The same algorithm and engines as :class:`flwr_invariant.InvariantAggregation`
    (identical weights on identical inputs), for ``ServerApp``s built on
    ``flwr.serverapp.strategy``. Each reply must carry one ``ArrayRecord`` with
    the global model's keys and one ``MetricRecord`` with ``weighted_by_key``
    (only used to weight the reported metrics); replies that don't, or whose
    arrays have NaN/Inf, wrong shapes or non-numeric dtypes, are excluded and
    logged instead of failing the round.

    Parameters
    ----------
    tau : float (default: 0.6)
        Sign-consistency threshold of the AND-mask, in [0, 1].
    trim_ratio : float (default: 0.45)
        Fraction trimmed from each tail per coordinate, in [0, 0.5).
    server_learning_rate : float (default: 1.0)
        Server step size along the aggregated pseudo-gradient, > 0.
    backend : str (default: "numpy")
        Engine: "numpy", "torch" (CUDA if visible, else CPU), "auto" (torch on a
        GPU when there is one) or "reference" (slow, for checking).
    num_threads : int, optional
        Threads of the numpy engine (default: CPU count, at most 8).
    median_keys : tuple of str (default: ("running_mean", "running_var"))
        Floating arrays whose key ends with one of these are statistics, not
        trained weights (PyTorch BatchNorm buffers by default): they take the
        coordinate-wise median of the returned values instead of the masked
        trimmed mean (the authors' code leaves them out of the aggregation).
    **fedavg_kwargs
        Any keyword argument of ``flwr.serverapp.strategy.FedAvg``
        (``fraction_train``, ``min_train_nodes``, ``train_metrics_aggr_fn``, ...);
        any other keyword raises ``TypeError`` naming it.

    ``aggregate_train`` returns a ``MetricRecord`` with ``mask_fraction``,
    ``num_excluded``, ``num_aggregated``, ``num_failures`` and ``trim_count``,
    plus ``train_metrics_aggr_fn``'s over the aggregated replies.
    """

    def __init__(
        self,
        *,
        tau: float = DEFAULT_TAU,
        trim_ratio: float = DEFAULT_TRIM_RATIO,
        server_learning_rate: float = DEFAULT_SERVER_LEARNING_RATE,
        backend: str = DEFAULT_BACKEND,
        num_threads: int | None = None,
        mask_rule: str = DEFAULT_MASK_RULE,
        median_keys: tuple[str, ...] = ("running_mean", "running_var"),
        **fedavg_kwargs: Any,
    ) -> None:
        check_strategy_keywords(type(self).__name__, FedAvg, fedavg_kwargs)
        self.invariant_config = InvariantConfig(
            tau, trim_ratio, server_learning_rate, backend, num_threads, mask_rule
        )
        self.median_keys = tuple(median_keys)
        super().__init__(**fedavg_kwargs)

    def __repr__(self) -> str:
        """Compute a string representation of the strategy."""
        return f"InvariantAggregation({self.invariant_config})"

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> InvariantAggregation settings:")
        log(INFO, "\t│\t└── %s", self.invariant_config)
        super().summary()

    def aggregate_updates(
        self,
        server_round: int,
        global_weights: list[np.ndarray],
        updates: list[list[np.ndarray]],
        messages: list[Message],
    ) -> tuple[list[np.ndarray], dict[str, float | int]]:
        """One invariant step on the valid updates, plus ``train_metrics_aggr_fn``'s metrics."""
        keys = list(self._global_arrays.keys())
        median_layers = {i for i, key in enumerate(keys) if key.endswith(self.median_keys)}
        weights, metrics = self.invariant_config.aggregate(
            global_weights, updates, median_layers, client_ids=[msg.metadata.src_node_id for msg in messages]
        )
        return weights, {**metrics, **self.train_metrics(messages)}
