"""F3BA: flip the signs of a few candidate weights of the first conv layer toward the trigger
and optimise the trigger to excite the flipped filters.

Fang and Chen, "On the Vulnerability of Backdoor Defenses for Federated Learning"
(Focused-Flip Federated Backdoor Attack), AAAI 2023.

One attack round (:func:`focused_flip`), as in the released code's ``handcraft``:

1. Candidates: in the first conv layer's weight ``w``, the ``f3ba-flip-fraction``
   with the lowest movement score ``s = -g * w`` (:func:`candidate_mask`), ``g`` the
   gradient of the clean cross-entropy on the attacker's clean samples.
2. Flip (:func:`flip_toward_pattern`): the trigger patch, resized to the kernel and
   scaled per filter into that filter's ``[min, max]``, gives each candidate its new
   sign; a candidate keeps its magnitude ``|w|``, times ``f3ba-flip-factor`` where the
   sign changed.
3. Trigger (:func:`trigger_step`): with the flipped filters, ascend
   ``L(delta) = || mean_{n,c} relu(conv(x + delta)) - mean_{n,c} relu(conv(x)) ||^2``
   (the squared gap of the channel-mean activation maps, triggered minus clean) for
   ``trigger-epochs`` passes over the attacker's clean samples; the filters are re-flipped
   toward the current pattern before every step.
4. The filters are flipped toward the final trigger and stay so; the attacker then
   trains on its poisoned set stamped with that trigger (:mod:`simulation.attackers`).

Differences from the released code, and why:

- the score's movement ``w_t - w_{t-1}`` (the global model's change since the
  previous round, which needs state a stateless client lacks) is replaced by one
  gradient step's ``-lr * g``, which it approximates; the sign and ranking are the same
  up to the positive factor ``lr``;
- the trigger step is ``delta + trigger-lr * sign(grad)`` clamped to the valid pixel
  range, where the code adds ``0.1 * grad``: a sign step does not depend on the scale
  of the activations (which differs between models) and is the step A3FL uses;
- only the first conv layer is flipped: the code goes on flipping candidates of
  deeper conv layers toward the activation gap of the layer before and, every third
  round, of the dense layers (``inject_handcrafted_neurons``); those are left out;
- ``relu(conv(x))`` is the first activation (the code's ``first_activations``; on
  ResNets it passes BatchNorm first, left out here);
- the code optimises on a held-out 20% of the attacker's data; here it is the
  attacker's clean samples of its poisoned set.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional

__all__ = [
    "activation_gap",
    "candidate_mask",
    "first_conv",
    "flip_toward_pattern",
    "focused_flip",
    "trigger_step",
]

Preprocess = Callable[[torch.Tensor], torch.Tensor]


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The model's first ``Conv2d`` (the one applied to the input in the project's image models)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module
    raise ValueError(f"F3BA flips a first conv layer; {type(model).__name__} has none")


def candidate_mask(weight: torch.Tensor, grad: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool mask (shape of ``weight``) of the ``int(fraction * numel)`` (at least 1) entries
    with the lowest score ``-grad * weight``."""
    score = -(grad * weight).flatten()
    count = max(1, int(weight.numel() * fraction))
    mask = torch.zeros(weight.numel(), dtype=torch.bool)
    mask[torch.topk(score, count, largest=False).indices] = True
    return mask.reshape(weight.shape)


def _patch(pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The pattern ``(C, H, W)`` cut to the bounding box of ``mask`` ``(H, W)``."""
    rows, columns = torch.nonzero(mask, as_tuple=True)
    return pattern[:, int(rows.min()) : int(rows.max()) + 1, int(columns.min()) : int(columns.max()) + 1]


def flip_toward_pattern(
    kernel: torch.Tensor, candidates: torch.Tensor, patch: torch.Tensor, flip_factor: float
) -> torch.Tensor:
    """Candidates of ``kernel`` ``(O, I, kh, kw)`` signed like the trigger ``patch`` ``(I, h, w)``.

    The patch is resized (bilinear) to ``(kh, kw)``, min-max scaled into each filter's
    ``[min, max]``; a candidate becomes ``sign(scaled) * |w|``, times ``flip_factor`` where
    its sign changed; other weights are unchanged. Returns a new tensor.
    """
    resized = functional.interpolate(patch[None], size=kernel.shape[2:], mode="bilinear", antialias=True)[0]
    low, high = resized.min(), resized.max()
    unit = (resized - low) / (high - low) if high > low else torch.zeros_like(resized)
    k_low = kernel.amin(dim=(1, 2, 3), keepdim=True)
    k_high = kernel.amax(dim=(1, 2, 3), keepdim=True)
    sign = torch.sign(unit[None] * (k_high - k_low) + k_low)
    flipped = sign * kernel.abs()
    flipped = torch.where(sign != torch.sign(kernel), flipped * flip_factor, flipped)
    return torch.where(candidates, flipped, kernel)


def activation_gap(
    conv: nn.Conv2d, images: torch.Tensor, stamped: torch.Tensor, preprocess: Preprocess
) -> torch.Tensor:
    """``sum((mean_{n,c} relu(conv(stamped)) - mean_{n,c} relu(conv(images)))^2)``.

    ``images``, ``stamped``: float ``(N, C, H, W)`` in ``[0, 1]``; returns a scalar.
    """
    clean = functional.relu(conv(preprocess(images))).mean(dim=(0, 1))
    triggered = functional.relu(conv(preprocess(stamped))).mean(dim=(0, 1))
    return ((triggered - clean) ** 2).sum()


def trigger_step(
    conv: nn.Conv2d,
    pattern: torch.Tensor,
    mask: torch.Tensor,
    images: torch.Tensor,
    preprocess: Preprocess,
    lr: float,
) -> torch.Tensor:
    """One ascent step on :func:`activation_gap`: ``clamp(pattern + lr * sign(grad), 0, 1)`` on the mask.

    ``pattern``: float ``(C, H, W)``; ``mask``: bool ``(H, W)``; ``images``: float
    ``(N, C, H, W)`` in ``[0, 1]``.
    """
    pattern = pattern.detach().clone().requires_grad_(True)
    weight = mask.to(images.dtype)
    loss = activation_gap(conv, images, images * (1 - weight) + pattern * weight, preprocess)
    (grad,) = torch.autograd.grad(loss, pattern)
    return (pattern + lr * grad.sign()).detach().clamp(0, 1)


def focused_flip(
    model: nn.Module,
    pattern: torch.Tensor,
    mask: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    preprocess: Preprocess,
    *,
    fraction: float,
    flip_factor: float,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> tuple[torch.Tensor, int]:
    """One F3BA round on ``model`` in place (steps 1-4 of the module docstring).

    ``images``: the attacker's clean float ``(N, C, H, W)`` images in ``[0, 1]`` with
    their int64 labels ``(N,)``. Returns the optimised pattern ``(C, H, W)`` and the
    number of candidates whose sign the final flip changed.
    """
    conv = first_conv(model)
    model.zero_grad()
    functional.cross_entropy(model(preprocess(images)), labels).backward()
    grad = conv.weight.grad.detach().clone()
    model.zero_grad()
    raw = conv.weight.detach().clone()
    candidates = candidate_mask(raw, grad, fraction)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for rows in torch.randperm(len(images), generator=generator).split(batch_size):
            with torch.no_grad():
                conv.weight.copy_(flip_toward_pattern(raw, candidates, _patch(pattern, mask), flip_factor))
            pattern = trigger_step(conv, pattern, mask, images[rows], preprocess, lr)
    final = flip_toward_pattern(raw, candidates, _patch(pattern, mask), flip_factor)
    with torch.no_grad():
        conv.weight.copy_(final)
    return pattern, int((torch.sign(final) != torch.sign(raw)).sum())
