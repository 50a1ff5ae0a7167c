"""Time one round of aggregation on ResNet-18-sized updates, against Flower's own strategies.

All strategies get the same ``FitRes`` list (20 clients, float32 ResNet-18 state
dicts with torchvision's real layer shapes, 11.19 M values each) in one process.
Each client's update is a direction shared by all clients plus its own noise of
the same scale, so clients agree on the sign of some coordinates and not others.
Prints each ``aggregate_fit`` time (best of ``--repeats``), the ratios against
``FedTrimmedAvg.aggregate_fit``, the share of coordinates the mask kept, and the
peak extra memory that numpy allocated during the call (tracemalloc, in a
separate run), relative to the stacked updates. ``tau=0`` keeps every coordinate:
the slowest case for invariant aggregation.

    python benchmarks/aggregation.py [--clients 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
import tracemalloc

import numpy as np
import torch
import torchvision
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg, FedTrimmedAvg

from flwr_invariant import InvariantAggregation


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


def timed(strategy, results, repeats: int) -> tuple[float, dict]:
    """Best wall time of ``aggregate_fit`` over ``repeats`` calls, and its metrics."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        parameters, metrics = strategy.aggregate_fit(1, results, [])
        best = min(best, time.perf_counter() - start)
        assert parameters is not None
    return best, metrics


def peak_extra_bytes(strategy, results) -> int:
    tracemalloc.start()
    baseline, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    strategy.aggregate_fit(1, results, [])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak - baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)

    global_weights, results = resnet18_round(args.clients)
    num_values = sum(w.size for w in global_weights)
    stacked_bytes = sum(w.nbytes for w in global_weights) * args.clients
    manager = SimpleClientManager()
    for proxy, _ in results:
        manager.register(proxy)
    strategies = {
        "FedTrimmedAvg(beta=0.45)": FedTrimmedAvg(beta=0.45),
        "FedAvg": FedAvg(),
        "InvariantAggregation (numpy)": InvariantAggregation(),
        "InvariantAggregation (numpy, tau=0)": InvariantAggregation(tau=0.0),
    }
    if torch.cuda.is_available():
        strategies["InvariantAggregation (torch, GPU)"] = InvariantAggregation(backend="torch")
        strategies["InvariantAggregation (torch, GPU, tau=0)"] = InvariantAggregation(
            backend="torch", tau=0.0
        )
    for strategy in strategies.values():
        strategy.configure_fit(1, ndarrays_to_parameters(global_weights), manager)

    print(
        f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
        f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}"
    )
    if torch.cuda.is_available():
        print(f"gpu: {torch.cuda.get_device_name(0)}")
    print(
        f"{args.clients} clients x {num_values:,} values "
        f"(ResNet-18 state dict, {len(global_weights)} arrays); "
        f"stacked updates {stacked_bytes / 2**20:.0f} MiB"
    )
    timings = {name: timed(strategy, results, args.repeats) for name, strategy in strategies.items()}
    reference = timings["FedTrimmedAvg(beta=0.45)"][0]
    print(
        f"\n{'strategy':40} {'aggregate_fit s':>15} {'FedTrimmedAvg / this':>21} {'mask kept':>9} "
        f"{'peak extra MiB':>15} {'x stacked':>10}"
    )
    for name, strategy in strategies.items():
        seconds, metrics = timings[name]
        mask = f"{metrics['mask_fraction']:9.1%}" if "mask_fraction" in metrics else f"{'-':>9}"
        peak = peak_extra_bytes(strategy, results) if "GPU" not in name else float("nan")
        print(
            f"{name:40} {seconds:15.3f} {reference / seconds:20.1f}x {mask} "
            f"{peak / 2**20:15.0f} {peak / stacked_bytes:10.2f}"
        )


if __name__ == "__main__":
    main()
