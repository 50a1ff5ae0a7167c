"""Local training and evaluation loops, one client's round, and the server-side evaluate_fn."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from logging import INFO
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import log
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from . import attacks
from .attackers import AttackContext, make_attacker
from .data import TaskData, load_partitions, load_task
from .models import build_model, get_device
from .partition import is_attacking, malicious_pool
from .triggers import Trigger, attacker_trigger, evaluation_trigger

__all__ = [
    "ClientResult",
    "backdoor_accuracy",
    "evaluate",
    "is_full_evaluation",
    "local_update",
    "make_evaluate_fn",
    "model_for",
    "predict",
    "train",
]

Preprocess = Callable[[torch.Tensor], torch.Tensor]

#: Seed entropy of pretraining rounds (client sampling, batch order): they do not replay round r's.
PRETRAIN_STREAM = 0x9E7


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    preprocess: Preprocess,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    device: torch.device | str = "cpu",
    seed: int = 0,
    after_step: Callable[[int], None] | None = None,
) -> float:
    """Local SGD with cross-entropy; returns the mean training loss over all batches.

    ``x``: model inputs before ``preprocess`` (uint8 images or float features),
    ``y``: int64 labels. Batches are shuffled with ``seed``. ``after_step(k)`` is
    called after the k-th optimizer step (k from 1), e.g. a PGD projection.
    """
    model.to(device).train()
    loader = DataLoader(
        TensorDataset(x, y),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    criterion = nn.CrossEntropyLoss()
    total, batches, step = 0.0, 0, 0
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = criterion(model(preprocess(xb.to(device))), yb.to(device))
            loss.backward()
            optimizer.step()
            step += 1
            if after_step is not None:
                after_step(step)
            total += float(loss.detach())
            batches += 1
    return total / max(1, batches)


@torch.no_grad()
def predict(
    model: nn.Module,
    x: torch.Tensor,
    preprocess: Preprocess,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, predicted labels)`` on the CPU for inputs ``x`` (N, ...)."""
    model.to(device).eval()
    logits = [model(preprocess(x[i : i + batch_size].to(device))).cpu() for i in range(0, len(x), batch_size)]
    out = torch.cat(logits) if logits else torch.empty(0)
    return out, out.argmax(dim=1) if len(out) else torch.empty(0, dtype=torch.int64)


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    preprocess: Preprocess,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> tuple[float, float]:
    """``(mean cross-entropy loss, accuracy)`` of ``model`` on ``(x, y)``."""
    logits, labels = predict(model, x, preprocess, batch_size, device)
    loss = float(nn.functional.cross_entropy(logits, y)) if len(y) else 0.0
    return loss, float((labels == y).float().mean()) if len(y) else 0.0


def backdoor_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    target: int,
    preprocess: Preprocess,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> float:
    """Fraction of the backdoor inputs ``x`` that ``model`` classifies as ``target``."""
    _, labels = predict(model, x, preprocess, batch_size, device)
    return float((labels == target).float().mean()) if len(labels) else 0.0


def model_for(task: TaskData, config: Mapping[str, Any], pretrained_weights: bool = False) -> nn.Module:
    """A fresh model of run config ``model`` fitting ``task``'s inputs (seeded by ``seed``).

    ``pretrained_weights``: load ``resnet18-imagenet``'s ImageNet weights; only the
    server's initial model needs them, every other caller loads a state dict next.
    """
    torch.manual_seed(config["seed"])
    if task.is_text:
        return build_model(
            config["model"],
            task.num_classes,
            vocab_size=task.vocab_size,
            embedding_dim=config["lstm-embedding-dim"],
            hidden_dim=config["lstm-hidden-dim"],
        )
    if task.is_image:
        return build_model(
            config["model"],
            task.num_classes,
            task.train_x.shape[1],
            task.train_x.shape[-1],
            pretrained_weights=pretrained_weights,
        )
    return build_model(config["model"], task.num_classes, num_features=task.train_x.shape[1])


@dataclass
class ClientResult:
    """One client's round: trained ``state_dict`` and its metrics."""

    state_dict: dict[str, torch.Tensor]
    num_examples: int
    train_loss: float
    attacking: bool
    update_norm: float
    trigger: Trigger | None = None  # the trigger the attacker optimised, for the server to relay


def train_as_configured(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    task: TaskData,
    config: Mapping[str, Any],
    device: torch.device,
    seed: int,
    after_step: Callable[[int], None] | None = None,
) -> float:
    """:func:`train` with the run config's local-training settings; returns the mean loss."""
    return train(
        model,
        x,
        y,
        task.preprocess,
        epochs=config["local-epochs"],
        batch_size=config["batch-size"],
        lr=config["lr"],
        momentum=config["momentum"],
        weight_decay=config["weight-decay"],
        device=device,
        seed=seed,
        after_step=after_step,
    )


def local_update(
    config: Mapping[str, Any],
    partition_id: int,
    server_round: int,
    global_state: Mapping[str, torch.Tensor],
    pretrain: bool = False,
    trigger: Trigger | None = None,
) -> ClientResult:
    """Train the global model on partition ``partition_id``: benignly, or as the attacker.

    Whether this partition attacks in ``server_round`` follows the run config
    (``malicious-fraction``, ``attack-schedule``, ``attack-every``, ``seed``);
    ``attack = "none"`` makes every client benign, and so does ``pretrain``
    (a round of :mod:`simulation.pretrain`, with its own shuffling seeds). An
    attacker trains on its poisoned set with the hooks of its
    :class:`simulation.attackers.Attack`. ``trigger``: the trigger the server relayed
    this round (``f3ba``, ``a3fl``; see :func:`simulation.triggers.attacker_trigger`).
    """
    task = load_task(config)
    parts = load_partitions(config)
    if not 0 <= partition_id < len(parts):
        raise ValueError(f"partition-id {partition_id} is outside [0, num-partitions={len(parts)})")
    device = get_device(config["device"])
    model = model_for(task, config)
    model.load_state_dict(global_state)
    model.to(device)
    reference = attacks.global_snapshot(model)
    entropy = [config["seed"], partition_id, server_round] + ([PRETRAIN_STREAM] if pretrain else [])
    seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])
    rows = torch.from_numpy(parts[partition_id])
    x, y = task.train_x[rows], task.train_y[rows]

    def train_fn(net: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_seed: int) -> float:
        return train_as_configured(net, inputs, labels, task, config, device, batch_seed)

    attacker = None
    if _attacks_in(config, partition_id, server_round, pretrain):
        stamp = None
        if config["backdoor"] == "pixel":
            stamp = attacker_trigger(config, task.train_x.shape[1:], partition_id, server_round, trigger)
        poisoned_x, poisoned_y, num_bad = attacks.poisoned_dataset(
            task, parts[partition_id], config, np.random.default_rng(seed), stamp
        )
        log(
            INFO,
            "partition %d attacks in round %d (%s, %d backdoor + %d clean samples)",
            partition_id,
            server_round,
            config["attack"],
            num_bad,
            len(poisoned_y) - num_bad,
        )
        context = AttackContext(
            model, reference, task, x, y, poisoned_x, poisoned_y, config, seed, train_fn, stamp, num_bad,
            pool_rank=malicious_pool(config).index(partition_id), server_round=server_round,
        )  # fmt: skip
        attacker = make_attacker(context)
        attacker.before()
        x, y = attacker.training_set()
    loss = train_as_configured(
        model, x, y, task, config, device, seed, attacker.after_step if attacker else None
    )
    if attacker:
        attacker.finish()
    norm = attacks.update_norm(model, reference)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    trigger_out = attacker.trigger_out if attacker else None
    return ClientResult(state, len(y), loss, attacker is not None, norm, trigger_out)


def _attacks_in(config: Mapping[str, Any], partition_id: int, server_round: int, pretrain: bool) -> bool:
    """Whether ``partition_id`` attacks in ``server_round``: never in pretraining or with
    ``attack = "none"``, else as the malicious pool and the attack schedule say."""
    attackers = malicious_pool(config)
    return (
        not pretrain
        and config["attack"] != "none"
        and is_attacking(
            partition_id,
            server_round,
            attackers,
            config["attack-schedule"],
            config["attack-every"],
            config["attack-start-round"],
        )
    )


def is_full_evaluation(server_round: int, config: Mapping[str, Any]) -> bool:
    """Whether ``server_round`` evaluates the clean test set: round 0, every ``eval-every``-th, the last."""
    every, last = config["eval-every"], config["num-server-rounds"]
    return server_round == 0 or server_round == last or server_round % every == 0


def make_evaluate_fn(
    config: Mapping[str, Any], relayed: Callable[[], Trigger | None] | None = None
) -> Callable[[int, ArrayRecord], MetricRecord]:
    """Server-side ``evaluate_fn(server_round, arrays) -> MetricRecord`` for ``strategy.start``.

    Metrics: ``acc_backdoor`` every round (fraction of the backdoor test inputs
    classified as ``target-label``; see :func:`simulation.attacks.backdoor_test_inputs`;
    a few hundred inputs, so cheap), and on the rounds :func:`is_full_evaluation`
    picks (``eval-every``) ``acc_main`` (accuracy on the clean test set) and
    ``loss`` (its mean cross-entropy). ``relayed()``: the attackers' latest trigger
    (``f3ba``, ``a3fl``), which the pixel backdoor's test inputs then carry
    (:func:`simulation.triggers.evaluation_trigger`).
    """
    task = load_task(config)

    def inputs_for(trigger: Trigger | None) -> torch.Tensor:
        if config["backdoor"] != "pixel":
            return attacks.backdoor_test_inputs(task, config)
        return attacks.backdoor_test_inputs(
            task, config, evaluation_trigger(config, task.test_x.shape[1:], trigger)
        )

    shown: list[Any] = [None, inputs_for(None)]  # the relayed trigger the inputs carry, the inputs
    device = get_device(config["device"])
    model = model_for(task, config)
    batch = config["eval-batch-size"]

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        latest = relayed() if relayed is not None else None
        if latest is not shown[0]:
            shown[:] = [latest, inputs_for(latest)]
        acc_b = backdoor_accuracy(model, shown[1], config["target-label"], task.preprocess, batch, device)
        if not is_full_evaluation(server_round, config):
            return MetricRecord({"acc_backdoor": acc_b})
        loss, acc = evaluate(model, task.test_x, task.test_y, task.preprocess, batch, device)
        return MetricRecord({"acc_main": acc, "acc_backdoor": acc_b, "loss": loss})

    return evaluate_fn
