"""Time one round of aggregation on ResNet-18-sized updates against Flower's own strategies.

For each client count, every strategy gets the same ``FitRes`` list (float32 ResNet-18
state dicts with torchvision's real layer shapes, 11.19 M values each) in one process.
Each client's update is a direction shared by all clients plus its own noise of the same
scale, so clients agree on the sign of some coordinates and not others. Prints a Markdown
table: each ``aggregate_fit`` time (best of ``--repeats`` calls, fewer once a strategy's
calls have taken ``--budget`` seconds; the strategies take turns, so that they share the
machine's load alike), the process CPU time of that call, its ratios to ``FedTrimmedAvg``
and ``FedAvg``, the share of coordinates the mask kept, and the peak extra memory: what
Python and numpy allocated during one more call (tracemalloc, skipped for calls slower than
``--trace-max`` s; also relative to the stacked updates), and the largest growth of the
process's resident set during a timed call (which also sees torch's allocations).

The numpy engine runs with its compiled step where numba (the ``fast`` extra) is installed,
and again without it ("numpy only"). ``tau=0`` keeps every coordinate: the slowest case for
invariant aggregation. The client-selecting mask rules (``bloc-exclusion``,
``departure-exclusion`` and their ``busy-`` forms) add their pairwise test (the ``busy-`` forms
also their gate on quiet coordinates). A strategy whose memory would not fit is skipped.

    python benchmarks/aggregation.py [--clients 20,50,100,200] [--repeats 3] [--only numpy,FedAvg]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import os
import platform
import sys
import time
import tracemalloc
from dataclasses import dataclass, field
from unittest import mock

import numpy as np
import torch
import torchvision
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg, FedMedian, FedTrimmedAvg

from flwr_invariant import InvariantAggregation
from flwr_invariant.engines import chunked

TRIMMED, FEDAVG = "FedTrimmedAvg(beta=0.45)", "FedAvg"

# Peak extra memory of each strategy in stacked updates (measured at 20 clients, rounded up),
# to skip the ones that would not fit; the rest need less than one client's update more.
MEMORY_FACTORS = {TRIMMED: 1.5, "FedMedian": 1.5}


class Proxy(ClientProxy):
    """Identity only; ``aggregate_fit`` reads just ``cid``."""

    def get_properties(self, *args, **kwargs):
        raise NotImplementedError

    get_parameters = fit = evaluate = reconnect = get_properties


def resnet18_round(num_clients: int, seed: int = 0):
    """Global ResNet-18 (10 classes) weights and ``num_clients`` updated copies as FitRes.

    Update of client i: ``1e-3 * (shared + noise_i)``, both standard normal per value.
    """
    rng = np.random.default_rng(seed)
    global_weights = [
        t.numpy().copy() for t in torchvision.models.resnet18(num_classes=10).state_dict().values()
    ]
    shared = [rng.standard_normal(w.shape, dtype=np.float32) for w in global_weights]
    results = []
    for i in range(num_clients):
        weights = [
            w + 1e-3 * (d + rng.standard_normal(w.shape, dtype=np.float32)) if w.dtype.kind == "f" else w
            for w, d in zip(global_weights, shared, strict=True)
        ]
        fit_res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(weights), 500, {})
        results.append((Proxy(str(i)), fit_res))
    return global_weights, results


class NumpyOnly:
    """A strategy whose numpy engine runs without its compiled step, as without the ``fast`` extra."""

    def __init__(self, strategy) -> None:
        self.strategy = strategy

    def configure_fit(self, *args):
        return self.strategy.configure_fit(*args)

    def aggregate_fit(self, *args):
        with mock.patch.object(chunked, "compiled_module", return_value=None):
            return self.strategy.aggregate_fit(*args)


def strategies(only: str = "") -> dict:
    """The strategies timed, by row label (``only``: comma-separated parts of the labels to keep)."""
    device = "GPU" if torch.cuda.is_available() else "CPU"
    numpy = "numpy + numba" if chunked.compiled_module() else "numpy"
    every = {
        f"InvariantAggregation ({numpy})": InvariantAggregation(),
        f"InvariantAggregation ({numpy}, tau=0)": InvariantAggregation(tau=0.0),
        f"InvariantAggregation ({numpy}, bloc-exclusion)": InvariantAggregation(mask_rule="bloc-exclusion"),
        f"InvariantAggregation ({numpy}, departure-exclusion)": InvariantAggregation(
            mask_rule="departure-exclusion"
        ),
        f"InvariantAggregation ({numpy}, busy-bloc-exclusion)": InvariantAggregation(
            mask_rule="busy-bloc-exclusion"
        ),
        f"InvariantAggregation ({numpy}, busy-departure-exclusion)": InvariantAggregation(
            mask_rule="busy-departure-exclusion"
        ),
        "InvariantAggregation (numpy only)": NumpyOnly(InvariantAggregation()),
        f"InvariantAggregation (torch, {device})": InvariantAggregation(backend="torch"),
        FEDAVG: FedAvg(),
        TRIMMED: FedTrimmedAvg(beta=0.45),
        "FedMedian": FedMedian(),
    }
    if numpy == "numpy":
        del every["InvariantAggregation (numpy only)"]
    parts = [part for part in only.split(",") if part]
    return {name: every[name] for name in every if not parts or any(part in name for part in parts)}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))


def reset_resident_peak() -> int | None:
    """Reset the resident-set high-water mark; returns the resident set in KiB (``None``:
    ``/proc/self/clear_refs`` is not there or not writable)."""
    gc.collect()
    if sys.platform == "linux":
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back so the baseline is honest
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return _status_kib("VmRSS:")
    except OSError:
        return None


@dataclass
class Timing:
    """The calls of one strategy: best wall time, CPU time of that call, largest resident growth."""

    seconds: float = float("inf")
    cpu_seconds: float = float("nan")
    spent: float = 0.0
    resident: int | None = None
    metrics: dict = field(default_factory=dict)

    def call(self, strategy, results) -> None:
        """One timed ``aggregate_fit``."""
        before = reset_resident_peak()
        start, cpu_start = time.perf_counter(), time.process_time()
        parameters, metrics = strategy.aggregate_fit(1, results, [])
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if before is not None:
            self.resident = max(self.resident or 0, (_status_kib("VmHWM:") - before) * 1024)
        assert parameters is not None
        self.spent += elapsed
        if elapsed < self.seconds:
            self.seconds, self.cpu_seconds, self.metrics = elapsed, cpu, metrics


def numpy_peak_bytes(strategy, results) -> int:
    """Peak bytes Python and numpy allocated during one more call (tracemalloc; not torch's)."""
    gc.collect()
    tracemalloc.start()
    baseline, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    strategy.aggregate_fit(1, results, [])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak - baseline


def available_bytes() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` (the physical memory elsewhere)."""
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def run(num_clients: int, repeats: int, budget: float, trace_max: float, only: str) -> dict[str, float]:
    """Time every strategy on one round of ``num_clients`` updates and print its table rows.

    Returns the seconds per strategy timed (none if the updates alone would not fit).
    """
    global_weights = [t.numpy() for t in torchvision.models.resnet18(num_classes=10).state_dict().values()]
    stacked_bytes = sum(w.nbytes for w in global_weights) * num_clients
    margin = 2 * 2**30  # left free for the rest of the machine
    if stacked_bytes + margin > available_bytes():
        print(f"| {num_clients} | all: the updates alone need {stacked_bytes / 2**30:.1f} GiB | skipped |")
        return {}
    global_weights, results = resnet18_round(num_clients)
    manager = SimpleClientManager()
    for proxy, _ in results:
        manager.register(proxy)
    timings: dict[str, Timing] = {}
    skipped: dict[str, float] = {}
    chosen = strategies(only)
    for name, strategy in chosen.items():
        needed = MEMORY_FACTORS.get(name, 0.0) * stacked_bytes + margin
        if needed > available_bytes():
            skipped[name] = needed
            continue
        strategy.configure_fit(1, ndarrays_to_parameters(global_weights), manager)
        timings[name] = Timing()
    for _ in range(repeats):
        for name, timing in timings.items():
            if timing.spent < budget:
                timing.call(chosen[name], results)
    traced = {
        name: numpy_peak_bytes(chosen[name], results) for name, t in timings.items() if t.seconds <= trace_max
    }
    for name in chosen:
        if name in skipped:
            print(f"| {num_clients} | {name} | skipped: needs ~{skipped[name] / 2**30:.0f} GiB free |")
            continue
        t = timings[name]
        ratios = [
            f"{timings[TRIMMED].seconds / t.seconds:.1f}x" if TRIMMED in timings else "-",
            f"{t.seconds / timings[FEDAVG].seconds:.2f}" if FEDAVG in timings else "-",
        ]
        mask = f"{t.metrics['mask_fraction']:.1%}" if "mask_fraction" in t.metrics else "-"
        peak = traced.get(name)
        cells = [
            str(num_clients),
            name,
            f"{t.seconds:.3f}",
            f"{t.cpu_seconds:.2f}",
            *ratios,
            mask,
            *(["-", "-"] if peak is None else [f"{peak / 2**20:.0f}", f"{peak / stacked_bytes:.3f}"]),
            "-" if t.resident is None else f"{t.resident / 2**20:.0f}",
        ]
        print("| " + " | ".join(cells) + " |", flush=True)
    return {name: t.seconds for name, t in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="20,50,100,200", help="comma-separated client counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of calls after which to stop")
    parser.add_argument(
        "--trace-max", type=float, default=20.0, help="slowest call traced once more for numpy's peak"
    )
    parser.add_argument("--only", default="", help="comma-separated parts of the strategy labels to run")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; "
        f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}"
    )
    if torch.cuda.is_available():
        print(f"gpu: {torch.cuda.get_device_name(0)}")
    compiled = chunked.compiled_module()
    print(f"numba {compiled.numba.__version__} (the 'fast' extra)" if compiled else "numba: not installed")
    print(f"command: python {' '.join(sys.argv)}")
    print("load average at start: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    print(
        "\n| clients | strategy | aggregate_fit s | CPU s | FedTrimmedAvg / this | this / FedAvg | mask kept "
        "| numpy peak MiB | x stacked | RSS peak MiB |\n|---|---|---|---|---|---|---|---|---|---|",
        flush=True,
    )
    start = time.perf_counter()
    for num_clients in (int(n) for n in args.clients.split(",")):
        run(num_clients, args.repeats, args.budget, args.trace_max, args.only)
        gc.collect()
    print(
        "\nload average at end: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
        + f"; whole run {(time.perf_counter() - start) / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
