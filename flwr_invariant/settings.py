"""The Invariant Aggregator's settings: their defaults (in one place) and their validation.

No Flower import. Both strategy classes, the simulation's run config and the
baselines' registry read the defaults from here.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Collection, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .aggregate import median_of, min_votes, pseudo_gradients, trim_count, trimmed_mean
from .engines import BACKENDS, Engine, select_engine
from .mask_rules import (
    CLIENT_SELECTING_RULES,
    CROSS_ROUND_RULES,
    LEAN_HOLDING_RULES,
    MEMORY_KEEPING_RULES,
    PAPER_STEP_RULES,
    PARTIAL_EXCLUDING_RULES,
    QUIET_HOLDING_RULES,
    RECORD_KEEPING_RULES,
    MaskRule,
    hold_quiet_coordinates,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "DEFAULT_MASK_RULE",
    "DEFAULT_SERVER_LEARNING_RATE",
    "DEFAULT_TAU",
    "DEFAULT_TRIM_RATIO",
    "CarriedMaskMemory",
    "InvariantConfig",
    "check_parameter",
    "check_strategy_keywords",
]

LOGGER = logging.getLogger("flwr")

DEFAULT_TAU = 0.6  # the paper's and its released code's
DEFAULT_TRIM_RATIO = 0.45  # with 20 clients, the middle 2 values, as the released code
DEFAULT_SERVER_LEARNING_RATE = 1.0
DEFAULT_BACKEND = "numpy"
DEFAULT_MASK_RULE = "paper"

#: parameter -> (test of a valid value, what a valid value is)
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tau": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "trim_ratio": (lambda v: 0.0 <= v < 0.5, "in [0, 0.5)"),
    "server_learning_rate": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
}


def check_parameter(name: str, value: Any, label: str | None = None) -> None:
    """``ValueError`` naming ``label`` (default ``name``) unless ``value`` is valid for ``name``.

    ``name``: ``"tau"``, ``"trim_ratio"`` or ``"server_learning_rate"``.
    """
    valid, requirement = _RULES[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not valid(value):
        raise ValueError(f"{label or name} must be {requirement}, got {value!r}")


@dataclass(frozen=True)
class InvariantConfig:
    """Settings of the Invariant Aggregator; invalid values raise ``ValueError`` naming them.

    tau: sign-consistency threshold of the AND-mask, in [0, 1].
    trim_ratio: fraction trimmed from each tail of every coordinate, in [0, 0.5).
    server_learning_rate: step along the aggregated pseudo-gradient, > 0.
    backend: engine (:mod:`flwr_invariant.engines`): "numpy", "torch", "auto" or "reference".
    num_threads: threads of the numpy engine (default: CPU count, at most 8).
    mask_rule: how the AND-mask counts votes (:mod:`flwr_invariant.mask_rules`); "paper" is Algorithm 1.
    """

    tau: float = DEFAULT_TAU
    trim_ratio: float = DEFAULT_TRIM_RATIO
    server_learning_rate: float = DEFAULT_SERVER_LEARNING_RATE
    backend: str = DEFAULT_BACKEND
    num_threads: int | None = None
    mask_rule: str = DEFAULT_MASK_RULE
    _rule: list[MaskRule] = field(default_factory=list, init=False, repr=False, compare=False)
    _warned: list[bool] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in _RULES:
            check_parameter(name, getattr(self, name))
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {self.num_threads!r}")
        rule = MaskRule(self.mask_rule, self.tau)  # ValueError naming the allowed rules
        if self.mask_rule != DEFAULT_MASK_RULE:
            self._rule.append(rule)

    def __str__(self) -> str:
        """``tau=..., trim_ratio=..., server_learning_rate=...`` (for a strategy's ``__repr__``)."""
        rule = f", mask_rule={self.mask_rule!r}" if self.mask_rule != DEFAULT_MASK_RULE else ""
        return (
            f"tau={self.tau}, trim_ratio={self.trim_ratio}, server_learning_rate={self.server_learning_rate}"
            + rule
        )

    def engine(self) -> Engine:
        """The ``invariant_update`` implementation ``backend`` selects."""
        return select_engine(self.backend, self.num_threads)

    def aggregate(
        self,
        global_weights: Sequence[np.ndarray],
        updates: Sequence[Sequence[np.ndarray]],
        median_layers: Collection[int] = (),
        client_ids: Sequence[Hashable] | None = None,
    ) -> tuple[list[np.ndarray], dict[str, float | int]]:
        """One invariant step on valid updates: new weights and ``mask_fraction``, ``trim_count``.

        ``median_layers``: indices of floating layers aggregated by coordinate-wise median.
        ``client_ids``: one stable id per update (e.g. node ids); the rules of
        :data:`~flwr_invariant.mask_rules.CROSS_ROUND_RULES` need them, the others ignore them.
        A client-selecting rule that keeps no client returns copies of ``global_weights`` (no step).
        """
        self._warn_if_unanimous(len(updates))
        rule_metrics: dict[str, float] = {}
        if self.mask_rule in CLIENT_SELECTING_RULES:
            outside, rule_metrics = self._rule[0].outside_blocs(
                (stacked for _, stacked in _masked_pseudo_gradients(global_weights, updates, median_layers)),
                client_ids,
            )
            if self.mask_rule in PARTIAL_EXCLUDING_RULES:
                updates = self._rule[0].without_departures(
                    global_weights, updates, _masked_layers(global_weights, median_layers)
                )
            updates = [update for update, keep in zip(updates, outside, strict=True) if keep]
            if not updates:
                LOGGER.warning(
                    "InvariantAggregation: mask_rule=%r left fewer than 2 clients in (%s); "
                    "the global model makes no step this round",
                    self.mask_rule,
                    ", ".join(f"{key}={value}" for key, value in rule_metrics.items()),
                )
                return [np.array(w, copy=True) for w in global_weights], {
                    "mask_fraction": 0.0,
                    "trim_count": 0,
                    **rule_metrics,
                }
        if self.mask_rule not in PAPER_STEP_RULES:
            weights, metrics = self._aggregate_by_rule(global_weights, updates, median_layers)
            return weights, {**metrics, **rule_metrics}
        weights, mask_fraction = self.engine()(
            global_weights,
            updates,
            tau=self.tau,
            trim_ratio=self.trim_ratio,
            server_learning_rate=self.server_learning_rate,
            median_layers=median_layers,
        )
        if self.mask_rule in QUIET_HOLDING_RULES:
            leaning = None
            if self.mask_rule in LEAN_HOLDING_RULES:
                leaning, lean_metrics = self._rule[0].steady_leans(
                    _masked_pseudo_gradients(global_weights, updates, median_layers)
                )
                rule_metrics = {**rule_metrics, **lean_metrics}
            weights, mask_fraction = hold_quiet_coordinates(
                global_weights,
                weights,
                _masked_pseudo_gradients(global_weights, updates, median_layers),
                self.tau,
                also_held=leaning,
            )
        return weights, {
            "mask_fraction": mask_fraction,
            "trim_count": trim_count(len(updates), self.trim_ratio),
            **rule_metrics,
        }

    def _aggregate_by_rule(
        self,
        global_weights: Sequence[np.ndarray],
        updates: Sequence[Sequence[np.ndarray]],
        median_layers: Collection[int],
    ) -> tuple[list[np.ndarray], dict[str, float | int]]:
        """A non-paper ``mask_rule``'s step: its scales times the trimmed mean (reference code)."""
        stacks = dict(_masked_pseudo_gradients(global_weights, updates, median_layers))
        scales, rule_metrics = self._rule[0].scales(list(stacks.values()))
        scale_of = dict(zip(stacks, scales, strict=True))
        weights = []
        for i, w in enumerate(global_weights):
            if i not in stacks:
                weights.append(median_of([u[i] for u in updates], w.dtype))
                continue
            step = trimmed_mean(stacks[i], self.trim_ratio).astype(np.float64) * scale_of[i]
            weights.append((w - self.server_learning_rate * step).astype(w.dtype))
        kept = sum(int((s > 0).sum()) for s in scales)
        total = sum(s.size for s in scales)
        return weights, {
            "mask_fraction": kept / total if total else 1.0,
            "trim_count": trim_count(len(updates), self.trim_ratio),
            **rule_metrics,
        }

    @property
    def recalled_departures(self) -> dict[Hashable, np.ndarray]:
        """The cross-round test's memory (:attr:`MaskRule.recalled_departures`); empty for other rules."""
        return self._rule[0].recalled_departures if self._rule else {}

    def restore_recalled_departures(self, recalled: Mapping[Hashable, np.ndarray]) -> None:
        """Continue a cross-round rule from ``recalled`` (a saved :attr:`recalled_departures`)."""
        self._restore_rule_state("recalled_departures", recalled, CROSS_ROUND_RULES, "recalls no clients")

    @property
    def flag_record(self) -> dict[Hashable, np.ndarray]:
        """A record-keeping rule's memory (:attr:`MaskRule.flag_record`); empty for other rules."""
        return self._rule[0].flag_record if self._rule else {}

    def restore_flag_record(self, record: Mapping[Hashable, np.ndarray]) -> None:
        """Continue a record-keeping rule from ``record`` (a saved :attr:`flag_record`)."""
        self._restore_rule_state("flag_record", record, RECORD_KEEPING_RULES, "keeps no flag record")

    @property
    def mask_memory(self) -> np.ndarray | None:
        """A memory-keeping rule's state across rounds (:attr:`MaskRule.memory_state`); else ``None``."""
        return self._rule[0].memory_state if self._rule else None

    def restore_mask_memory(self, state: np.ndarray | None) -> None:
        """Continue a memory-keeping rule from ``state`` (a saved :attr:`mask_memory`)."""
        self._restore_rule_state("memory_state", state, MEMORY_KEEPING_RULES, "keeps no mask memory")

    def _restore_rule_state(self, name: str, state: Any, rules: Collection[str], lacks: str) -> None:
        """Set the rule's ``name``; ``ValueError`` if the rule ``lacks`` it and ``state`` has some."""
        if self.mask_rule not in rules:
            if state is not None and (not isinstance(state, Mapping) or state):
                raise ValueError(f"mask_rule={self.mask_rule!r} {lacks} to restore")
            return
        setattr(self._rule[0], name, state)

    def _warn_if_unanimous(self, num_clients: int) -> None:
        """One warning (per settings object) the first time ``tau`` demands every client's vote."""
        if (
            self._warned
            or num_clients < 2
            or self.tau >= 1.0
            or min_votes(num_clients, self.tau) < num_clients
        ):
            return
        self._warned.append(True)
        LOGGER.warning(
            "InvariantAggregation: with %d clients, tau=%s keeps a coordinate only if all %d agree on its "
            "sign (unanimity); tau <= %.4g keeps coordinates most, but not all, agree on",
            num_clients,
            self.tau,
            num_clients,
            (num_clients - 1) / num_clients,
        )


def check_strategy_keywords(owner: str, base: type, keywords: Mapping[str, Any]) -> None:
    """``TypeError`` naming ``owner`` and the keyword unless ``base.__init__`` accepts every keyword.

    The strategies pass their base class's keywords through; this makes a typo name
    the class the user called, not Flower's ``FedAvg.__init__``.
    """
    accepted = inspect.signature(base.__init__).parameters
    unknown = sorted(set(keywords) - set(accepted))
    if unknown:
        raise TypeError(
            f"{owner}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"it takes its own settings and those of {base.__module__}.{base.__qualname__}"
        )


def _masked_pseudo_gradients(
    global_weights: Sequence[np.ndarray],
    updates: Sequence[Sequence[np.ndarray]],
    median_layers: Collection[int],
) -> Iterator[tuple[int, np.ndarray]]:
    """``(index, (N, *shape) pseudo-gradients)`` of each floating layer outside ``median_layers``."""
    for index in _masked_layers(global_weights, median_layers):
        yield index, pseudo_gradients(global_weights[index], [update[index] for update in updates])


def _masked_layers(global_weights: Sequence[np.ndarray], median_layers: Collection[int]) -> list[int]:
    """Indices of the floating layers outside ``median_layers``: the layers the mask and trim step."""
    return [
        index for index, w in enumerate(global_weights) if w.dtype.kind == "f" and index not in median_layers
    ]


class CarriedMaskMemory:
    """Both strategy classes: the state kept across rounds, for round checkpoints.

    ``carried_state`` names the attributes to save and set again on resume:
    ``("mask_memory",)`` with a rule of :data:`~flwr_invariant.mask_rules.MEMORY_KEEPING_RULES`,
    ``("recalled_departures",)`` (per client id) with one of
    :data:`~flwr_invariant.mask_rules.CROSS_ROUND_RULES`, and ``"flag_record"`` (per client id)
    too with one of :data:`~flwr_invariant.mask_rules.RECORD_KEEPING_RULES`, else none.
    """

    invariant_config: InvariantConfig

    @property
    def carried_state(self) -> tuple[str, ...]:
        """Attribute names that carry across rounds."""
        if self.invariant_config.mask_rule in MEMORY_KEEPING_RULES:
            return ("mask_memory",)
        if self.invariant_config.mask_rule in RECORD_KEEPING_RULES:
            return ("recalled_departures", "flag_record")
        if self.invariant_config.mask_rule in CROSS_ROUND_RULES:
            return ("recalled_departures",)
        return ()

    @property
    def mask_memory(self) -> np.ndarray | None:
        """1-D float64 memory of the mask rule so far (:attr:`InvariantConfig.mask_memory`)."""
        return self.invariant_config.mask_memory

    @mask_memory.setter
    def mask_memory(self, state: np.ndarray | None) -> None:
        self.invariant_config.restore_mask_memory(state)

    @property
    def recalled_departures(self) -> dict[Hashable, np.ndarray]:
        """Client id -> int8 memory of a cross-round rule (:attr:`InvariantConfig.recalled_departures`)."""
        return self.invariant_config.recalled_departures

    @recalled_departures.setter
    def recalled_departures(self, recalled: Mapping[Hashable, np.ndarray]) -> None:
        self.invariant_config.restore_recalled_departures(recalled)

    @property
    def flag_record(self) -> dict[Hashable, np.ndarray]:
        """Client id -> int64 record of a record-keeping rule (:attr:`InvariantConfig.flag_record`)."""
        return self.invariant_config.flag_record

    @flag_record.setter
    def flag_record(self, record: Mapping[Hashable, np.ndarray]) -> None:
        self.invariant_config.restore_flag_record(record)
