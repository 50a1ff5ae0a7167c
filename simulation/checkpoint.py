"""Round checkpoints of the ServerApp: what a run needs to continue exactly where it stopped.

A checkpoint directory (run config ``checkpoint-dir``) holds two files:

- ``round-NNNNNN.npz``: the arrays, saved with :func:`numpy.savez` and read with
  ``allow_pickle=False`` (no pickle anywhere): ``model/<key>`` (the global model after
  round N), ``initial/<key>`` (the round-0 model, only for defenses that need it after
  the last round: FLAIN) and ``strategy/<attribute>[/<partition>]`` (the defense's
  arrays that carry across rounds, e.g. FoolsGold's per-client histories, keyed by
  partition id because node ids change when nodes reconnect);
- ``checkpoint.json``: ``format``, ``version``, ``round``, the run ``config``, the
  name, SHA-256 and entries (name, shape, dtype) of the ``.npz`` file, the strategy's
  other state (e.g. the numpy generator state of FLAME's and weak DP's noise), the
  per-round metrics so far (``history``), the pretraining summary and, under ``f3ba`` /
  ``a3fl``, the attackers' trigger the server relays to the next round (``attack_trigger``).

Both are written to a temporary file and moved into place with ``os.replace``; the
``.npz`` first, then ``checkpoint.json``, which names it. A crash at any point leaves
the previous ``checkpoint.json`` and the file it names intact. Reading checks the
format, the run config (every key but :data:`EXEMPT_KEYS`), the SHA-256 and the
entries, and :func:`check_model` the model's keys and shapes; each failure raises
:class:`CheckpointError` naming the file and the mismatch.

Client sampling needs nothing from a checkpoint: :class:`~simulation.sampling.RoundSampler`
draws each round from ``(seed, round)``, and clients seed their training from
``(seed, partition, round)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common.logger import log

from .config import DEFAULTS

__all__ = [
    "CHECKPOINT_FILE",
    "EXEMPT_KEYS",
    "Checkpoint",
    "CheckpointError",
    "check_model",
    "checkpoint_lock",
    "clear_checkpoint",
    "read_checkpoint",
    "restore_strategy_state",
    "strategy_state",
    "write_checkpoint",
]

CHECKPOINT_FILE = "checkpoint.json"
LOCK_FILE = "lock"
FORMAT = "flwr-invariant-checkpoint"
VERSION = 1

#: Run-config keys that may differ between a run and its resumption: where files go and how
#: the run is executed, not what it computes.
EXEMPT_KEYS = frozenset(
    {
        "results-file",
        "rounds-file",
        "checkpoint-dir",
        "checkpoint-every",
        "data-root",
        "download",
        "pretrain-cache",
        "round-timeout",
        "device",
    }
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, corrupt, or from another run."""


@dataclass
class Checkpoint:
    """The state of a run after round ``server_round``.

    model: the global model's arrays (in the model's key order).
    initial: the round-0 model, for defenses that need it after the last round (else ``None``).
    strategy_arrays / strategy_meta: the defense's state (see :func:`strategy_state`).
    history: per-round metrics so far, JSON-able (kept as the ServerApp gives them).
    pretrain: the pretraining summary, if the run pretrained.
    attack_trigger: under ``f3ba`` / ``a3fl``, the trigger the server relays to the next
    round (hex of :meth:`simulation.triggers.Trigger.to_bytes`), else ``None``.
    """

    server_round: int
    model: dict[str, np.ndarray]
    history: dict[str, Any]
    initial: dict[str, np.ndarray] | None = None
    strategy_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    strategy_meta: dict[str, Any] = field(default_factory=dict)
    pretrain: dict[str, Any] | None = None
    attack_trigger: str | None = None
    path: Path | None = None  # the .npz file it was read from


# -- strategy state ----------------------------------------------------------------------------------


def strategy_state(strategy: Any, partition_of: Mapping[int, int]) -> tuple[dict[str, np.ndarray], dict]:
    """The attributes a defense lists in ``carried_state``, as arrays plus JSON.

    ``partition_of``: node id -> partition id. Supported values: ``None``, a numpy
    array, a ``numpy.random.Generator`` (its bit generator state) and a dict from
    node id to array (stored per partition id). Raises ``TypeError`` for anything else.
    """
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"class": type(strategy).__name__, "attributes": {}}
    for name in getattr(strategy, "carried_state", ()):
        value = getattr(strategy, name)
        if value is None:
            meta["attributes"][name] = {"kind": "none"}
        elif isinstance(value, np.random.Generator):
            meta["attributes"][name] = {"kind": "generator", "state": value.bit_generator.state}
        elif isinstance(value, np.ndarray):
            arrays[f"strategy/{name}"] = value
            meta["attributes"][name] = {"kind": "array"}
        elif isinstance(value, dict) and all(isinstance(v, np.ndarray) for v in value.values()):
            partitions = sorted(partition_of[node] for node in value)
            for node, array in value.items():
                arrays[f"strategy/{name}/{partition_of[node]}"] = array
            meta["attributes"][name] = {"kind": "per-node", "partitions": partitions}
        else:
            raise TypeError(f"{type(strategy).__name__}.{name}: cannot checkpoint a {type(value).__name__}")
    return arrays, meta


def restore_strategy_state(strategy: Any, checkpoint: Checkpoint, node_of: Mapping[int, int]) -> None:
    """Set the attributes saved by :func:`strategy_state`; ``node_of``: partition id -> node id now."""
    meta = checkpoint.strategy_meta
    where = checkpoint.path
    if meta.get("class") != type(strategy).__name__:
        raise CheckpointError(
            f"checkpoint {str(where)!r} holds the state of a {meta.get('class')!r} strategy, "
            f"not of {type(strategy).__name__!r}"
        )
    expected = set(getattr(strategy, "carried_state", ()))
    if set(meta["attributes"]) != expected:
        raise CheckpointError(
            f"checkpoint {str(where)!r} holds strategy state {sorted(meta['attributes'])}, "
            f"{type(strategy).__name__} keeps {sorted(expected)}"
        )
    for name, saved in meta["attributes"].items():
        kind = saved["kind"]
        if kind == "none":
            value: Any = None
        elif kind == "generator":
            value = getattr(strategy, name)
            if value.bit_generator.state["bit_generator"] != saved["state"]["bit_generator"]:
                raise CheckpointError(f"checkpoint {str(where)!r}: {name} uses another bit generator")
            value.bit_generator.state = saved["state"]
        elif kind == "array":
            value = checkpoint.strategy_arrays[f"strategy/{name}"]
        elif kind == "per-node":
            missing = [p for p in saved["partitions"] if p not in node_of]
            if missing:
                raise CheckpointError(f"checkpoint {str(where)!r}: {name} has partitions {missing} not here")
            stored = checkpoint.strategy_arrays
            value = {node_of[p]: stored[f"strategy/{name}/{p}"] for p in saved["partitions"]}
        else:
            raise CheckpointError(f"checkpoint {str(where)!r}: unknown state kind {kind!r} of {name}")
        setattr(strategy, name, value)


# -- files ---------------------------------------------------------------------------------------------


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _replace_atomically(temporary: Path, path: Path) -> None:
    with temporary.open("rb+") as stream:
        os.fsync(stream.fileno())
    os.replace(temporary, path)
    _fsync_directory(path.parent)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _entries(arrays: Mapping[str, np.ndarray]) -> list[list[Any]]:
    return [[name, list(array.shape), array.dtype.str] for name, array in arrays.items()]


def write_checkpoint(directory: Path, config: Mapping[str, Any], checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` into ``directory`` atomically; returns the ``checkpoint.json`` path.

    Older ``.npz`` files are removed once the new ``checkpoint.json`` is in place.
    """
    directory.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {f"model/{k}": np.asarray(v) for k, v in checkpoint.model.items()}
    if checkpoint.initial is not None:
        arrays.update({f"initial/{k}": np.asarray(v) for k, v in checkpoint.initial.items()})
    arrays.update(checkpoint.strategy_arrays)
    for name, array in arrays.items():
        if array.dtype.hasobject:
            raise TypeError(f"checkpoint entry {name!r} has dtype object; only numeric arrays are saved")
    npz = directory / f"round-{checkpoint.server_round:06d}.npz"
    temporary = directory / f".{npz.name}.{os.getpid()}.tmp"
    with temporary.open("wb") as stream:
        np.savez(stream, **arrays)
    digest = _sha256(temporary)
    _replace_atomically(temporary, npz)
    document = {
        "format": FORMAT,
        "version": VERSION,
        "round": checkpoint.server_round,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": dict(config),
        "arrays": {"file": npz.name, "sha256": digest, "entries": _entries(arrays)},
        "strategy": checkpoint.strategy_meta,
        "history": checkpoint.history,
        "pretrain": checkpoint.pretrain,
        "attack_trigger": checkpoint.attack_trigger,
    }
    path = directory / CHECKPOINT_FILE
    temporary = directory / f".{CHECKPOINT_FILE}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(document, indent=1, default=float), encoding="utf-8")
    _replace_atomically(temporary, path)
    for old in directory.glob("round-*.npz"):
        if old.name != npz.name:
            old.unlink(missing_ok=True)
    return path


def clear_checkpoint(directory: Path) -> bool:
    """Remove the checkpoint files from ``directory`` (not the directory); whether there were any."""
    files = [directory / CHECKPOINT_FILE, *directory.glob("round-*.npz"), *directory.glob(".*.tmp")]
    present = [path for path in files if path.exists()]
    for path in present:
        path.unlink(missing_ok=True)
    return bool(present)


def _config_mismatch(saved: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ. A key the checkpoint lacks (added by a newer version) counts
    as equal while the run leaves it at its default, which keeps the older behaviour."""
    keys = (set(saved) | set(config)) - EXEMPT_KEYS
    return [
        f"{key} is {saved.get(key, '<unset>')!r} there, {config.get(key, '<unset>')!r} here"
        for key in sorted(keys)
        if saved.get(key) != config.get(key)
        and not (key not in saved and key in DEFAULTS and config.get(key) == DEFAULTS[key])
    ]


def read_checkpoint(directory: Path, config: Mapping[str, Any]) -> Checkpoint | None:
    """The checkpoint in ``directory``, or ``None`` if it holds none (no ``checkpoint.json``).

    Raises :class:`CheckpointError` naming the file when ``checkpoint.json`` cannot be
    parsed, was written for another run config (the differing keys are listed), or
    its ``.npz`` file is missing, truncated, altered or holds other entries.
    """
    path = directory / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r} is not valid JSON (truncated?): {error}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a {FORMAT} file")
    if document.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format version {document.get('version')!r}; "
            f"this code reads version {VERSION}"
        )
    try:
        server_round = int(document["round"])
        saved_config, listing = document["config"], document["arrays"]
        npz = directory / Path(listing["file"]).name
        digest, entries = listing["sha256"], listing["entries"]
        history, strategy = document["history"], document["strategy"]
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {error}") from None
    mismatch = _config_mismatch(saved_config, config)
    if mismatch:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written by another run: "
            + "; ".join(mismatch)
            + ". Use another checkpoint-dir (or delete this one to start again)"
        )
    if not 0 <= server_round <= int(config["num-server-rounds"]):
        raise CheckpointError(f"checkpoint {str(path)!r}: round {server_round} is out of range")
    if not npz.exists():
        raise CheckpointError(f"checkpoint arrays {str(npz)!r} (named by {str(path)!r}) are missing")
    if _sha256(npz) != digest:
        raise CheckpointError(
            f"checkpoint arrays {str(npz)!r} are corrupt (truncated or altered): "
            f"their SHA-256 differs from the one in {str(path)!r}"
        )
    try:
        with np.load(npz, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError) as error:
        raise CheckpointError(f"checkpoint arrays {str(npz)!r} cannot be read: {error}") from None
    if _entries(arrays) != entries:
        raise CheckpointError(f"checkpoint arrays {str(npz)!r} do not hold the entries {str(path)!r} lists")

    def group(prefix: str) -> dict[str, np.ndarray]:
        return {name[len(prefix) :]: array for name, array in arrays.items() if name.startswith(prefix)}

    return Checkpoint(
        server_round=server_round,
        model=group("model/"),
        history=history,
        initial=group("initial/") or None,
        strategy_arrays={name: a for name, a in arrays.items() if name.startswith("strategy/")},
        strategy_meta=strategy,
        pretrain=document.get("pretrain"),
        attack_trigger=document.get("attack_trigger"),
        path=npz,
    )


def check_model(checkpoint: Checkpoint, template: Mapping[str, Any]) -> None:
    """``CheckpointError`` naming the file unless the saved model has ``template``'s keys and shapes.

    ``template``: key -> array of the model this run builds (numpy arrays or torch tensors).
    """
    where = str(checkpoint.path)
    for name, saved in (("model", checkpoint.model), ("initial", checkpoint.initial)):
        if saved is None:
            continue
        if list(saved) != list(template):
            missing = [k for k in template if k not in saved][:3]
            extra = [k for k in saved if k not in template][:3]
            raise CheckpointError(
                f"checkpoint arrays {where!r}: the saved {name} has other keys than this run's model "
                f"(missing {missing}, unexpected {extra})"
            )
        for key, array in template.items():
            shape = tuple(array.shape)
            if saved[key].shape != shape:
                raise CheckpointError(
                    f"checkpoint arrays {where!r}: {name} {key!r} has shape {saved[key].shape}, "
                    f"this run's model has {shape}"
                )


@contextlib.contextmanager
def checkpoint_lock(directory: Path | None, wait: float = 0.0) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (none for ``None``): one ServerApp per checkpoint.

    The lock is released when the process ends, however it ends. Waits up to ``wait``
    seconds for another holder (e.g. the ServerApp of a crashed SuperLink, still
    shutting down), then raises :class:`CheckpointError` naming the directory.
    """
    if directory is None:
        yield
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    deadline = time.monotonic() + wait
    with path.open("a+") as stream:
        while True:
            try:
                fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                stream.seek(0)
                holder = stream.read().strip() or "another process"
                if time.monotonic() >= deadline:
                    raise CheckpointError(
                        f"checkpoint directory {str(directory)!r} is in use by {holder} (lock {str(path)!r})"
                    ) from None
                log(WARNING, "checkpoint directory %s is in use by %s; waiting", directory, holder)
                time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        stream.seek(0)
        stream.truncate()
        stream.write(f"pid {os.getpid()}")
        stream.flush()
        try:
            yield
        finally:
            fcntl.flock(stream.fileno(), fcntl.LOCK_UN)
