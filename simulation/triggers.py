"""Pixel-pattern triggers of the ``backdoor = "pixel"`` attacks: a pattern and where it is stamped.

A :class:`Trigger` is a float pattern in pixel units ``[0, 1]`` and a boolean
``(H, W)`` mask; stamping replaces the masked pixels of every channel by the
pattern. On uint8 images the pattern is rounded to ``0..255``
(:meth:`Trigger.stamp`); on float images in ``[0, 1]`` stamping is differentiable
in the pattern (:meth:`Trigger.stamp_float`), which is what trigger optimisation
(:mod:`simulation.f3ba`, :mod:`simulation.a3fl`) needs.

Which trigger an attacker stamps and which one ``acc_backdoor`` is measured with
depends on the attack (:func:`attacker_trigger`, :func:`evaluation_trigger`):

- every mode but the three below: the white ``trigger-size`` square in the
  bottom-right corner (BadNets-style, :func:`square_trigger`);
- ``"dba"``: the attacker's own part of the distributed trigger, the full trigger
  (every part) at test time (:mod:`simulation.dba`);
- ``"f3ba"``, ``"a3fl"``: the trigger the attackers optimised last (sent back with
  their replies, relayed by the server, see :func:`simulation.server_app.run_rounds`),
  else the attack's starting trigger.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message

from . import dba

__all__ = [
    "OPTIMISED_TRIGGER_ATTACKS",
    "RELAY_KEY",
    "REPLY_RECORD",
    "Trigger",
    "TriggerRelay",
    "attacker_trigger",
    "initial_trigger",
    "mean_trigger",
    "reply_record",
    "square_trigger",
    "evaluation_trigger",
]

#: Attack modes that optimise their trigger from round to round.
OPTIMISED_TRIGGER_ATTACKS = ("f3ba", "a3fl")


@dataclass(frozen=True, eq=False)
class Trigger:
    """A pixel pattern and its mask.

    Attributes
    ----------
    pattern : torch.Tensor
        float32 ``(C, H, W)``, pixel values in ``[0, 1]`` (only masked pixels matter).
    mask : torch.Tensor
        bool ``(H, W)``: the pixels the trigger replaces.
    """

    pattern: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        if (
            self.pattern.ndim != 3
            or self.mask.shape != self.pattern.shape[1:]
            or self.mask.dtype != torch.bool
        ):
            raise ValueError(
                f"a trigger needs a (C, H, W) pattern and a bool (H, W) mask, got "
                f"{tuple(self.pattern.shape)} and {self.mask.dtype} {tuple(self.mask.shape)}"
            )

    def stamp(self, images: torch.Tensor) -> torch.Tensor:
        """Copy of uint8 ``(N, C, H, W)`` images with the pattern (rounded to 0..255) on the mask."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1:] != self.pattern.shape:
            shape = ", ".join(map(str, self.pattern.shape))
            raise ValueError(f"the pixel trigger needs uint8 images of shape (N, {shape})")
        pixels = (self.pattern.clamp(0, 1) * 255).round().to(torch.uint8)
        return torch.where(self.mask, pixels, images)

    def stamp_float(self, images: torch.Tensor, pattern: torch.Tensor | None = None) -> torch.Tensor:
        """``images * (1 - mask) + pattern * mask`` for float ``(N, C, H, W)`` images in ``[0, 1]``.

        ``pattern`` (default: this trigger's) may require grad; the result is differentiable in it.
        """
        pattern = self.pattern if pattern is None else pattern
        mask = self.mask.to(images.dtype)
        return images * (1 - mask) + pattern * mask

    def with_pattern(self, pattern: torch.Tensor) -> Trigger:
        """The same mask with another pattern (detached, clamped to ``[0, 1]``)."""
        return Trigger(pattern.detach().clamp(0, 1).to(torch.float32), self.mask)

    def to_bytes(self) -> bytes:
        """Serialised form (an ``.npz`` of ``pattern`` and ``mask``; read without pickle)."""
        buffer = io.BytesIO()
        np.savez(buffer, pattern=self.pattern.numpy(), mask=self.mask.numpy())
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Trigger:
        """Inverse of :meth:`to_bytes`; ``ValueError`` if ``data`` is not a serialised trigger."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                pattern, mask = npz["pattern"], npz["mask"]
        except (KeyError, OSError, ValueError) as error:
            raise ValueError(f"not a serialised trigger: {error}") from None
        return cls(torch.from_numpy(pattern.astype(np.float32)), torch.from_numpy(mask.astype(bool)))


def square_trigger(shape: Sequence[int], size: int) -> Trigger:
    """The white ``size`` x ``size`` square in the bottom-right corner of ``(C, H, W)`` images."""
    channels, height, width = shape
    if not 1 <= size <= min(height, width):
        raise ValueError(f"run config 'trigger-size' must be in [1, {min(height, width)}], got {size!r}")
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[-size:, -size:] = True
    return Trigger(torch.ones(channels, height, width), mask)


def initial_trigger(config: Mapping[str, Any], shape: Sequence[int]) -> Trigger:
    """The trigger an optimising attack starts from: on the ``trigger-size`` square,
    mid-grey (0.5, A3FL's start) for ``"a3fl"``; for ``"f3ba"`` seeded uniform noise
    (its flip aligns filters with the pattern's signs, which a flat pattern has none of)."""
    square = square_trigger(shape, config["trigger-size"])
    if config["attack"] == "f3ba":
        generator = torch.Generator().manual_seed(int(config["seed"]) ^ 0xF3BA)
        return square.with_pattern(torch.rand(tuple(shape), generator=generator))
    return square.with_pattern(torch.full(tuple(shape), 0.5))


def attacker_trigger(
    config: Mapping[str, Any],
    shape: Sequence[int],
    partition_id: int,
    server_round: int,
    relayed: Trigger | None = None,
) -> Trigger:
    """The trigger partition ``partition_id`` stamps on its backdoor samples in ``server_round``.

    ``relayed``: the trigger the server sent this round (optimising attacks only).
    """
    attack = config["attack"]
    if attack == "dba":
        part = dba.attacker_part(config, partition_id, server_round)
        return Trigger(
            torch.ones(tuple(shape)),
            dba.part_masks(shape[1:], config["dba-parts"], config["trigger-size"])[part],
        )
    if attack in OPTIMISED_TRIGGER_ATTACKS:
        return relayed if relayed is not None else initial_trigger(config, shape)
    return square_trigger(shape, config["trigger-size"])


def evaluation_trigger(
    config: Mapping[str, Any], shape: Sequence[int], relayed: Trigger | None = None
) -> Trigger:
    """The trigger ``acc_backdoor`` is measured with (DBA: the union of all its parts)."""
    if config["attack"] == "dba":
        masks = dba.part_masks(shape[1:], config["dba-parts"], config["trigger-size"])
        return Trigger(torch.ones(tuple(shape)), torch.stack(masks).any(dim=0))
    if config["attack"] in OPTIMISED_TRIGGER_ATTACKS:
        return relayed if relayed is not None else initial_trigger(config, shape)
    return square_trigger(shape, config["trigger-size"])


def mean_trigger(triggers: Sequence[Trigger]) -> Trigger:
    """The colluders' triggers merged: the mean pattern (their masks must agree)."""
    if not triggers:
        raise ValueError("no trigger to average")
    mask = triggers[0].mask
    if any(not torch.equal(t.mask, mask) or t.pattern.shape != triggers[0].pattern.shape for t in triggers):
        raise ValueError("the attackers' triggers have different masks or shapes")
    return Trigger(torch.stack([t.pattern for t in triggers]).mean(dim=0), mask)


#: The train config entry carrying the relayed trigger to the clients (bytes of :meth:`Trigger.to_bytes`).
RELAY_KEY = "attack-trigger"
#: The ConfigRecord of an attacker's reply carrying its optimised trigger (``trigger``, ``partition-id``).
REPLY_RECORD = "trigger"


def reply_record(trigger: Trigger, partition_id: int) -> ConfigRecord:
    """What an attacker adds to its reply under :data:`REPLY_RECORD` (the strategies ignore it)."""
    return ConfigRecord({"trigger": trigger.to_bytes(), "partition-id": partition_id})


class TriggerRelay:
    """The server's copy of the attackers' latest trigger (``f3ba``, ``a3fl``).

    A simulation device, like the replies' ``attacker`` label: colluding attackers
    share their trigger from round to round, and ``acc_backdoor`` is measured with it.
    Each round :meth:`collect` takes the triggers of the round's attackers from their
    replies (their mean, in partition order) and :meth:`attach` sends the latest one
    to the next round's clients in the train config.
    """

    def __init__(self, current: Trigger | None = None) -> None:
        self.current = current

    def attach(self, train_config: ConfigRecord) -> None:
        """Put the latest trigger (if any) in ``train_config`` under :data:`RELAY_KEY`."""
        if self.current is not None:
            train_config[RELAY_KEY] = self.current.to_bytes()

    def collect(self, replies: Iterable[Message]) -> None:
        """Take the mean of the triggers in ``replies`` (those without an error), if any."""
        found = []
        for reply in replies:
            if not reply.has_error() and REPLY_RECORD in reply.content:
                record = reply.content[REPLY_RECORD]
                found.append((int(record["partition-id"]), Trigger.from_bytes(bytes(record["trigger"]))))
        if found:
            self.current = mean_trigger([trigger for _, trigger in sorted(found, key=lambda item: item[0])])
