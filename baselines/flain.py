"""FLAIN (Ding et al., "FLAIN: Mitigating Backdoor Attacks in Federated Learning via
Flipping Weight Updates of Low-Activation Input Neurons", arXiv 2408.08655).

A post-training defense: after the last round, with a small clean auxiliary set
at the server, measure the mean activation of each input neuron of the first
fully-connected layer; for neurons whose activation is at most ``k``, flip that
layer's cumulative update (``W0 - dW`` instead of ``W0 + dW``); raise ``k`` step
by step until the auxiliary accuracy drops by more than a threshold, keep the
last ``k`` within it, and rescale the layer to its original norm.

Interface: training runs as FedAvg (``FLAIN`` is a screened ``FedAvg``); the
server application gives the strategy a :class:`~baselines.flain_repair.FlainRepair` (model factory,
auxiliary loader, thresholds), and ``FLAIN.start`` applies it once after the
last round. The auxiliary set must be clean server-side data that is not the
test set the results are reported on.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from flwr_invariant.screened_replies import ScreenedReplies

#: ``repair(initial_arrays, final_arrays) -> (repaired_arrays, report)``, e.g. a ``FlainRepair``.
Repair = Callable[[ArrayRecord, ArrayRecord], tuple[ArrayRecord, dict[str, float]]]

__all__ = ["FLAIN", "flip_low_activation_updates", "rescale_to_norm"]


def flip_low_activation_updates(
    initial: np.ndarray, final: np.ndarray, activations: np.ndarray, threshold: float
) -> tuple[np.ndarray, int]:
    """Flip the cumulative update of the input neurons with mean activation ``<= threshold``.

    ``initial``/``final``: the layer's weights ``(out_features, in_features)``
    before training and after the last round; ``activations``: ``(in_features,)``.
    Returns the new weights (``initial - (final - initial)`` in flipped columns,
    ``final`` elsewhere) and the number of flipped neurons.
    """
    flipped = activations <= threshold
    weights = np.where(flipped[None, :], 2 * initial - final, final)
    return weights.astype(final.dtype), int(flipped.sum())


def rescale_to_norm(weights: np.ndarray, norm: float) -> np.ndarray:
    """``weights`` scaled to Frobenius norm ``norm`` (unchanged if it is zero)."""
    current = float(np.linalg.norm(weights))
    return weights if current == 0 else (weights * (norm / current)).astype(weights.dtype)


class FLAIN(ScreenedReplies, FedAvg):
    """FedAvg training followed by FLAIN's repair of the final model.

    Parameters
    ----------
    repair : Repair, optional
        Set by the server application (it knows the model and holds the
        auxiliary data); without it the strategy is plain (screened) FedAvg and
        says so in the log.
    **fedavg_kwargs
        ``flwr.serverapp.strategy.FedAvg`` keyword arguments.

    After the last round, ``start`` repairs ``result.arrays``; when an
    ``evaluate_fn`` is given, the last round's server-side metrics are
    re-computed on the repaired model, with the unrepaired ones kept under a
    ``before_repair_`` prefix and the repair report (``flain_*``) added.
    """

    def __init__(self, *, repair: Repair | None = None, **fedavg_kwargs: Any) -> None:
        self.repair = repair
        super().__init__(**fedavg_kwargs)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run FedAvg rounds, then repair the final model (:meth:`finish`)."""
        result = super().start(
            grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn
        )
        return self.finish(result, initial_arrays, num_rounds, evaluate_fn)

    def finish(
        self,
        result: Result,
        initial_arrays: ArrayRecord,
        num_rounds: int,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Repair ``result.arrays`` (the model after round ``num_rounds``) against ``initial_arrays``.

        For a round loop other than :meth:`start` (e.g. one resumed from a checkpoint).
        """
        if self.repair is None:
            log(INFO, "FLAIN: no repair configured (no auxiliary data); the FedAvg model is returned")
            return result
        result.arrays, report = self.repair(initial_arrays, result.arrays)
        if evaluate_fn is not None and num_rounds in result.evaluate_metrics_serverapp:
            before = result.evaluate_metrics_serverapp[num_rounds]
            after = evaluate_fn(num_rounds, result.arrays) or MetricRecord()
            merged = {**after, **{f"before_repair_{k}": v for k, v in before.items()}, **report}
            result.evaluate_metrics_serverapp[num_rounds] = MetricRecord(merged)
        return result
