"""A3FL: a trigger optimised against the global model and against an adversarial copy of it
that has unlearned the trigger.

Zhang et al., "A3FL: Adversarially Adaptive Backdoor Attacks to Federated Learning", NeurIPS 2023.

Each attack round the attackers refine the trigger ``delta`` they relay from round to
round (:func:`search_trigger`), then train on their poisoned set stamped with it:

1. Adversarial model (:func:`unlearn`): a copy ``theta'`` of the global model ``theta``
   trained on the attacker's images *with* the trigger and their *true* labels, i.e.
   the server's best effort to unlearn the backdoor (SGD, ``a3fl-adv-lr``, momentum
   0.9, weight decay 5e-4, ``a3fl-adv-epochs`` epochs; the code's ``get_adv_model``).
2. Its weight ``lambda = a3fl-lambda * cos(theta', theta)`` (:func:`similarity`).
3. Trigger steps (:func:`trigger_step`) on every batch:
   ``delta <- clamp(delta - trigger-lr * sign(grad_delta L), 0, 1)`` with
   ``L = CE(f(x + delta; theta), target) + lambda * CE(f(x + delta; theta'), target)``.

Steps 1-3 repeat ``trigger-epochs`` times, a fresh adversarial model each time.

Differences from the released code (``fl_utils/attacker.py``), and why:

- ``lambda`` uses the cosine similarity of the two models' parameters, as the paper's
  ``sim(theta', theta)`` reads; the code averages the cosine of their conv layers'
  gradients (left over from the last backward pass);
- the adversarial model is built at the start of every trigger epoch, the first
  included; the code skips it in its first epoch (``iter != 0``);
- ``trigger-epochs`` (1) passes instead of the code's 200 ``trigger_outter_epochs``,
  with a larger step (``trigger-lr`` 0.02 in pixel units where the code steps 0.01 in
  normalised units, about 0.0035 pixel units on Fashion-MNIST), to stay a few passes
  per round on CPU; the trigger still accumulates over the rounds as it does there;
- the trigger is clamped to the valid pixel range ``[0, 1]`` (the code: ``[-2, 2]`` in
  normalised units) and sits on the ``trigger-size`` square in the bottom-right corner
  (the code: a ``trigger_size`` square at offset 2, 2), starting mid-grey as there;
- the images are the attacker's clean samples of its poisoned set (the code: its
  whole local loader).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional

__all__ = ["search_trigger", "similarity", "trigger_step", "unlearn"]

Preprocess = Callable[[torch.Tensor], torch.Tensor]


def _stamp(images: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weight = mask.to(images.dtype)
    return images * (1 - weight) + pattern * weight


def unlearn(
    model: nn.Module,
    pattern: torch.Tensor,
    mask: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    preprocess: Preprocess,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> nn.Module:
    """The adversarial model: a copy of ``model`` trained to classify triggered ``images``
    (float ``(N, C, H, W)`` in ``[0, 1]``) as their true ``labels`` ``(N,)``; ``model`` is untouched."""
    adversary = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(adversary.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    stamped = _stamp(images, pattern.detach(), mask)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for rows in torch.randperm(len(images), generator=generator).split(batch_size):
            optimizer.zero_grad()
            functional.cross_entropy(adversary(preprocess(stamped[rows])), labels[rows]).backward()
            optimizer.step()
    return adversary


def similarity(first: nn.Module, second: nn.Module) -> float:
    """Cosine similarity of the two models' flattened parameter vectors."""
    a = torch.cat([p.detach().flatten() for p in first.parameters()])
    b = torch.cat([p.detach().flatten() for p in second.parameters()])
    return float(functional.cosine_similarity(a, b, dim=0))


def trigger_step(
    model: nn.Module,
    adversaries: Sequence[tuple[nn.Module, float]],
    pattern: torch.Tensor,
    mask: torch.Tensor,
    images: torch.Tensor,
    target: int,
    preprocess: Preprocess,
    lr: float,
) -> torch.Tensor:
    """``clamp(pattern - lr * sign(grad L), 0, 1)``, ``L = CE(model) + sum_k lambda_k * CE(adversary_k)``
    on triggered ``images`` labelled ``target``; ``adversaries``: ``(model, lambda)`` pairs."""
    pattern = pattern.detach().clone().requires_grad_(True)
    inputs = preprocess(_stamp(images, pattern, mask))
    labels = torch.full((len(images),), target, dtype=torch.int64, device=images.device)
    loss = functional.cross_entropy(model(inputs), labels)
    for adversary, weight in adversaries:
        loss = loss + weight * functional.cross_entropy(adversary(inputs), labels)
    (grad,) = torch.autograd.grad(loss, pattern)
    return (pattern - lr * grad.sign()).detach().clamp(0, 1)


def search_trigger(
    model: nn.Module,
    pattern: torch.Tensor,
    mask: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    target: int,
    preprocess: Preprocess,
    *,
    epochs: int,
    lr: float,
    adv_epochs: int,
    adv_lr: float,
    lambda0: float,
    batch_size: int,
    seed: int,
) -> torch.Tensor:
    """The refined pattern ``(C, H, W)`` after ``epochs`` rounds of steps 1-3 (module docstring).

    ``model`` is not changed (its train/eval mode is restored).
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        adversaries = []
        if adv_epochs:
            adversary = unlearn(
                model, pattern, mask, images, labels, preprocess,
                epochs=adv_epochs, lr=adv_lr, batch_size=batch_size, seed=seed + 1 + epoch,
            )  # fmt: skip
            adversaries.append((adversary.eval(), lambda0 * similarity(adversary, model)))
        for rows in torch.randperm(len(images), generator=generator).split(batch_size):
            pattern = trigger_step(model, adversaries, pattern, mask, images[rows], target, preprocess, lr)
    model.train(was_training)
    return pattern
