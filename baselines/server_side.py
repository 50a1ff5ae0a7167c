"""Server-side model work of the defenses that need it: FLTrust's training on the root
dataset (:class:`RootTrainer`) and DeepSight's outputs on random inputs (:class:`OutputProbe`).

Needs torch (the ``simulation`` extra); :mod:`baselines.fltrust` and
:mod:`baselines.deepsight` themselves do not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from flwr_invariant.extras import require

torch = require("torch", "simulation", "the server-side models of FLTrust and DeepSight")
nn = torch.nn

__all__ = ["OutputProbe", "RootTrainer"]


@dataclass
class RootTrainer:
    """FLTrust's server update: the global model trained on the root dataset like a client.

    model_fn: builds the torch model whose ``state_dict`` keys match the arrays.
    x, y: the root dataset (model inputs before preprocessing, int64 labels).
    train_fn: ``train_fn(model, x, y, seed) -> mean loss``, the clients' local training.
    seed: the run's seed; round ``t`` shuffles with ``SeedSequence([seed, ROOT_STREAM, t])``.
    """

    model_fn: Callable[[], nn.Module]
    x: Any
    y: Any
    train_fn: Callable[[nn.Module, Any, Any, int], float]
    seed: int = 0

    #: Seed entropy of the server's shuffling (apart from every client's).
    ROOT_STREAM = 0xF7

    def __repr__(self) -> str:
        return f"RootTrainer(root examples={len(self.y)}, seed={self.seed})"

    def __call__(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """The arrays after training ``arrays`` on the root dataset."""
        model = self.model_fn()
        model.load_state_dict(arrays.to_torch_state_dict())
        seed = int(np.random.SeedSequence([self.seed, self.ROOT_STREAM, server_round]).generate_state(1)[0])
        self.train_fn(model, self.x, self.y, seed)
        return ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})


@dataclass
class OutputProbe:
    """Softmax outputs of a model on fixed random inputs, one batch of inputs per seed.

    model_fn: builds the torch model whose ``state_dict`` keys match the arrays.
    inputs: per seed, ``n`` model inputs (before ``preprocess``); all of one shape.
    preprocess: the task's preprocessing of inputs.
    """

    model_fn: Callable[[], nn.Module]
    inputs: Sequence[Any]
    preprocess: Callable[[Any], Any]
    batch_size: int = 512
    device: str = "cpu"

    def __repr__(self) -> str:
        return f"OutputProbe(seeds={len(self.inputs)}, inputs per seed={len(self.inputs[0])})"

    @torch.no_grad()
    def __call__(self, arrays: ArrayRecord) -> np.ndarray:
        """``(S, n, C)`` softmax outputs of the model ``arrays``."""
        model = self.model_fn().to(self.device)
        model.load_state_dict(arrays.to_torch_state_dict())
        model.eval()
        outputs = []
        for x in self.inputs:
            logits = [
                model(self.preprocess(x[i : i + self.batch_size]).to(self.device)).cpu()
                for i in range(0, len(x), self.batch_size)
            ]
            outputs.append(torch.softmax(torch.cat(logits).double(), dim=1).numpy())
        return np.stack(outputs)
