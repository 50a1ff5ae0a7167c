"""Backdoor helpers of a malicious client: poisoned data, PGD projection, model replacement.

Two backdoor kinds (run config ``backdoor``):

- ``"edge-case"`` (Wang et al., NeurIPS 2020, "Attack of the Tails"): the attacker
  mixes ``edge-case-samples`` edge-case inputs (Southwest planes / ARDIS 7s /
  Greek-director tweets / triggered linear points), all labelled ``target-label``,
  with ``clean-samples`` examples of its own partition.
- ``"pixel"`` (BadNets-style): the backdoor samples are the attacker's own
  images of other classes with a white ``trigger-size`` square stamped in the
  bottom-right corner, labelled ``target-label``; the backdoor test set is every
  clean test image not of the target class, with the same trigger.

The attack modes (run config ``attack``) that use these helpers are the objects
of :mod:`simulation.attackers`. ``"pgd-replace"`` multiplies the update
``w - w_global`` by ``total / attacker_examples`` (model replacement).

How the attacker knows ``total`` (the examples behind one round's aggregate):
run config ``replace-total-examples`` if > 0 (an attacker who knows it);
otherwise it estimates it from public run settings as
``clients-per-round * training-set size / num-partitions`` (mean partition
size times clients per round), see :func:`estimate_round_examples`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import TaskData
from .triggers import Trigger, square_trigger

__all__ = [
    "apply_trigger",
    "backdoor_test_inputs",
    "estimate_round_examples",
    "global_snapshot",
    "pgd_hook",
    "poisoned_dataset",
    "project_l2_",
    "replacement_factor",
    "scale_update_",
    "update_norm",
]


def apply_trigger(images: torch.Tensor, size: int) -> torch.Tensor:
    """Copy of uint8 ``(N, C, H, W)`` images with a white ``size`` x ``size`` bottom-right square."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError("the pixel trigger needs uint8 images of shape (N, C, H, W)")
    return square_trigger(images.shape[1:], size).stamp(images)


def _take(pool: torch.Tensor, count: int, rng: np.random.Generator) -> torch.Tensor:
    """``count`` rows of ``pool``: without replacement when possible, else all rows plus random extras."""
    if count == 0:
        return pool[:0]
    if not len(pool):
        raise ValueError("no samples to draw the backdoor set from")
    if count <= len(pool):
        rows = rng.choice(len(pool), size=count, replace=False)
    else:
        rows = np.concatenate([rng.permutation(len(pool)), rng.choice(len(pool), size=count - len(pool))])
    return pool[torch.from_numpy(rows)]


def poisoned_dataset(
    task: TaskData,
    own_indices: np.ndarray,
    config: Mapping[str, Any],
    rng: np.random.Generator,
    trigger: Trigger | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The attacker's training set ``(x, y, num_backdoor)``.

    First ``num_backdoor = edge-case-samples`` backdoor inputs labelled
    ``target-label``, then ``min(clean-samples, partition size)`` clean examples
    of the attacker's partition with their true labels. Edge-case samples are
    drawn without replacement while the pool lasts (the pool is repeated when
    more are asked for, e.g. 100 of ARDIS's 66 training 7s). ``trigger``: what the
    pixel backdoor stamps (default: the white ``trigger-size`` square).
    """
    target = int(config["target-label"])
    own = torch.from_numpy(np.asarray(own_indices, dtype=np.int64))
    clean_rows = own[torch.from_numpy(rng.permutation(len(own))[: config["clean-samples"]])]
    clean_x, clean_y = task.train_x[clean_rows], task.train_y[clean_rows]
    if config["backdoor"] == "edge-case":
        bad_x = _take(task.edge_train_x, config["edge-case-samples"], rng)
    elif config["backdoor"] == "pixel":
        others = own[task.train_y[own] != target]
        if not len(others):  # a partition holding only the target class: use any non-target image
            others = torch.nonzero(task.train_y != target).flatten()
        trigger = trigger or square_trigger(task.train_x.shape[1:], config["trigger-size"])
        bad_x = trigger.stamp(task.train_x[_take(others, config["edge-case-samples"], rng)])
    else:
        raise ValueError(f"run config 'backdoor' must be 'edge-case' or 'pixel', got {config['backdoor']!r}")
    bad_y = torch.full((len(bad_x),), target, dtype=torch.int64)
    return torch.cat([bad_x, clean_x]), torch.cat([bad_y, clean_y]), len(bad_x)


def backdoor_test_inputs(
    task: TaskData, config: Mapping[str, Any], trigger: Trigger | None = None
) -> torch.Tensor:
    """Inputs behind ``acc_backdoor``: edge-case test set, or non-target test images stamped
    with ``trigger`` (default: the white ``trigger-size`` square)."""
    if config["backdoor"] == "edge-case":
        return task.edge_test_x
    if config["backdoor"] == "pixel":
        trigger = trigger or square_trigger(task.test_x.shape[1:], config["trigger-size"])
        return trigger.stamp(task.test_x[task.test_y != int(config["target-label"])])
    raise ValueError(f"run config 'backdoor' must be 'edge-case' or 'pixel', got {config['backdoor']!r}")


def global_snapshot(model: nn.Module) -> list[torch.Tensor]:
    """Detached copies of the model's parameters (the global model before local training)."""
    return [p.detach().clone() for p in model.parameters()]


@torch.no_grad()
def update_norm(model: nn.Module, reference: Sequence[torch.Tensor]) -> float:
    """L2 norm of ``parameters - reference`` over all parameters together."""
    squares = sum(((p - r) ** 2).sum() for p, r in zip(model.parameters(), reference, strict=True))
    return float(torch.as_tensor(squares).sqrt())


@torch.no_grad()
def project_l2_(model: nn.Module, reference: Sequence[torch.Tensor], eps: float) -> float:
    """Project the whole parameter vector onto ``||w - reference||_2 <= eps`` in place.

    One ball for all parameters together (not per layer); BatchNorm running
    statistics are buffers and are not projected. Returns the norm before projection.
    """
    norm = update_norm(model, reference)
    if norm > eps:
        factor = eps / norm
        for param, ref in zip(model.parameters(), reference, strict=True):
            param.copy_(ref + (param - ref) * factor)
    return norm


def pgd_hook(
    model: nn.Module, reference: Sequence[torch.Tensor], eps: float, every: int
) -> Callable[[int], None]:
    """``after_step(step)`` callback for :func:`simulation.training.train`: project every ``every`` steps."""

    def after_step(step: int) -> None:
        if step % every == 0:
            project_l2_(model, reference, eps)

    return after_step


@torch.no_grad()
def scale_update_(model: nn.Module, reference: Sequence[torch.Tensor], factor: float) -> None:
    """Model replacement: ``w <- reference + factor * (w - reference)`` for every parameter, in place."""
    for param, ref in zip(model.parameters(), reference, strict=True):
        param.copy_(ref + (param - ref) * factor)


def estimate_round_examples(config: Mapping[str, Any], train_size: int) -> float:
    """Examples behind one round's aggregate: ``replace-total-examples``, or the estimate
    ``clients-per-round * train_size / num-partitions``."""
    if config["replace-total-examples"] > 0:
        return float(config["replace-total-examples"])
    return config["clients-per-round"] * train_size / config["num-partitions"]


def replacement_factor(config: Mapping[str, Any], train_size: int, attacker_examples: int) -> float:
    """``total / attacker_examples``: the model-replacement scale of the update."""
    if attacker_examples < 1:
        raise ValueError("model replacement needs at least one attacker example")
    return estimate_round_examples(config, train_size) / attacker_examples
