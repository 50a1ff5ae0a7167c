"""FLAIN's server-side repair of a trained torch model (see :mod:`baselines.flain`).

Needs torch (the ``simulation`` extra); :mod:`baselines.flain` itself does not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.common.logger import log

from flwr_invariant.extras import require

from .flain import flip_low_activation_updates, rescale_to_norm

torch = require("torch", "simulation", "FLAIN's repair")
nn = torch.nn

__all__ = ["FlainRepair"]


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
