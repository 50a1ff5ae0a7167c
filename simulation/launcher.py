"""Run one experiment on Flower's simulation runtime: a local SuperLink and ``flwr run``.

The launcher writes the Flower App (:mod:`simulation.flower_app`), starts a
``flower-superlink --simulation`` of its own (:mod:`simulation.superlink`),
submits the run with its run config and the federation's simulation settings,
follows the ServerApp's per-round rows (run config ``rounds-file``) with a
progress bar (round, elapsed time, ETA), reads the record it wrote
(``results-file``) and stops the SuperLink. Flower's own log goes to a file
(``flower_log``), or also to stderr with ``verbose``.

Each virtual client (a Ray actor) gets ``cpus_per_client`` CPUs and a share of a
GPU: ``gpus_per_client = 0.25`` packs four clients on one GPU, ``"auto"``
spreads the wanted concurrency over the visible GPUs. Ray's scheduler does the
placement; ``ray_address`` attaches to a running Ray cluster (``ray start``) so
one run can span several machines. Flower's federation config has no Ray
address, so it is passed as Ray's own ``RAY_ADDRESS`` in the environment of the
SuperLink this launcher starts (``ray.init()`` reads it).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from logging import DEBUG, WARNING
from pathlib import Path
from typing import Any

from flwr.common.logger import log

from .config import DATA_ROOT_ENV, DEFAULTS, resolve_config

__all__ = ["Resources", "federation_config", "gpu_share", "run", "superlink_env", "visible_gpus"]

#: Run-config keys holding paths: made absolute before they reach the simulation process.
PATH_KEYS = ("results-file", "rounds-file", "checkpoint-dir", "pretrain-cache", "data-root")
#: Ray warns on every ``ray.init`` that a future release changes how GPU-less actors see GPUs;
#: the launcher keeps today's behaviour (they see none) and silences the notice.
RAY_NOTICE_FILTER = "ignore:Tip:FutureWarning"


@dataclass(frozen=True)
class Resources:
    """Ray resources of the virtual clients.

    cpus_per_client: CPUs reserved per virtual client, a whole number >= 1 (Flower's
        ``client-resources-num-cpus`` is an integer).
    gpus_per_client: share of one GPU per client (0 = CPU only), or ``"auto"``.
    concurrency: with ``"auto"``, clients to run at once over all GPUs
        (0 = the run's ``clients-per-round``).
    ray_address: attach to this Ray cluster (``"auto"``, ``"ray://host:10001"``)
        instead of starting one on this machine.
    allow_cpu_fallback: run on the CPU when GPUs are requested but none is visible.
    """

    cpus_per_client: float = 1.0
    gpus_per_client: float | str = 0.0
    concurrency: int = 0
    ray_address: str = ""
    allow_cpu_fallback: bool = False

    def __post_init__(self) -> None:
        cpus = self.cpus_per_client
        if not (isinstance(cpus, int | float) and cpus >= 1 and float(cpus).is_integer()):
            raise ValueError(
                f"cpus-per-client must be a whole number >= 1 (Flower's client-resources-num-cpus "
                f"is an integer), got {cpus!r}"
            )
        share = self.gpus_per_client
        if share != "auto" and not (isinstance(share, int | float) and 0 <= share <= 1):
            raise ValueError(f"gpus-per-client must be 'auto' or a number in [0, 1], got {share!r}")
        if self.concurrency < 0:
            raise ValueError(f"concurrency must be >= 0, got {self.concurrency!r}")


def visible_gpus() -> int:
    """CUDA GPUs torch sees in this process."""
    import torch

    return torch.cuda.device_count()


def gpu_share(resources: Resources, num_gpus: int, clients_per_round: int) -> float:
    """GPU share per virtual client.

    ``"auto"``: ``num_gpus / concurrency`` (at most 1). Raises ``RuntimeError``
    when a GPU share is asked for and no GPU is visible, unless
    ``allow_cpu_fallback`` (then 0, with a warning).
    """
    wanted = resources.gpus_per_client
    if wanted == 0:
        return 0.0
    if num_gpus == 0:
        if not resources.allow_cpu_fallback:
            raise RuntimeError(
                f"gpus-per-client={wanted!r} but no CUDA GPU is visible (torch.cuda.device_count() == 0); "
                "use gpus-per-client=0, or allow-cpu-fallback to run on the CPU"
            )
        log(WARNING, "gpus-per-client=%r but no CUDA GPU is visible: running on the CPU", wanted)
        return 0.0
    if wanted == "auto":
        concurrency = resources.concurrency or clients_per_round
        return min(1.0, num_gpus / concurrency)
    return float(wanted)


def federation_config(
    resources: Resources, config: Mapping[str, Any], num_gpus: int | None = None
) -> dict[str, Any]:
    """The run's federation config (``flwr run --federation-config``): SuperNodes and Ray settings.

    Keys as ``flwr federation simulation-config`` names them: ``num-supernodes``
    (``num-partitions``), ``client-resources-num-cpus``/``-num-gpus`` (each virtual
    client's Ray resources) and ``init-args-*`` (``ray.init`` arguments; without
    ``ray_address`` Ray gets this machine's CPUs and, if a GPU share is used, its GPUs).
    """
    num_gpus = visible_gpus() if num_gpus is None else num_gpus
    share = gpu_share(resources, num_gpus, config["clients-per-round"])
    federation: dict[str, Any] = {
        "num-supernodes": config["num-partitions"],
        "client-resources-num-cpus": int(resources.cpus_per_client),
        "client-resources-num-gpus": share,
        "init-args-logging-level": "error",
        "init-args-log-to-driver": False,
    }
    if not resources.ray_address:  # an existing cluster brings its own CPUs and GPUs
        federation["init-args-num-cpus"] = os.cpu_count() or 1
        federation["init-args-num-gpus"] = num_gpus if share else 0
    return federation


def superlink_env(resources: Resources) -> dict[str, str]:
    """Environment of the launcher's SuperLink: Ray's address and the silenced Ray notice.

    Without ``ray_address`` it is ``"local"``: Ray starts a new instance on this machine even
    when ``ray start`` left one running (``ray.init()`` would attach to that one otherwise);
    ``FLWR_INVARIANT_DATA_ROOT`` is made absolute.
    """
    warnings = os.environ.get("PYTHONWARNINGS", "")
    env = {
        "PYTHONWARNINGS": f"{warnings},{RAY_NOTICE_FILTER}" if warnings else RAY_NOTICE_FILTER,
        "RAY_ADDRESS": resources.ray_address or "local",
    }
    if root := os.environ.get(DATA_ROOT_ENV):
        env[DATA_ROOT_ENV] = str(Path(root).expanduser().resolve())
    return env


def _run_config(config: Mapping[str, Any], resolved: Mapping[str, Any]) -> dict[str, Any]:
    """The given run-config keys with their resolved (typed) values, paths made absolute."""
    out = {key: resolved[key] for key in config if key in DEFAULTS}
    for key in PATH_KEYS:
        if out.get(key):
            out[key] = str(Path(str(out[key])).expanduser().resolve())
    return out


def _new_rows(path: Path, seen: int) -> list[dict[str, Any]]:
    """Complete JSON lines of ``path`` after the first ``seen``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = text.splitlines(keepends=True)
    return [json.loads(line) for line in lines[seen:] if line.endswith("\n")]


def run(
    config: Mapping[str, Any],
    resources: Resources | None = None,
    *,
    progress: bool = True,
    label: str = "",
    on_round: Callable[[dict[str, Any]], None] | None = None,
    done: int = 0,
    flower_log: Path | None = None,
    verbose: bool = False,
    app_dir: Path | None = None,
    rounds_file: Path | None = None,
) -> dict[str, Any]:
    """One simulation with ``num-partitions`` SuperNodes; returns the ServerApp's record.

    ``config``: run-config overrides (see :mod:`simulation.config`). The record
    is ``{"config": resolved config, "rounds": [per-round metrics]}``. ``done``:
    evaluations already done (a resumed run), where the progress bar starts.
    ``flower_log``: file for Flower's log of the run (default: a temporary one,
    quoted when the run fails); ``verbose``: print it to stderr as well.
    ``app_dir``: a Flower App to run instead of :func:`simulation.flower_app.write_app_dir`'s.
    ``rounds_file``: the JSON-lines file the ServerApp appends each row to, before the round's
    checkpoint (default: a temporary one); rows already in it are not reported again.
    Raises ``RuntimeError`` (with the end of Flower's log) when the run fails.
    """
    from tqdm import tqdm

    from .flower_app import write_app_dir
    from .superlink import LocalSuperLink

    resources = resources or Resources()
    resolved = resolve_config(config)
    federation = federation_config(resources, resolved)
    log(DEBUG, "%s: federation config %s", label or "run", federation)
    with tempfile.TemporaryDirectory(prefix="flwr-invariant-run-") as scratch:
        work = Path(scratch)
        run_config = _run_config(config, resolved)
        results = Path(run_config.get("results-file") or work / "results.json")
        rounds = (rounds_file or work / "rounds.jsonl").resolve()
        run_config.update({"results-file": str(results), "rounds-file": str(rounds)})
        log_path = flower_log or work / "flower.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        app = app_dir or write_app_dir(work / "app")
        bar = tqdm(
            total=resolved["num-server-rounds"] + 1,
            initial=done,
            desc=label or resolved["defense"],
            unit="round",
            disable=not progress,
        )
        seen, echoed = len(_new_rows(rounds, 0)), 0

        def follow() -> None:
            nonlocal seen, echoed
            for row in _new_rows(rounds, seen):
                seen += 1
                bar.set_postfix({k: f"{row[k]:.3f}" for k in ("acc_main", "acc_backdoor") if k in row}, False)
                bar.update(1)
                if on_round is not None:
                    on_round(row)
            if verbose:
                text = log_path.read_bytes()
                sys.stderr.write(text[echoed:].decode(errors="replace"))
                echoed = len(text)

        with LocalSuperLink(work / "flwr-home", superlink_env(resources)) as link:
            try:
                with log_path.open("ab") as log_file:
                    stream = link.submit(app, run_config, federation, log_file)
                    while stream.poll() is None:
                        link.remember_sessions()
                        follow()
                        time.sleep(0.5)
                follow()
                runs = link.finished_runs()
            except BaseException:
                link.stop_runs()
                raise
            finally:
                bar.close()
        status = runs[0]["status"] if len(runs) == 1 else f"{len(runs)} runs"
        if status != "finished:completed" or not results.exists():
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"the run ended as {status!r}; end of Flower's log ({log_path}):\n{tail}")
        return json.loads(results.read_text(encoding="utf-8"))
