"""Experiment grids: defenses x attacks x seeds from a TOML or YAML file, resumable.

Each run writes ``OUTPUT/<defense>__<attack>__seed<seed>/`` (an Invariant defense at a
non-default ``tau``, trim ratio or server learning rate: ``<defense>_tau_0.3__...``, see
:func:`simulation.config.defense_label`):

- ``metrics.jsonl``: one JSON object per round (``round``, ``acc_main``,
  ``acc_backdoor``, ``loss``, ``seconds``, ``attackers_sampled`` and the
  strategy's own metrics as ``train_*``, e.g. ``train_mask_fraction``);
- ``config.json``: the resolved run config, the client resources, the package
  versions, ``completed``, ``resumed`` (the rounds it resumed after, if it was
  interrupted), (with ``pretrain-rounds``) the pretrained model's accuracies and,
  under ``f3ba``/``a3fl`` and ``crfl``, ``attack_trigger`` and ``crfl_certificate``;
  ``python -m simulation run --from config.json`` repeats the run;
- ``checkpoint/``: the ServerApp's last round checkpoint (the final model once
  the run completed);
- ``flower.log``: Flower's log of the run (SuperLink, simulation runtime, ServerApp).

A run whose ``config.json`` says ``completed`` is skipped when the grid runs
again, and an interrupted run resumes from its last round checkpoint
(``checkpoint/``, see :mod:`simulation.checkpoint`), so a crashed or interrupted
grid continues where it stopped, up to the round in flight.

Grid file (TOML; YAML with the same keys works too)::

    name = "fmnist-defenses"
    output = "results/fmnist"          # relative to the current directory
    defenses = ["fedavg", "invariant"]
    attacks = ["blackbox"]             # values of the run-config key "attack"
    seeds = [0, 1]

    [base]                             # run-config keys shared by every run
    task = "fmnist"
    num-server-rounds = 20

    [resources]                        # optional
    cpus-per-client = 1
    gpus-per-client = 0.25             # or "auto"

A grid that is not one product lists ``[[cells]]`` tables, each with its own
``defenses``, ``attacks``, ``seeds`` and, optionally, ``base`` (run-config keys that
override the grid's ``[base]`` for that cell's runs); the runs are their union (each
run once, the first cell naming it wins)::

    [[cells]]
    defenses = ["fedavg", "invariant"]
    attacks = ["blackbox"]
    seeds = [0, 1, 2]

    [[cells]]
    defenses = ["fedavg", "invariant", "robust-lr"]
    attacks = ["dba"]
    seeds = [0]
    base = { backdoor = "pixel" }      # DBA stamps a pixel trigger

    [[cells]]
    defenses = ["invariant-bloc-exclusion"]
    attacks = ["blackbox"]
    seeds = [0]
    base = { tau = 0.3 }               # run invariant-bloc-exclusion_tau_0.3__blackbox__seed0
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.common.logger import log

from .checkpoint import checkpoint_lock, clear_checkpoint, read_checkpoint
from .config import CACHE_DIR_NAME, DEFAULTS, defense_label, resolve_config
from .launcher import Resources, run
from .report import file_safe

__all__ = ["Cell", "GridSpec", "load_grid", "run_grid", "run_into", "versions"]

#: A run's checkpoint directory: ``OUTPUT/<run>/checkpoint``.
CHECKPOINT_DIR_NAME = "checkpoint"
#: Seconds a run waits for its checkpoint directory's lock (as the ServerApp does).
LOCK_WAIT = 120.0
#: Flower's log of a run: ``OUTPUT/<run>/flower.log``.
FLOWER_LOG_NAME = "flower.log"
#: What a run's record may hold besides its rounds, kept in its ``config.json``.
RECORD_EXTRAS = ("pretrain", "attack_trigger", "crfl_certificate")
GRID_KEYS = ("name", "output", "defenses", "attacks", "seeds", "cells", "base", "resources")
CELL_KEYS = ("defenses", "attacks", "seeds", "base")
RESOURCE_KEYS = {
    "cpus-per-client": "cpus_per_client",
    "gpus-per-client": "gpus_per_client",
    "concurrency": "concurrency",
    "ray-address": "ray_address",
    "allow-cpu-fallback": "allow_cpu_fallback",
}


@dataclass
class Cell:
    """One ``defenses x attacks x seeds`` product of a grid, with its own run-config overrides."""

    defenses: list[str]
    attacks: list[str]
    seeds: list[int]
    base: dict[str, Any] = field(default_factory=dict)


@dataclass
class GridSpec:
    """A parsed grid file."""

    name: str
    output: Path
    defenses: list[str]
    attacks: list[str]
    seeds: list[int]
    base: dict[str, Any] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    #: further products, for grids that are not one product
    cells: list[Cell] = field(default_factory=list)

    def runs(self) -> list[tuple[str, dict[str, Any]]]:
        """``(run name, run-config overrides)`` for every defense x attack x seed of the
        top-level lists and of each cell (with the cell's ``base`` over the grid's), in
        that order, each run once.

        With ``pretrain-rounds`` set, ``pretrain-cache`` defaults to
        ``OUTPUT/pretrained``: the runs of one seed share one pretrained model.
        """
        base = dict(self.base)
        if base.get("pretrain-rounds") and not base.get("pretrain-cache"):
            base["pretrain-cache"] = str(self.output / CACHE_DIR_NAME)
        runs: dict[str, dict[str, Any]] = {}
        for cell in [Cell(self.defenses, self.attacks, self.seeds), *self.cells]:
            for defense in cell.defenses:
                for attack in cell.attacks:
                    for seed in cell.seeds:
                        overrides = {**base, **cell.base, "defense": defense, "attack": attack, "seed": seed}
                        label = file_safe(defense_label({**DEFAULTS, **overrides}))
                        runs.setdefault(f"{label}__{attack}__seed{seed}", overrides)
        return list(runs.items())


def resources_from(table: Mapping[str, Any], where: str) -> Resources:
    """:class:`Resources` from hyphenated keys; unknown keys raise ``ValueError``."""
    unknown = sorted(set(table) - set(RESOURCE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown resources key(s) {unknown}; valid: {sorted(RESOURCE_KEYS)}")
    return Resources(**{RESOURCE_KEYS[k]: v for k, v in table.items()})


def load_grid(path: str | Path) -> GridSpec:
    """Parse and check a grid file (``.toml``, ``.yaml`` or ``.yml``).

    Raises ``ValueError`` naming an unknown key (top level, ``base`` or
    ``resources``) or an invalid value (unknown defense, attack, task, ...),
    before any training starts.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(text) or {}
    elif path.suffix == ".toml":
        raw = tomllib.loads(text)
    else:
        raise ValueError(f"{path}: grid files are .toml, .yaml or .yml")
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; valid: {list(GRID_KEYS)}")
    base = _run_config_table(raw.get("base", {}), f"{path}: unknown run-config key(s) in [base]")
    cells = []
    for number, cell in enumerate(raw.get("cells", []), start=1):
        unknown = sorted(set(cell) - set(CELL_KEYS))
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown} in cell {number}; valid: {list(CELL_KEYS)}")
        where = f"{path}: unknown run-config key(s) in cell {number}'s base"
        cell_base = _run_config_table(cell.get("base", {}), where)
        cells.append(Cell(*_lists(cell, {"defenses": ["invariant"]}), base=cell_base))
    # Without cells the top-level lists have defaults; with cells they are optional extras.
    defaults = {"defenses": ["fedavg", "invariant"]} if not cells else {"defenses": []}
    defenses, attacks, seeds = _lists(raw, defaults)
    spec = GridSpec(
        name=str(raw.get("name", path.stem)),
        output=Path(raw.get("output", Path("results") / path.stem)),
        defenses=defenses,
        attacks=attacks,
        seeds=seeds,
        base=base,
        resources=resources_from(raw.get("resources", {}), f"{path} [resources]"),
        cells=cells,
    )
    for name, overrides in spec.runs():
        try:
            resolve_config(overrides)
        except ValueError as error:
            raise ValueError(f"{path}: run {name}: {error}") from None
    return spec


def _run_config_table(table: Mapping[str, Any], error: str) -> dict[str, Any]:
    """``table`` as a dict; ``ValueError`` (``error`` and the keys) for keys that are not run-config keys."""
    unknown = sorted(set(table) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"{error}: {unknown} (see simulation/config.py)")
    return dict(table)


def _lists(table: Mapping[str, Any], defaults: Mapping[str, list]) -> tuple[list[str], list[str], list[int]]:
    """``(defenses, attacks, seeds)`` of a grid file's top level or one of its cells."""
    return (
        list(table.get("defenses", defaults["defenses"])),
        list(table.get("attacks", [DEFAULTS["attack"]])),
        [int(s) for s in table.get("seeds", [0])],
    )


def versions() -> dict[str, str]:
    """Python, platform, package versions and the git commit of this checkout (if any)."""
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("flwr-invariant", "flwr", "torch", "torchvision", "numpy", "ray", "scikit-learn"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        found["git-commit"] = commit.stdout.strip() if commit.returncode == 0 else "unknown"
    except OSError:
        found["git-commit"] = "unknown"
    return found


def _write_json(path: Path, value: Any) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(value, indent=1, default=float), encoding="utf-8")
    os.replace(temporary, path)


def run_into(
    run_dir: Path,
    overrides: Mapping[str, Any],
    resources: Resources,
    grid: str = "",
    progress: bool = True,
    verbose: bool = False,
) -> dict[str, Any]:
    """One run into ``run_dir`` (``config.json`` + ``metrics.jsonl``); returns its record.

    Flower's log of the run is appended to ``run_dir/flower.log`` (``verbose``: and
    printed to stderr).

    The ServerApp keeps a round checkpoint in ``run_dir/checkpoint`` (unless the
    overrides set ``checkpoint-dir``). A run that did not complete resumes from it:
    ``metrics.jsonl`` keeps the rounds up to the checkpoint and new rounds are
    appended, and ``config.json``'s ``resumed`` lists each resumption and its round.
    A completed run is run again from round 0. Rounds are appended to
    ``metrics.jsonl`` as they finish; at the end the file is rewritten with the
    strategy's metrics added and ``config.json`` is marked ``completed``. Raises
    ``CheckpointError`` (naming the file) for a checkpoint of another run config
    or a corrupt one, before anything is trained.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    given = dict(overrides)
    overrides = {"checkpoint-dir": str((run_dir / CHECKPOINT_DIR_NAME).resolve()), **given}
    config = resolve_config(overrides)
    checkpoint_dir = Path(config["checkpoint-dir"])
    previous = _read_meta(run_dir)
    # Not while another process runs it (the ServerApp locks it); the ServerApp of a killed
    # launcher runs on until Flower's parent-process monitor ends it, so wait for it a while.
    with checkpoint_lock(checkpoint_dir, wait=LOCK_WAIT):
        if previous.get("completed") is True and clear_checkpoint(checkpoint_dir):
            log(INFO, "%s: completed earlier; running it again from round 0", run_dir.name)
        saved = read_checkpoint(checkpoint_dir, config)
    meta = {
        "run": config,
        "overrides": given,  # without the checkpoint-dir: `run --from` into another directory starts anew
        "resources": {key: getattr(resources, attr) for key, attr in RESOURCE_KEYS.items()},
        "versions": versions(),
        "grid": grid,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "completed": False,
    }
    metrics_path = run_dir / "metrics.jsonl"
    if saved is None:
        if previous:
            log(INFO, "%s: no checkpoint in %s; starting from round 0", run_dir.name, checkpoint_dir)
        mode = "w"
    else:
        log(INFO, "%s: resuming after round %d (%s)", run_dir.name, saved.server_round, saved.path)
        resumed = [*previous.get("resumed", []), {"from_round": saved.server_round, "at": meta["started"]}]
        meta.update(started=previous.get("started", meta["started"]), resumed=resumed)
        _keep_rounds(metrics_path, saved.server_round)
        mode = "a"
    _write_json(run_dir / "config.json", meta)
    if mode == "w":
        metrics_path.write_text("", encoding="utf-8")
    # The ServerApp appends each round's row to metrics.jsonl itself, before the round's checkpoint.
    record = run(
        overrides,
        resources,
        progress=progress,
        label=run_dir.name,
        done=0 if saved is None else saved.server_round + 1,
        flower_log=run_dir / FLOWER_LOG_NAME,
        verbose=verbose,
        rounds_file=metrics_path,
    )
    temporary = metrics_path.with_suffix(".jsonl.tmp")
    temporary.write_text("".join(json.dumps(row, default=float) + "\n" for row in record["rounds"]))
    os.replace(temporary, metrics_path)
    finished = {"completed": True, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    finished.update({key: record[key] for key in RECORD_EXTRAS if key in record})
    _write_json(run_dir / "config.json", {**meta, **finished})
    return record


def _read_meta(run_dir: Path) -> dict[str, Any]:
    """``run_dir/config.json`` as a dict; empty when absent or unreadable (then nothing is resumed
    from it but the checkpoint, which carries its own run config)."""
    try:
        meta = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _keep_rounds(metrics_path: Path, last_round: int) -> None:
    """Rewrite ``metrics.jsonl`` with its rows of rounds ``<= last_round``, each round once."""
    if not metrics_path.exists():
        return
    kept: dict[int, str] = {}
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            server_round = int(json.loads(line)["round"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the crash
        if server_round <= last_round:
            kept.setdefault(server_round, line)
    temporary = metrics_path.with_suffix(".jsonl.tmp")
    temporary.write_text("".join(kept[r] + "\n" for r in sorted(kept)), encoding="utf-8")
    os.replace(temporary, metrics_path)


def is_completed(run_dir: Path) -> bool:
    """Whether ``run_dir/config.json`` exists and says ``completed``."""
    try:
        return bool(json.loads((run_dir / "config.json").read_text())["completed"])
    except (OSError, ValueError, KeyError):
        return False


def check_writable(directory: Path) -> None:
    """Create ``directory`` and write a probe file; ``PermissionError`` naming it otherwise."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"output directory {str(directory)!r} is not writable: {error}") from None


def run_grid(spec: GridSpec, *, progress: bool = True, verbose: bool = False) -> list[Path]:
    """Run every not yet completed run of ``spec``; returns all run directories.

    ``verbose``: print Flower's log of each run to stderr too.

    A missing data root or sent140 file stops it before the first run (``FileNotFoundError``).
    """
    from .data import check_task_files

    check_writable(spec.output)
    run_dirs = []
    runs = spec.runs()
    for _, overrides in runs:
        check_task_files(resolve_config(overrides))
    for index, (name, overrides) in enumerate(runs, start=1):
        run_dir = spec.output / name
        run_dirs.append(run_dir)
        if is_completed(run_dir):
            log(INFO, "[%d/%d] %s: completed earlier, skipped", index, len(runs), name)
            continue
        log(INFO, "[%d/%d] %s", index, len(runs), name)
        run_into(run_dir, overrides, spec.resources, spec.name, progress, verbose)
    return run_dirs
