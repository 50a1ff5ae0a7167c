"""The attack modes of a malicious client (run config ``attack``), one object each.

:func:`simulation.training.local_update` trains an attacking client on its
poisoned set (:func:`simulation.attacks.poisoned_dataset`) and calls its
:class:`Attack`'s hooks: :meth:`~Attack.before` training, :meth:`~Attack.after_step`
after every optimizer step, :meth:`~Attack.finish` on the trained model. Modes:

- ``"blackbox"``: plain local training on the poisoned set (no hooks).
- ``"pgd"``: after every ``project-every`` optimizer steps and at the end, the
  whole parameter vector is projected onto the L2 ball of radius ``pgd-eps``
  around the global model.
- ``"pgd-replace"``: PGD, then the update ``w - w_global`` is multiplied by
  ``total / attacker_examples`` (model replacement; see
  :func:`simulation.attacks.replacement_factor`).
- ``"alie"``, ``"neurotoxin"``, ``"mask-tipping"``, ``"bloc-evasion"``, ``"split-evasion"``,
  ``"rotating-evasion"``: attackers that know the defense;
  they first train benign estimates on their own clean data (see :mod:`simulation.adaptive`).
- ``"dba"``, ``"f3ba"``, ``"a3fl"`` (``backdoor = "pixel"``): attacks with a trigger of their
  own (:mod:`simulation.triggers`): DBA's distributed trigger (:mod:`simulation.dba`),
  F3BA's flipped filters and trigger (:mod:`simulation.f3ba`), A3FL's adversarially
  optimised trigger (:mod:`simulation.a3fl`).

``"none"`` (every client benign) has no object. A new mode is a subclass of
:class:`Attack` (or :class:`EstimatingAttack`, to start from benign estimates)
with a ``name``, listed in :data:`ATTACKERS` and in
:data:`simulation.config.ATTACKS`.

An attack may also change its training set (:meth:`Attack.training_set`, called after
:meth:`~Attack.before`) and hand back a trigger for the server to relay (:attr:`Attack.trigger_out`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torchvision.transforms import v2

from . import a3fl, adaptive, attacks, f3ba
from .data import TaskData
from .triggers import Trigger

__all__ = [
    "A3FL",
    "ALIE",
    "ATTACKERS",
    "DBA",
    "F3BA",
    "PGD",
    "Attack",
    "AttackContext",
    "Blackbox",
    "BlocEvasion",
    "EstimatingAttack",
    "MaskTipping",
    "Neurotoxin",
    "PGDReplace",
    "TrainFn",
    "benign_estimates",
    "make_attacker",
]

#: ``train(model, x, y, seed) -> mean loss``: the client's local training (run
#: config settings, batch order shuffled with ``seed``), applied to ``model`` in place.
TrainFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], float]


@dataclass(frozen=True)
class AttackContext:
    """What a malicious client has in a round it attacks.

    Attributes
    ----------
    model : nn.Module
        The model it trains, in place; holds the global model until training starts.
    reference : sequence of torch.Tensor
        The global model's parameters (detached copies, ``model.parameters()`` order).
    task : TaskData
    own_x, own_y : torch.Tensor
        Its partition's clean training inputs ``(n, ...)`` and int64 labels ``(n,)``.
    x, y : torch.Tensor
        Its poisoned training set (backdoor samples first), ``(m, ...)`` and ``(m,)``.
    config : mapping
        The resolved run config.
    seed : int
        The client's round seed (its batch order; benign estimates use ``seed + 1 + k``).
    train : TrainFn
        Local training as benign clients do it.
    trigger : Trigger or None
        The pixel trigger stamped on the backdoor samples (``backdoor = "pixel"``).
    num_backdoor : int
        How many leading rows of ``x`` are backdoor samples.
    pool_rank : int
        Its index in the malicious pool (:func:`simulation.partition.malicious_pool`), which
        colluders use to share work out.
    server_round : int
        The round it attacks in (colluders that rotate their shares use it).
    """

    model: nn.Module
    reference: Sequence[torch.Tensor]
    task: TaskData
    own_x: torch.Tensor
    own_y: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    config: Mapping[str, Any]
    seed: int
    train: TrainFn
    trigger: Trigger | None = None
    num_backdoor: int = 0
    pool_rank: int = 0
    server_round: int = 0


class Attack:
    """One round of an attack mode: hooks around local training on the poisoned set.

    The base class has no-op hooks, i.e. plain training on the poisoned set.
    """

    name: ClassVar[str]
    #: The trigger this attacker optimised, for the server to relay (``None``: nothing to relay).
    trigger_out: Trigger | None = None

    def __init__(self, context: AttackContext) -> None:
        self.context = context

    def before(self) -> None:
        """Called once before local training."""

    def after_step(self, step: int) -> None:
        """Called after the ``step``-th optimizer step (from 1)."""

    def finish(self) -> None:
        """Called once on the trained model; may edit ``context.model`` in place."""

    def training_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The set local training runs on, asked after :meth:`before`: ``(context.x, context.y)``."""
        return self.context.x, self.context.y


class Blackbox(Attack):
    """Plain local training on the poisoned set."""

    name = "blackbox"


class PGD(Attack):
    """Projection onto the L2 ball of radius ``pgd-eps`` around the global model,
    every ``project-every`` optimizer steps and after training."""

    name = "pgd"

    def __init__(self, context: AttackContext) -> None:
        super().__init__(context)
        config = context.config
        self._project = attacks.pgd_hook(
            context.model, context.reference, config["pgd-eps"], config["project-every"]
        )

    def after_step(self, step: int) -> None:
        self._project(step)

    def finish(self) -> None:
        attacks.project_l2_(self.context.model, self.context.reference, self.context.config["pgd-eps"])


class PGDReplace(PGD):
    """PGD, then the update scaled by ``total / attacker_examples`` (model replacement)."""

    name = "pgd-replace"

    def finish(self) -> None:
        super().finish()
        context = self.context
        factor = attacks.replacement_factor(context.config, len(context.task.train_y), len(context.y))
        attacks.scale_update_(context.model, context.reference, factor)


def benign_estimates(context: AttackContext) -> torch.Tensor:
    """``adaptive-estimates`` benign updates ``(K, P)``: copies of the global model
    trained on the attacker's clean data, the k-th with batch-order seed ``seed + 1 + k``.

    What an adaptive attacker uses to guess the benign clients' updates;
    ``context.model`` itself is not changed.
    """
    estimates = []
    for k in range(context.config["adaptive-estimates"]):
        twin = copy.deepcopy(context.model)
        context.train(twin, context.own_x, context.own_y, context.seed + 1 + k)
        estimates.append(adaptive.flat_update(twin, context.reference))
    return torch.stack(estimates)


class EstimatingAttack(Attack):
    """An attack that starts from :func:`benign_estimates` (kept in ``self.benign``, ``(K, P)``)."""

    benign: torch.Tensor

    def before(self) -> None:
        self.benign = benign_estimates(self.context)


class ALIE(EstimatingAttack):
    """The backdoor update kept only where it passes for benign (:func:`simulation.adaptive.alie_update`)."""

    name = "alie"

    def finish(self) -> None:
        context, config = self.context, self.context.config
        backdoor = adaptive.flat_update(context.model, context.reference)
        chosen = adaptive.alie_update(backdoor, self.benign, config["adaptive-z"], config["tau"])
        adaptive.set_flat_update_(context.model, context.reference, chosen)


class Neurotoxin(EstimatingAttack):
    """The ``neurotoxin-top`` most benign-updated coordinates held at the global
    model's values after every step and after training."""

    name = "neurotoxin"

    def before(self) -> None:
        super().before()
        frozen = adaptive.top_coordinates(self.benign.mean(dim=0), self.context.config["neurotoxin-top"])
        self._reset = adaptive.neurotoxin_hook(self.context.model, self.context.reference, frozen)

    def after_step(self, step: int) -> None:
        self._reset(step)

    def finish(self) -> None:
        self._reset(0)


class MaskTipping(EstimatingAttack):
    """Votes where the colluders tip the AND-mask toward the backdoor, with benign-looking values
    (:func:`simulation.adaptive.mask_tipping_update`); the benign mean elsewhere.

    It knows the defense's ``tau`` and the round's size and expects
    ``round(malicious-fraction * clients-per-round)`` colluders (at least 1; 1 under
    ``every-k``). The ``trim-ratio`` needs no estimate: values inside the benign range
    are the ones a trimmed mean keeps.
    """

    name = "mask-tipping"

    def finish(self) -> None:
        context, config = self.context, self.context.config
        per_round = config["clients-per-round"]
        colluders = 1
        if config["attack-schedule"] == "pool":
            colluders = min(per_round, max(1, round(config["malicious-fraction"] * per_round)))
        backdoor = adaptive.flat_update(context.model, context.reference)
        update, _ = adaptive.mask_tipping_update(
            backdoor,
            self.benign,
            tau=config["tau"],
            clients_per_round=per_round,
            colluders=colluders,
            z=config["adaptive-z"],
        )
        adaptive.set_flat_update_(context.model, context.reference, update)


class BlocEvasion(EstimatingAttack):
    """The backdoor update on the ``evasion-keep`` fraction of coordinates where it departs most from
    the benign estimates, their mean elsewhere (:func:`simulation.adaptive.bloc_evasion_update`)."""

    name = "bloc-evasion"

    def finish(self) -> None:
        context = self.context
        backdoor = adaptive.flat_update(context.model, context.reference)
        update, _ = adaptive.bloc_evasion_update(backdoor, self.benign, context.config["evasion-keep"])
        adaptive.set_flat_update_(context.model, context.reference, update)


class SplitEvasion(EstimatingAttack):
    """:class:`BlocEvasion` on this attacker's share of the coordinates, by pool rank modulo
    ``evasion-parts`` (:func:`simulation.adaptive.split_evasion_update`)."""

    name = "split-evasion"

    def share(self) -> tuple[int, int]:
        """``(part, parts)``: this attacker's share of the coordinates this round."""
        parts = self.context.config["evasion-parts"]
        return self.context.pool_rank % parts, parts

    def finish(self) -> None:
        context, config = self.context, self.context.config
        backdoor = adaptive.flat_update(context.model, context.reference)
        part, parts = self.share()
        update, _ = adaptive.split_evasion_update(backdoor, self.benign, config["evasion-keep"], part, parts)
        adaptive.set_flat_update_(context.model, context.reference, update)


class RotatingEvasion(SplitEvasion):
    """:class:`SplitEvasion` over ``evasion-parts * evasion-rotation`` shares, a different group of
    ``evasion-parts`` every round (:func:`simulation.adaptive.rotating_share`)."""

    name = "rotating-evasion"

    def share(self) -> tuple[int, int]:
        context, config = self.context, self.context.config
        return adaptive.rotating_share(
            context.pool_rank, context.server_round, config["evasion-parts"], config["evasion-rotation"]
        )


class DBA(Attack):
    """Plain training on backdoor samples stamped with this attacker's part of the
    distributed trigger (which part: :func:`simulation.dba.attacker_part`)."""

    name = "dba"


class OptimisedTrigger(Attack):
    """An attack that refines the relayed trigger in :meth:`before` (:meth:`optimise`) and
    trains on its backdoor samples stamped with the result."""

    def optimise(self, images: torch.Tensor, labels: torch.Tensor, trigger: Trigger) -> torch.Tensor:
        """The refined pattern ``(C, H, W)`` from the clean float images ``(N, C, H, W)`` in ``[0, 1]``."""
        raise NotImplementedError

    def before(self) -> None:
        context = self.context
        if context.trigger is None:
            raise ValueError(f"attack {self.name!r} needs a pixel trigger (backdoor = 'pixel')")
        device = next(context.model.parameters()).device
        clean = slice(context.num_backdoor, None)
        images = v2.functional.to_dtype(context.x[clean], torch.float32, scale=True).to(device)
        pattern = self.optimise(images, context.y[clean].to(device), context.trigger)
        self.trigger_out = context.trigger.with_pattern(pattern.cpu())

    def training_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        context, count = self.context, self.context.num_backdoor
        assert self.trigger_out is not None, "before() runs first"
        return torch.cat([self.trigger_out.stamp(context.x[:count]), context.x[count:]]), context.y


class F3BA(OptimisedTrigger):
    """First-layer candidates flipped toward the trigger, the trigger optimised to excite
    them (:func:`simulation.f3ba.focused_flip`); the flip stays in the trained model."""

    name = "f3ba"

    def optimise(self, images: torch.Tensor, labels: torch.Tensor, trigger: Trigger) -> torch.Tensor:
        config = self.context.config
        pattern, self.flipped = f3ba.focused_flip(
            self.context.model,
            trigger.pattern.to(images.device),
            trigger.mask.to(images.device),
            images,
            labels,
            self.context.task.preprocess,
            fraction=config["f3ba-flip-fraction"],
            flip_factor=config["f3ba-flip-factor"],
            epochs=config["trigger-epochs"],
            lr=config["trigger-lr"],
            batch_size=config["batch-size"],
            seed=self.context.seed,
        )
        return pattern


class A3FL(OptimisedTrigger):
    """The trigger refined against the global model and its trigger-unlearning copy
    (:func:`simulation.a3fl.search_trigger`)."""

    name = "a3fl"

    def optimise(self, images: torch.Tensor, labels: torch.Tensor, trigger: Trigger) -> torch.Tensor:
        config = self.context.config
        return a3fl.search_trigger(
            self.context.model,
            trigger.pattern.to(images.device),
            trigger.mask.to(images.device),
            images,
            labels,
            int(config["target-label"]),
            self.context.task.preprocess,
            epochs=config["trigger-epochs"],
            lr=config["trigger-lr"],
            adv_epochs=config["a3fl-adv-epochs"],
            adv_lr=config["a3fl-adv-lr"],
            lambda0=config["a3fl-lambda"],
            batch_size=config["batch-size"],
            seed=self.context.seed,
        )


#: Attack mode name -> class; with ``"none"`` these are :data:`simulation.config.ATTACKS`.
ATTACKERS: dict[str, type[Attack]] = {
    cls.name: cls
    for cls in (
        Blackbox,
        PGD,
        PGDReplace,
        ALIE,
        Neurotoxin,
        MaskTipping,
        BlocEvasion,
        SplitEvasion,
        RotatingEvasion,
        DBA,
        F3BA,
        A3FL,
    )
}


def make_attacker(context: AttackContext) -> Attack:
    """The :class:`Attack` of run config ``attack`` for this round."""
    name = context.config["attack"]
    if name not in ATTACKERS:
        raise ValueError(f"run config 'attack' must be one of {', '.join(ATTACKERS)} to attack, got {name!r}")
    return ATTACKERS[name](context)
