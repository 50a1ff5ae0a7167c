"""``InvariantAggregation`` for Flower's ``flwr.server.strategy`` API (NDArrays/FitRes)."""

from __future__ import annotations

from collections.abc import Sequence
from logging import ERROR, WARNING
from typing import Any

from flwr.common import FitRes, Parameters, Scalar, ndarrays_to_parameters
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from .rounds import finish_round, screen_round
from .screening import decode_candidate, decode_npy
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


class InvariantAggregation(CarriedMaskMemory, FedAvg):
    """Invariant Aggregator (Wang et al., AISTATS 2024) as a Flower ``FedAvg`` strategy.

    Each round, client weights ``w_i`` become pseudo-gradients ``g_i = w - w_i``
    against the global weights ``w`` sent that round. Per coordinate, the server
    keeps the coordinate-wise trimmed mean of ``g`` only where at least a ``tau``
    share of clients agree on its sign (AND-mask), and steps
    ``w' = w - server_learning_rate * g``. Non-floating arrays take the
    coordinate-wise median. Updates with NaN/Inf, wrong shapes or array counts,
    or non-numeric arrays are excluded (and logged); sampling, evaluation and
    configuration are ``FedAvg``'s. Sample counts do not weight the aggregate.

    Parameters
    ----------
    tau : float (default: 0.6)
        Sign-consistency threshold of the AND-mask, in [0, 1].
    trim_ratio : float (default: 0.45)
        Fraction trimmed from each tail per coordinate, in [0, 0.5); at most
        ``(N - 1) // 2`` values per tail. With ``tau=0.6`` this matches the
        authors' released code (almost the coordinate-wise median).
    server_learning_rate : float (default: 1.0)
        Server step size along the aggregated pseudo-gradient.
    backend : str (default: "numpy")
        Engine: "numpy", "torch" (CUDA if visible, else CPU), "auto" (torch on a
        GPU when there is one) or "reference" (slow, for checking).
    num_threads : int, optional
        Threads of the numpy backend (default: CPU count, at most 8).
    array_names : sequence of str, optional
        The name of each array, in the order clients send them; for a PyTorch
        model ``list(model.state_dict().keys())``. With names, arrays whose name
        ends with one of ``median_keys`` are statistics, not trained weights
        (BatchNorm ``running_mean``/``running_var``): they take the coordinate-wise
        median of the returned values instead of the masked trimmed mean, as in
        the Message API class. A count that differs from the global model's
        raises ``ValueError`` before any client trains.
    median_keys : tuple of str (default: ("running_mean", "running_var"))
        Name endings of the median arrays (used with ``array_names``).
    median_indices : sequence of int (default: ())
        The same by position, for models without names; added to those found
        by name.
    **fedavg_kwargs
        Any keyword argument of ``flwr.server.strategy.FedAvg`` (``fraction_fit``,
        ``min_fit_clients``, ``evaluate_fn``, ``initial_parameters``, ...); any
        other keyword raises ``TypeError`` naming it.

    ``aggregate_fit`` returns the metrics ``mask_fraction`` (share of floating
    coordinates the mask kept), ``num_excluded``, ``num_aggregated``,
    ``num_failures`` and ``trim_count``, plus ``fit_metrics_aggregation_fn``'s
    over the aggregated clients.
    """

    _global_parameters: Parameters | None = None

    def __init__(
        self,
        *,
        tau: float = DEFAULT_TAU,
        trim_ratio: float = DEFAULT_TRIM_RATIO,
        server_learning_rate: float = DEFAULT_SERVER_LEARNING_RATE,
        backend: str = DEFAULT_BACKEND,
        num_threads: int | None = None,
        mask_rule: str = DEFAULT_MASK_RULE,
        array_names: Sequence[str] | None = None,
        median_keys: tuple[str, ...] = ("running_mean", "running_var"),
        median_indices: Sequence[int] = (),
        **fedavg_kwargs: Any,
    ) -> None:
        check_strategy_keywords(type(self).__name__, FedAvg, fedavg_kwargs)
        self.invariant_config = InvariantConfig(
            tau, trim_ratio, server_learning_rate, backend, num_threads, mask_rule
        )
        self.array_names = None if array_names is None else list(array_names)
        self.median_keys = tuple(median_keys)
        self.median_indices = frozenset(median_indices) | {
            index for index, name in enumerate(self.array_names or ()) if name.endswith(self.median_keys)
        }
        super().__init__(**fedavg_kwargs)
        if self.initial_parameters is not None:
            self._check_array_names(len(self.initial_parameters.tensors))

    def __repr__(self) -> str:
        """Compute a string representation of the strategy."""
        return f"InvariantAggregation({self.invariant_config}, accept_failures={self.accept_failures})"

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list:
        """Remember the global weights sent this round, then configure like FedAvg."""
        self._check_array_names(len(parameters.tensors))
        self._global_parameters = parameters
        return super().configure_fit(server_round, parameters, client_manager)

    def _check_array_names(self, num_arrays: int) -> None:
        """``ValueError`` when ``array_names`` does not name every array of the global model."""
        if self.array_names is not None and len(self.array_names) != num_arrays:
            raise ValueError(
                f"InvariantAggregation: array_names has {len(self.array_names)} names, "
                f"the global model has {num_arrays} arrays"
            )

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Invariant aggregation of the valid fit results."""
        if not results:
            return None, {}
        if not self.accept_failures and failures:
            return None, {}
        if self._global_parameters is None:
            log(ERROR, "aggregate_fit: configure_fit never ran, so the global weights are unknown")
            return None, {}
        global_weights = [decode_npy(tensor) for tensor in self._global_parameters.tensors]
        candidates = [decode_candidate(proxy.cid, _fit_res_arrays, fit_res) for proxy, fit_res in results]
        screened = screen_round(server_round, global_weights, candidates)
        weights, aggregate_metrics = None, {}
        if screened.updates:
            weights, aggregate_metrics = self.invariant_config.aggregate(
                global_weights,
                screened.updates,
                self.median_indices,
                client_ids=[results[i][0].cid for i in screened.accepted],
            )
        outcome = finish_round(server_round, screened, weights, aggregate_metrics)
        metrics: dict[str, Scalar] = {**outcome.metrics, "num_failures": len(failures)}
        if self.fit_metrics_aggregation_fn and screened.accepted:
            fit_metrics = [(results[i][1].num_examples, results[i][1].metrics) for i in screened.accepted]
            metrics.update(self.fit_metrics_aggregation_fn(fit_metrics))
        elif server_round == 1 and not self.fit_metrics_aggregation_fn:
            log(WARNING, "No fit_metrics_aggregation_fn provided")
        if outcome.weights is None:
            return None, metrics
        return ndarrays_to_parameters(outcome.weights), metrics


def _fit_res_arrays(fit_res: FitRes) -> list:
    """The arrays of a fit result; ``ValueError`` if it is not a usable one."""
    if fit_res.num_examples <= 0:
        raise ValueError(f"num_examples is {fit_res.num_examples}; it must be positive")
    parameters = fit_res.parameters
    if parameters.tensor_type != "numpy.ndarray":
        raise ValueError(f"tensor_type {parameters.tensor_type!r} is not 'numpy.ndarray'")
    return [decode_npy(tensor) for tensor in parameters.tensors]
