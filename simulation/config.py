"""Run-config keys of the simulation apps: their defaults (in one place) and validation.

Keys use Flower's hyphenated style; a ``[tool.flwr.app.config]`` table can mirror
:data:`DEFAULTS` one to one. ``"auto"`` / ``-1`` values are filled in per task by
:func:`resolve_config` (e.g. ``target-label = -1`` becomes 9 on CIFAR-10, 1 on
Fashion-MNIST and on the linear task, 0 on Sentiment140), so a table that copies
:data:`DEFAULTS` keeps the per-task behaviour.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.common.logger import log

from baselines import defense_names
from flwr_invariant.mask_rules import MASK_RULES
from flwr_invariant.settings import (
    DEFAULT_MASK_RULE,
    DEFAULT_SERVER_LEARNING_RATE,
    DEFAULT_TAU,
    DEFAULT_TRIM_RATIO,
    check_parameter,
)

__all__ = [
    "ATTACKS",
    "BACKDOORS",
    "CACHE_DIR_NAME",
    "DATA_ROOT_ENV",
    "DEFAULTS",
    "DEFENSES",
    "MODELS",
    "PARTITIONS",
    "SCHEDULES",
    "TASKS",
    "TASK_DEFAULTS",
    "TRIGGER_ATTACKS",
    "defense_label",
    "resolve_config",
    "resolve_data_root",
]

DATA_ROOT_ENV = "FLWR_INVARIANT_DATA_ROOT"

#: A grid's pretrain cache: ``OUTPUT/pretrained`` (reports skip it: it holds no run).
CACHE_DIR_NAME = "pretrained"

#: Every run-config key with its default value (type of the default = type of the key).
DEFAULTS: dict[str, Any] = {
    # experiment
    "task": "linear",  # cifar10 | fmnist | sent140 | linear
    "defense": "invariant",  # any name of baselines.DEFENSES (fedavg, invariant, krum, ...)
    "num-server-rounds": 30,
    "seed": 0,
    "device": "auto",  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    "round-timeout": 3600.0,  # seconds a round (and the wait for all nodes) may take
    "eval-every": 1,  # clean test set every k rounds (and rounds 0 and last); backdoor set every round
    "results-file": "",  # JSON file the ServerApp writes per-round metrics to ("" = none)
    "rounds-file": "",  # JSON-lines file the ServerApp appends each evaluation row to ("" = none)
    "pretrain-rounds": 0,  # benign FedAvg rounds that train the starting model (see simulation/pretrain.py)
    "pretrain-cache": "",  # directory keeping pretrained starting models ("" = none)
    "checkpoint-dir": "",  # the ServerApp's round checkpoint; resumed from if present ("" = none)
    "checkpoint-every": 1,  # write the checkpoint every k rounds (and after round 0 and the last round)
    # defense settings (InvariantAggregation)
    "tau": DEFAULT_TAU,
    "trim-ratio": DEFAULT_TRIM_RATIO,
    "server-learning-rate": DEFAULT_SERVER_LEARNING_RATE,
    "mask-rule": DEFAULT_MASK_RULE,  # how the AND-mask counts votes (flwr_invariant.mask_rules)
    "flain-aux-size": 500,  # FLAIN: clean training examples the server holds
    "fltrust-root-size": 100,  # FLTrust: the server's root dataset, drawn from the training pool
    "deepsight-probe-size": 200,  # DeepSight: random inputs per seed (3 seeds) for the DDifs
    "crfl-sigma": 0.01,  # CRFL: std of the noise added to the global model's parameters
    # CRFL's clip bound of the global model's norm, min(max, start + growth * round); the authors'
    # MNIST values, for training from scratch: a pretrained start needs start above its norm
    "crfl-clip-start": 2.0,
    "crfl-clip-growth": 0.1,
    "crfl-clip-max": 15.0,
    "crfl-certify-copies": 1000,  # CRFL: noisy copies of the final model for its certificate (0: none)
    "crfl-certify-inputs": 500,  # CRFL: clean test inputs (the first ones) the certificate covers
    "assumed-malicious": -1,  # f assumed by Krum & co.; -1 = round(malicious-fraction * clients-per-round)
    # population and data
    "data-root": "",  # "" = $FLWR_INVARIANT_DATA_ROOT
    "download": False,  # download CIFAR-10 / Sentiment140 if absent (needs network)
    "num-partitions": 100,
    "clients-per-round": 20,
    "partition": "auto",  # auto (user on sent140, else dirichlet) | dirichlet | iid | user
    "dirichlet-alpha": 0.5,
    "train-size": 0,  # use a seeded random subset of this many training examples (0 = all)
    # model and local training
    "model": "auto",  # auto | resnet18 | resnet18-cifar | resnet18-imagenet | cnn | linear | lstm
    "local-epochs": 1,
    "batch-size": 64,
    "lr": -1.0,  # -1 = the task's default (0.01 on images as in the paper, 0.05 on sent140, 0.1 on linear)
    "momentum": 0.9,
    "weight-decay": 0.0,
    "eval-batch-size": 512,
    # attack
    # none | blackbox | pgd | pgd-replace | alie | neurotoxin | mask-tipping | bloc-evasion |
    # split-evasion | rotating-evasion | dba | f3ba | a3fl
    "attack": "blackbox",
    "backdoor": "edge-case",  # edge-case | pixel (BadNets-style trigger; "trigger" is another name for it)
    "attack-schedule": "pool",  # pool (fixed malicious pool) | every-k (one attacker every k rounds)
    "malicious-fraction": 0.2,
    "attack-every": 10,  # k of the every-k schedule
    "attack-start-round": 1,  # attackers act from this round on (earlier: benign warm-up)
    "target-label": -1,  # -1 = the task's default target
    "edge-case-samples": -1,  # backdoor samples in the attacker's poisoned set (-1: 100; 60 on sent140)
    "clean-samples": -1,  # clean samples of its own partition in the poisoned set (-1: 400; 140 on sent140)
    "pgd-eps": 2.0,  # L2 radius of the PGD ball around the global model
    "project-every": 10,  # PGD projection every this many optimizer steps (and at the end)
    "replace-total-examples": 0,  # pgd-replace: examples per round; 0 = estimate (see attacks.py)
    "trigger-size": 3,  # side of the pixel-pattern trigger square, in pixels
    "adaptive-estimates": 3,  # estimating attacks: benign updates the attacker trains first
    "adaptive-z": 1.0,  # alie: stay within mean +- z * std of the benign estimates
    "neurotoxin-top": 0.1,  # neurotoxin: fraction of most-updated coordinates the attacker leaves alone
    "evasion-keep": 0.1,  # the evasion attacks: fraction of coordinates carrying the poisoned update
    "evasion-parts": 4,  # split-/rotating-evasion: shares of a round's colluders (by pool rank)
    "evasion-rotation": 4,  # rotating-evasion: rounds before a group of shares is used again
    "dba-parts": 4,  # dba: local triggers (bars of trigger-size pixels) the global trigger is split into
    "trigger-epochs": 1,  # f3ba, a3fl: passes of trigger optimisation over the attacker's images per round
    "trigger-lr": 0.02,  # f3ba, a3fl: sign-gradient step of the trigger, in pixel units ([0, 1])
    "f3ba-flip-fraction": 0.02,  # f3ba: fraction of the first conv layer's weights that are flip candidates
    "f3ba-flip-factor": 1.0,  # f3ba: flipped candidates are multiplied by this (the code's flip_factor)
    "a3fl-adv-epochs": 1,  # a3fl: epochs the adversarial model unlearns the trigger (0 = none)
    "a3fl-adv-lr": 0.01,  # a3fl: SGD learning rate of the unlearning (momentum 0.9, weight decay 5e-4)
    "a3fl-lambda": 0.01,  # a3fl: lambda_0, weight of the adversarial model's trigger loss
    # linear task (paper Sec. 5)
    "linear-features": 20,  # informative Gaussian features (plus one trigger feature)
    "linear-train-size": 20000,
    "linear-test-size": 2000,
    "linear-signal": 0.3,  # class mean of each informative feature is +-signal
    "linear-trigger": 4.0,  # mean mu_k of the trigger feature on the attacker's points
    # Sentiment140 task (simulation/sent140.py) and its LSTM
    "sent140-vocab-size": 20000,  # most frequent training words kept (plus the edge-case tweets' words)
    "sent140-seq-length": 40,  # tokens per tweet (longer tweets are cut, shorter ones left-padded)
    "sent140-test-size": 5000,  # test tweets (whole held-out users, a fixed draw)
    "lstm-embedding-dim": 200,  # "Attack of the Tails" LSTM: embedding size
    "lstm-hidden-dim": 200,  # and hidden size (2 layers, dropout 0.5)
}

TASKS = ("cifar10", "fmnist", "sent140", "linear")
DEFENSES = tuple(defense_names())
MODELS = ("resnet18", "resnet18-cifar", "resnet18-imagenet", "cnn", "linear", "lstm")
PARTITIONS = ("dirichlet", "iid", "user")
ATTACKS = (
    "none",
    "blackbox",
    "pgd",
    "pgd-replace",
    "alie",
    "neurotoxin",
    "mask-tipping",
    "bloc-evasion",
    "split-evasion",
    "rotating-evasion",
    "dba",
    "f3ba",
    "a3fl",
)
#: Attack modes that stamp a trigger of their own (:mod:`simulation.triggers`): ``backdoor = "pixel"`` only.
TRIGGER_ATTACKS = ("dba", "f3ba", "a3fl")
BACKDOORS = ("edge-case", "pixel")
#: Other names accepted for a backdoor kind (resolved to the kind's name).
BACKDOOR_ALIASES = {"trigger": "pixel"}
SCHEDULES = ("pool", "every-k")

# Dirichlet split; the attacker mixes 100 edge-case and 400 clean samples (the CIFAR-10 attack's numbers).
_COMMON = {"partition": "dirichlet", "edge-case-samples": 100, "clean-samples": 400}
#: What ``"auto"`` / ``-1`` resolve to, per task.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    # Southwest planes -> truck
    "cifar10": {"model": "resnet18-cifar", "target-label": 9, "lr": 0.01, **_COMMON},
    # ARDIS 7s -> 1 ("trouser")
    "fmnist": {"model": "cnn", "target-label": 1, "lr": 0.01, **_COMMON},
    # Greek-director tweets -> 0 (negative); attacker: 60 of them + 140 clean tweets, client lr 0.05,
    # as in the "Attack of the Tails" code
    "sent140": {
        "model": "lstm",
        "target-label": 0,
        "lr": 0.05,
        "partition": "user",
        "edge-case-samples": 60,
        "clean-samples": 140,
    },
    "linear": {"model": "linear", "target-label": 1, "lr": 0.1, **_COMMON},
}
#: The task each model fits (image models: the image tasks).
_MODEL_TASKS = {"linear": ("linear",), "lstm": ("sent140",)}

_CHOICES = {
    "task": TASKS,
    "defense": DEFENSES,
    "model": (*MODELS, "auto"),
    "partition": (*PARTITIONS, "auto"),
    "attack": ATTACKS,
    "backdoor": BACKDOORS,
    "attack-schedule": SCHEDULES,
    "mask-rule": MASK_RULES,
}
_POSITIVE_INT = (
    "num-server-rounds",
    "eval-every",
    "checkpoint-every",
    "num-partitions",
    "clients-per-round",
    "fltrust-root-size",
    "deepsight-probe-size",
    "crfl-certify-inputs",
    "local-epochs",
    "batch-size",
    "eval-batch-size",
    "project-every",
    "attack-every",
    "attack-start-round",
    "linear-features",
    "linear-train-size",
    "linear-test-size",
    "trigger-size",
    "adaptive-estimates",
    "dba-parts",
    "evasion-parts",
    "evasion-rotation",
    "trigger-epochs",
    "sent140-vocab-size",
    "sent140-seq-length",
    "sent140-test-size",
    "lstm-embedding-dim",
    "lstm-hidden-dim",
)
_NON_NEGATIVE_INT = (
    "crfl-certify-copies",
    "seed",
    "pretrain-rounds",
    "flain-aux-size",
    "train-size",
    "replace-total-examples",
    "a3fl-adv-epochs",
)
_TASK_INT = ("edge-case-samples", "clean-samples")  # >= 0, or -1 for the task's value
_STRATEGY_PARAMETERS = ("tau", "trim-ratio", "server-learning-rate")  # checked by flwr_invariant.settings
_POSITIVE_FLOAT = ("crfl-sigma", "crfl-clip-start", "crfl-clip-max")
_NON_NEGATIVE_FLOAT = (
    "crfl-clip-growth",
    "adaptive-z",
    "momentum",
    "weight-decay",
    "pgd-eps",
    "linear-signal",
    "f3ba-flip-factor",
    "a3fl-lambda",
)


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def _cast(key: str, value: Any) -> Any:
    default = DEFAULTS[key]
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "1")
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"run config {key!r} must be {_TYPE_NAMES[type(default)]}, got {value!r}") from None


def resolve_config(*sources: Mapping[str, Any] | None) -> dict[str, Any]:
    """Merge ``DEFAULTS`` with the given mappings (later wins), cast, resolve, validate.

    Returns a new dict with every key of :data:`DEFAULTS`; ``"auto"`` / ``-1``
    values are replaced by the task's defaults. Raises ``ValueError`` naming the
    key for a wrong type, an unknown choice or a value out of range. Unknown keys
    are kept and logged (they may belong to another app).
    """
    config: dict[str, Any] = dict(DEFAULTS)
    for source in sources:
        for key, value in (source or {}).items():
            if key in DEFAULTS:
                config[key] = _cast(key, value)
                if key == "backdoor":
                    config[key] = BACKDOOR_ALIASES.get(config[key], config[key])
            else:
                log(WARNING, "run config: unknown key %r ignored by the simulation apps", key)
    for key, choices in _CHOICES.items():
        if config[key] not in choices:
            raise ValueError(f"run config {key!r} must be one of {', '.join(choices)}; got {config[key]!r}")
    for key in _POSITIVE_INT:
        if config[key] < 1:
            raise ValueError(f"run config {key!r} must be >= 1, got {config[key]!r}")
    for key in _NON_NEGATIVE_INT:
        if config[key] < 0:
            raise ValueError(f"run config {key!r} must be >= 0, got {config[key]!r}")
    for key in _TASK_INT:
        if config[key] < -1:
            raise ValueError(
                f"run config {key!r} must be >= 0 (or -1 for the task's value), got {config[key]!r}"
            )
    for key in _POSITIVE_FLOAT:
        if not (math.isfinite(config[key]) and config[key] > 0):
            raise ValueError(f"run config {key!r} must be a finite number > 0, got {config[key]!r}")
    for key in _NON_NEGATIVE_FLOAT:
        if not (math.isfinite(config[key]) and config[key] >= 0):
            raise ValueError(f"run config {key!r} must be a finite number >= 0, got {config[key]!r}")
    for key in _STRATEGY_PARAMETERS:
        check_parameter(key.replace("-", "_"), config[key], label=f"run config {key!r}")
    if not 0.0 <= config["malicious-fraction"] <= 1.0:
        raise ValueError(
            f"run config 'malicious-fraction' must be in [0, 1], got {config['malicious-fraction']!r}"
        )
    if not 0.0 < config["evasion-keep"] <= 1.0:
        raise ValueError(f"run config 'evasion-keep' must be in (0, 1], got {config['evasion-keep']!r}")
    if not 0.0 <= config["neurotoxin-top"] < 1.0:
        raise ValueError(f"run config 'neurotoxin-top' must be in [0, 1), got {config['neurotoxin-top']!r}")
    for key in ("trigger-lr", "a3fl-adv-lr"):
        if not (math.isfinite(config[key]) and config[key] > 0):
            raise ValueError(f"run config {key!r} must be a number > 0, got {config[key]!r}")
    if not 0.0 < config["f3ba-flip-fraction"] < 1.0:
        raise ValueError(
            f"run config 'f3ba-flip-fraction' must be in (0, 1), got {config['f3ba-flip-fraction']!r}"
        )
    if not (math.isfinite(config["round-timeout"]) and config["round-timeout"] > 0):
        raise ValueError(
            f"run config 'round-timeout' must be a number of seconds > 0, got {config['round-timeout']!r}"
        )
    if not config["dirichlet-alpha"] > 0:
        raise ValueError(f"run config 'dirichlet-alpha' must be > 0, got {config['dirichlet-alpha']!r}")
    if config["lr"] == -1.0:
        config["lr"] = TASK_DEFAULTS[config["task"]]["lr"]
    if not (math.isfinite(config["lr"]) and config["lr"] > 0):
        raise ValueError(f"run config 'lr' must be > 0 (or -1 for the task's default), got {config['lr']!r}")
    if config["clients-per-round"] > config["num-partitions"]:
        raise ValueError(
            f"run config 'clients-per-round' ({config['clients-per-round']}) exceeds "
            f"'num-partitions' ({config['num-partitions']})"
        )
    task, task_defaults = config["task"], TASK_DEFAULTS[config["task"]]
    for key in ("model", "partition"):
        if config[key] == "auto":
            config[key] = task_defaults[key]
    for key in ("target-label", *_TASK_INT):
        if config[key] == -1:
            config[key] = task_defaults[key]
    num_classes = 2 if task in ("linear", "sent140") else 10
    if not 0 <= config["target-label"] < num_classes:
        raise ValueError(
            f"run config 'target-label' must be in [0, {num_classes}) for task "
            f"{config['task']!r}, got {config['target-label']!r}"
        )
    fits = _MODEL_TASKS.get(config["model"], ("cifar10", "fmnist"))
    if task not in fits:
        raise ValueError(f"run config 'model' {config['model']!r} does not fit task {task!r}")
    if task == "fmnist" and config["model"] == "resnet18-imagenet":
        raise ValueError("run config 'model' 'resnet18-imagenet' needs RGB images (cifar10), not 'fmnist'")
    if task in ("linear", "sent140") and config["backdoor"] == "pixel":
        raise ValueError(f"run config 'backdoor' = 'pixel' needs an image task, not {task!r}")
    if config["attack"] in TRIGGER_ATTACKS and config["backdoor"] != "pixel":
        raise ValueError(
            f"run config 'attack' = {config['attack']!r} stamps a pixel trigger: it needs 'backdoor' = "
            f"'pixel' (and an image task), got 'backdoor' = {config['backdoor']!r}"
        )
    if config["partition"] == "user" and task != "sent140":
        raise ValueError(f"run config 'partition' = 'user' needs a task with users (sent140), not {task!r}")
    return config


def defense_label(config: Mapping[str, Any]) -> str:
    """The defense's name, plus ``tau=...``/``trim-ratio=...``/``server-learning-rate=...`` where an
    Invariant defense's differ from the defaults (``"invariant-bloc-exclusion tau=0.3"``): what
    reports and grids tell apart."""
    defense = str(config["defense"])
    if not defense.startswith("invariant"):  # only the defenses built on InvariantAggregation
        return defense
    differs = [key for key in _STRATEGY_PARAMETERS if config.get(key, DEFAULTS[key]) != DEFAULTS[key]]
    return " ".join([defense, *(f"{key}={config[key]}" for key in differs)])


def resolve_data_root(config: Mapping[str, Any]) -> Path:
    """The data root: ``data-root``, else ``$FLWR_INVARIANT_DATA_ROOT``; must exist.

    Raises ``FileNotFoundError`` naming the setting when neither is set or the
    directory is missing.
    """
    root = str(config.get("data-root") or os.environ.get(DATA_ROOT_ENV, ""))
    if not root:
        raise FileNotFoundError(
            f"no data root: set run config 'data-root' or the environment variable {DATA_ROOT_ENV}"
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"run config 'data-root' {str(path)!r} is not a directory")
    return path
