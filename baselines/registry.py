"""Every defense by name: ``name -> (Message API strategy class, keyword arguments)``.

A factory reads the run config (hyphenated keys as in the simulation app) and
returns the class with its defense-specific keyword arguments; the caller adds
``FedAvg``'s sampling arguments. ``f``, the number of malicious clients a
defense assumes per round, is ``round(malicious-fraction * clients-per-round)``
unless ``assumed-malicious`` is set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from logging import WARNING
from typing import Any

from flwr.common.logger import log

import flwr_invariant.serverapp
from flwr_invariant.mask_rules import MASK_RULES
from flwr_invariant.settings import (
    DEFAULT_MASK_RULE,
    DEFAULT_SERVER_LEARNING_RATE,
    DEFAULT_TAU,
    DEFAULT_TRIM_RATIO,
)

from .alignins import AlignIns
from .crfl import CRFL
from .deepsight import DeepSight
from .flain import FLAIN
from .flame import FLAME
from .flower_builtin import (
    KrumTrimmedMean,
    ScreenedFedAvg,
    ScreenedKrum,
    ScreenedMedian,
    ScreenedMultiKrum,
    ScreenedTrimmedMean,
)
from .fltrust import FLTrust
from .foolsgold import FoolsGold
from .krum import MultiKrumCosine
from .multi_metrics import MultiMetrics
from .rfa import RFA
from .robust_lr import RobustLR
from .signsgd import SignSGD
from .sparsefed import SparseFed
from .weak_dp import WeakDP

__all__ = ["DEFENSES", "assumed_malicious", "defense_names"]

DefenseFactory = Callable[[Mapping[str, Any]], tuple[type, dict[str, Any]]]


def assumed_malicious(config: Mapping[str, Any]) -> int:
    """``f``: ``assumed-malicious`` if set (>= 0), else ``round(fraction * per round)``."""
    assumed = int(config.get("assumed-malicious", -1))
    if assumed >= 0:
        return assumed
    return round(float(config.get("malicious-fraction", 0.0)) * int(config.get("clients-per-round", 10)))


def _invariant(config: Mapping[str, Any]) -> tuple[type, dict[str, Any]]:
    kwargs = {
        "tau": config.get("tau", DEFAULT_TAU),
        "trim_ratio": config.get("trim-ratio", DEFAULT_TRIM_RATIO),
        "server_learning_rate": config.get("server-learning-rate", DEFAULT_SERVER_LEARNING_RATE),
        "mask_rule": config.get("mask-rule", DEFAULT_MASK_RULE),
    }
    return flwr_invariant.serverapp.InvariantAggregation, kwargs


def _invariant_rule(rule: str) -> DefenseFactory:
    """``invariant`` with ``mask-rule`` set to ``rule``."""
    return lambda config: _invariant({**config, "mask-rule": rule})


def _krum_trimmed_mean(config: Mapping[str, Any]) -> tuple[type, dict[str, Any]]:
    f = assumed_malicious(config)
    per_round = int(config.get("clients-per-round", 10))
    feasible = max(0, (per_round - 3) // 4)  # Bulyan needs N >= 4f + 3 replies
    if f > feasible:
        log(WARNING, "krum-trimmed-mean: %d clients per round allow f <= %d, not %d; using f = %d",
            per_round, feasible, f, feasible)  # fmt: skip
    return KrumTrimmedMean, {"num_malicious_nodes": min(f, feasible)}


def _multi_krum(config: Mapping[str, Any]) -> tuple[type, dict[str, Any]]:
    f = assumed_malicious(config)
    selected = max(1, int(config.get("clients-per-round", 10)) - f)
    return ScreenedMultiKrum, {"num_malicious_nodes": f, "num_nodes_to_select": selected}


def _crfl(config: Mapping[str, Any]) -> tuple[type, dict[str, Any]]:
    """The run config's ``crfl-sigma`` and ``crfl-clip-*`` where given (else CRFL's defaults)."""
    names = ("sigma", "clip_start", "clip_growth", "clip_max")
    keys = {name: "crfl-" + name.replace("_", "-") for name in names}
    settings = {name: float(config[key]) for name, key in keys.items() if key in config}
    return CRFL, {"seed": int(config.get("seed", 0)), **settings}


def _robust_lr(config: Mapping[str, Any]) -> tuple[type, dict[str, Any]]:
    """theta = f + 1, the least net vote the f attackers cannot cast alone (at most one per client)."""
    per_round = int(config.get("clients-per-round", 10))
    threshold = assumed_malicious(config) + 1
    if threshold > per_round:
        log(WARNING, "robust-lr: threshold f + 1 = %d exceeds the %d clients per round; using %d",
            threshold, per_round, per_round)  # fmt: skip
    return RobustLR, {"threshold": min(threshold, per_round)}


DEFENSES: dict[str, DefenseFactory] = {
    "fedavg": lambda config: (ScreenedFedAvg, {}),
    "invariant": _invariant,
    "krum": lambda config: (ScreenedKrum, {"num_malicious_nodes": assumed_malicious(config)}),
    "multi-krum": _multi_krum,
    "multi-krum-cosine": lambda config: (MultiKrumCosine, {"num_malicious_nodes": assumed_malicious(config)}),
    "trimmed-mean": lambda config: (ScreenedTrimmedMean, {"beta": 0.2}),
    "median": lambda config: (ScreenedMedian, {}),
    "krum-trimmed-mean": _krum_trimmed_mean,
    "sign-sgd": lambda config: (SignSGD, {"server_learning_rate": 1e-3}),
    "weak-dp": lambda config: (WeakDP, {"seed": int(config.get("seed", 0))}),
    "foolsgold": lambda config: (FoolsGold, {}),
    "rfa": lambda config: (RFA, {}),
    "sparsefed": lambda config: (SparseFed, {}),
    "flame": lambda config: (FLAME, {"seed": int(config.get("seed", 0))}),
    "flain": lambda config: (FLAIN, {}),
    "robust-lr": _robust_lr,
    "fltrust": lambda config: (FLTrust, {}),
    "deepsight": lambda config: (DeepSight, {}),
    "alignins": lambda config: (AlignIns, {}),
    "crfl": _crfl,
    "multi-metrics": lambda config: (MultiMetrics, {}),
    **{f"invariant-{rule}": _invariant_rule(rule) for rule in MASK_RULES if rule != DEFAULT_MASK_RULE},
}


def defense_names() -> list[str]:
    """The valid ``defense`` names."""
    return list(DEFENSES)
