"""FLAIN (Ding et al., "FLAIN: Mitigating Backdoor Attacks in Federated Learning via
Flipping Weight Updates of Low-Activation Input Neurons", arXiv 2408.08655).

A post-training defense: after the last round, with a small clean auxiliary set
at the server, measure the mean activation of each input neuron of the first
fully-connected layer; for neurons whose activation is at most ``k``, flip that
layer's cumulative update (``W0 - dW`` instead of ``W0 + dW``); raise ``k`` step
by step until the auxiliary accuracy drops by more than a threshold, keep the
last ``k`` within it, and rescale the layer to its original norm.

Interface: training runs as FedAvg (``FLAIN`` is a screened ``FedAvg``); the
server application gives the strategy a :class:`FlainRepair` (model factory,
auxiliary loader, thresholds), and ``FLAIN.start`` applies it once after the
last round. The auxiliary set must be clean server-side data that is not the
test set the results are reported on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from torch import nn

from flwr_invariant.screened_replies import ScreenedReplies

__all__ = ["FLAIN", "FlainRepair", "flip_low_activation_updates", "rescale_to_norm"]


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


@dataclass
class FlainRepair:
    """FLAIN's server-side repair of a trained model.

    model_fn: builds the (untrained) torch model whose ``state_dict`` keys match the arrays.
    aux_loader: clean auxiliary ``(images, labels)`` batches held by the server.
    start_threshold, step, accuracy_drop: ``k`` starts at ``start_threshold``
        and grows by ``step`` until the auxiliary accuracy falls more than
        ``accuracy_drop`` below the unrepaired model's (CIFAR-10 values of the
        paper: 0.001, 0.0001, 0.001).
    layer_name: the fully-connected layer; default the first ``nn.Linear``.
    max_evaluations: cap on auxiliary evaluations (each distinct flipped set
        is evaluated once).
    """

    model_fn: Callable[[], nn.Module]
    aux_loader: Any
    start_threshold: float = 0.001
    step: float = 0.0001
    accuracy_drop: float = 0.001
    layer_name: str | None = None
    max_evaluations: int = 200
    device: str = "cpu"

    def __call__(self, initial: ArrayRecord, final: ArrayRecord) -> tuple[ArrayRecord, dict[str, float]]:
        """The repaired arrays and a report (``flain_threshold``, ``flain_flipped``, accuracies)."""
        model = self.model_fn().to(self.device)
        model.load_state_dict(final.to_torch_state_dict())
        layer_name = self.layer_name or next(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
        layer = model.get_submodule(layer_name)
        key = f"{layer_name}.weight" if layer_name else "weight"
        initial_w = initial.to_torch_state_dict()[key].numpy()
        final_w = layer.weight.detach().cpu().numpy().copy()
        activations = self.mean_input_activations(model, layer)
        base_accuracy = self.accuracy(model)

        def accuracy_with(threshold: float) -> tuple[float, int, np.ndarray]:
            weights, count = flip_low_activation_updates(initial_w, final_w, activations, threshold)
            weights = rescale_to_norm(weights, float(np.linalg.norm(final_w)))
            with torch.no_grad():
                layer.weight.copy_(torch.from_numpy(weights))
            return self.accuracy(model), count, weights

        chosen = (0.0, 0, final_w, base_accuracy)
        for threshold in self.candidate_thresholds(activations):
            accuracy, count, weights = accuracy_with(threshold)
            if accuracy < base_accuracy - self.accuracy_drop:
                break
            chosen = (threshold, count, weights, accuracy)
        threshold, count, weights, accuracy = chosen
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(weights))
        log(INFO, "FLAIN: flipped %d input neurons of %s (k=%.5f), aux accuracy %.4f -> %.4f",
            count, layer_name, threshold, base_accuracy, accuracy)  # fmt: skip
        report = {
            "flain_threshold": threshold,
            "flain_flipped": count,
            "flain_aux_accuracy_before": base_accuracy,
            "flain_aux_accuracy_after": accuracy,
        }
        return ArrayRecord(model.state_dict()), report

    def candidate_thresholds(self, activations: np.ndarray) -> list[float]:
        """The ``k = start + m * step`` at which the flipped set grows (first one always)."""
        thresholds = [self.start_threshold]
        for value in np.unique(activations[activations > self.start_threshold]):
            steps = int(np.ceil((value - self.start_threshold) / self.step - 1e-9))
            thresholds.append(self.start_threshold + steps * self.step)
            if len(thresholds) >= self.max_evaluations:
                break
        return sorted(set(thresholds))

    @torch.no_grad()
    def mean_input_activations(self, model: nn.Module, layer: nn.Module) -> np.ndarray:
        """Mean over the auxiliary set of each input of ``layer``: ``(in_features,)``."""
        total, count = None, 0

        def record(_module, inputs):
            nonlocal total, count
            flat = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            total = flat.sum(0) if total is None else total + flat.sum(0)
            count += flat.shape[0]

        handle = layer.register_forward_pre_hook(record)
        try:
            model.eval()
            for images, _ in self.aux_loader:
                model(images.to(self.device))
        finally:
            handle.remove()
        return (total / max(count, 1)).cpu().numpy()

    @torch.no_grad()
    def accuracy(self, model: nn.Module) -> float:
        """Top-1 accuracy on the auxiliary set."""
        model.eval()
        correct = seen = 0
        for images, labels in self.aux_loader:
            predictions = model(images.to(self.device)).argmax(dim=1).cpu()
            correct += int((predictions == labels).sum())
            seen += len(labels)
        return correct / max(seen, 1)


class FLAIN(ScreenedReplies, FedAvg):
    """FedAvg training followed by FLAIN's repair of the final model.

    Parameters
    ----------
    repair : FlainRepair, optional
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

    def __init__(self, *, repair: FlainRepair | None = None, **fedavg_kwargs: Any) -> None:
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
        """Run FedAvg rounds, then repair the final model."""
        result = super().start(
            grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn
        )
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
