"""Benign federated pretraining: the model that the attack and the defense start from.

The paper's released code starts from pretrained weights, and "Attack of the
Tails" attacks a model the federation has already trained. With
``pretrain-rounds = P`` the ServerApp first runs P rounds of FedAvg in which every
sampled client trains benignly (the train config carries ``pretrain = True``), then
the experiment's ``num-server-rounds`` rounds, defense and attack included, start
from the result. ``pretrain-cache`` (a directory) keeps that model, named by a hash
of every setting it depends on, so each defense of a grid starts from the same
model without training it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from .sampling import RoundSampler, make_strategy
from .training import PRETRAIN_STREAM

__all__ = ["PRETRAIN_KEYS", "SENT140_PRETRAIN_KEYS", "cache_file", "load_cached", "pretrain"]

#: The run-config keys that determine the pretrained model (the attack and defense keys do not).
PRETRAIN_KEYS = (
    "task",
    "seed",
    "pretrain-rounds",
    "num-partitions",
    "clients-per-round",
    "partition",
    "dirichlet-alpha",
    "train-size",
    "model",
    "local-epochs",
    "batch-size",
    "lr",
    "momentum",
    "weight-decay",
    "linear-features",
    "linear-train-size",
    "linear-test-size",
    "linear-signal",
    "linear-trigger",
)
#: Keys that also determine it on task sent140 (left out of other tasks' hashes, which keeps their caches).
SENT140_PRETRAIN_KEYS = (
    "sent140-vocab-size",
    "sent140-seq-length",
    "sent140-test-size",
    "lstm-embedding-dim",
    "lstm-hidden-dim",
)


def cache_file(config: Mapping[str, Any]) -> Path | None:
    """``pretrain-cache/pretrained-<hash>.pt`` for this config, or ``None`` without a cache."""
    if not config["pretrain-cache"]:
        return None
    keys = PRETRAIN_KEYS + (SENT140_PRETRAIN_KEYS if config["task"] == "sent140" else ())
    settings = json.dumps({key: config[key] for key in keys}, sort_keys=True)
    digest = hashlib.sha256(settings.encode()).hexdigest()[:16]
    return Path(config["pretrain-cache"]).expanduser() / f"pretrained-{digest}.pt"


def load_cached(path: Path, template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict in ``path``; ``ValueError`` naming the file unless it fits ``template``.

    Loaded with ``weights_only=True``: tensors only, never arbitrary pickled objects.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many kinds for a corrupt file
        raise ValueError(f"pretrained model {str(path)!r} cannot be read: {error}") from None
    if not isinstance(state, dict) or set(state) != set(template):
        raise ValueError(f"pretrained model {str(path)!r} does not hold this model's state dict")
    for key, tensor in template.items():
        if not isinstance(state[key], torch.Tensor) or state[key].shape != tensor.shape:
            raise ValueError(
                f"pretrained model {str(path)!r}: entry {key!r} does not have shape {tuple(tensor.shape)}"
            )
    return state


def pretrain(
    grid: Grid, config: Mapping[str, Any], node_of: Mapping[int, int], initial: ArrayRecord
) -> tuple[ArrayRecord, dict[str, Any]]:
    """``pretrain-rounds`` benign FedAvg rounds from ``initial``; returns the model and a summary.

    The summary has ``rounds``, ``seconds`` and ``cached`` (whether the model came
    from the cache); the experiment's round-0 evaluation measures the model itself.
    """
    path = cache_file(config)
    started = time.monotonic()
    if path is not None and path.exists():
        arrays = ArrayRecord(load_cached(path, initial.to_torch_state_dict()))
        log(INFO, "pretrained model: %s (cached)", path)
        cached = True
    else:
        benign = {**config, "defense": "fedavg", "attack": "none"}
        strategy = make_strategy(benign, RoundSampler(node_of, benign, stream=PRETRAIN_STREAM))
        log(INFO, "pretraining: %d rounds of benign FedAvg", config["pretrain-rounds"])
        result = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=config["pretrain-rounds"],
            timeout=config["round-timeout"],
            train_config=ConfigRecord({"pretrain": True}),
        )
        arrays = result.arrays
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(".tmp")
            torch.save(arrays.to_torch_state_dict(), temporary)
            os.replace(temporary, path)
            log(INFO, "pretrained model saved to %s", path)
        cached = False
    summary = {"rounds": config["pretrain-rounds"], "seconds": time.monotonic() - started, "cached": cached}
    return arrays, summary
