"""Run one experiment with ``flwr.simulation.run_simulation`` on Ray.

Each virtual client (a Ray actor) gets ``cpus_per_client`` CPUs and a share of a
GPU: ``gpus_per_client = 0.25`` packs four clients on one GPU, ``"auto"``
spreads the wanted concurrency over the visible GPUs. Ray's scheduler does the
placement; ``ray_address`` attaches to a running Ray cluster (``ray start``) so
one run can span several machines. A progress bar shows round, elapsed time and
ETA.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

from flwr.common.logger import log

__all__ = ["Resources", "backend_config", "gpu_share", "run", "visible_gpus"]


@dataclass(frozen=True)
class Resources:
    """Ray resources of the virtual clients.

    cpus_per_client: CPUs reserved per virtual client (> 0).
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
        if not self.cpus_per_client > 0:
            raise ValueError(f"cpus-per-client must be > 0, got {self.cpus_per_client!r}")
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


def backend_config(resources: Resources, config: Mapping[str, Any], num_gpus: int | None = None) -> dict:
    """``run_simulation``'s ``backend_config``: client resources and ``ray.init`` arguments."""
    num_gpus = visible_gpus() if num_gpus is None else num_gpus
    share = gpu_share(resources, num_gpus, config["clients-per-round"])
    init_args: dict[str, Any] = {"logging_level": "error", "log_to_driver": False}
    if resources.ray_address:
        init_args["address"] = resources.ray_address  # the cluster brings its own CPUs and GPUs
    else:
        # "local": a new Ray instance even when a cluster started with `ray start` runs on this machine
        init_args.update(address="local", num_cpus=os.cpu_count() or 1, num_gpus=num_gpus if share else 0)
    return {
        "client_resources": {"num_cpus": resources.cpus_per_client, "num_gpus": share},
        "init_args": init_args,
    }


def run(
    config: Mapping[str, Any],
    resources: Resources | None = None,
    *,
    progress: bool = True,
    label: str = "",
    on_round: Callable[[dict[str, Any]], None] | None = None,
    done: int = 0,
) -> dict[str, Any]:
    """One simulation with ``num-partitions`` SuperNodes; returns the ServerApp's record.

    ``config``: run-config overrides (see :mod:`simulation.config`). The record
    is ``{"config": resolved config, "rounds": [per-round metrics]}``. ``done``:
    evaluations already done (a resumed run), where the progress bar starts.
    """
    from flwr.simulation import run_simulation
    from tqdm import tqdm

    from simulation.client_app import make_client_app

    from .config import resolve_config
    from .server_app import make_server_app

    resolved = resolve_config(config)
    backend = backend_config(resources or Resources(), resolved)
    log(INFO, "%s: client resources %s", label or "run", backend["client_resources"])
    records: list[dict[str, Any]] = []
    bar = tqdm(
        total=resolved["num-server-rounds"] + 1,
        initial=done,
        desc=label or resolved["defense"],
        unit="round",
        disable=not progress,
    )

    def round_done(row: dict[str, Any]) -> None:
        bar.update(1)
        shown = {k: f"{row[k]:.3f}" for k in ("acc_main", "acc_backdoor") if k in row}
        bar.set_postfix(shown)
        if on_round is not None:
            on_round(row)

    try:
        run_simulation(
            server_app=make_server_app(dict(config), on_result=records.append, on_round=round_done),
            client_app=make_client_app(dict(config)),
            num_supernodes=resolved["num-partitions"],
            backend_config=backend,
        )
    finally:
        bar.close()
    if not records:
        raise RuntimeError("the ServerApp finished without a result (see the log above)")
    return records[0]
