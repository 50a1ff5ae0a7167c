"""Fuzz both ``InvariantAggregation`` APIs with a seeded stream of hostile client updates.

Each case draws a global model (random layer shapes and dtypes, including 0-d,
empty and integer layers) and a set of clients. Every client is one *kind*:

* **valid** kinds must be aggregated: honest updates, odd but allowed dtypes
  (float64/float16/int/bool for a float layer), Fortran order, big-endian,
  huge but representable values (1e38 in float32, 1e300 in float64), zero or
  negative sample counts;
* **hostile** kinds must be excluded, named in a warning and counted in
  ``num_excluded``: NaN/Inf, values that overflow the layer's dtype, wrong
  shapes, wrong array counts, object/str/complex dtypes, wrong integer dtypes,
  garbage bytes, truncated or lying ``.npy`` headers, a wrong ``stype``, and
  (Message API only) wrong keys, missing ``MetricRecord``, a non-numeric
  sample count, two ``ArrayRecord`` s;
* **failures** (an error reply / a failure) must be counted in ``num_failures``.

Plus the corner cases: no client at all, every client failing, a single client.
For every case and both APIs it checks that aggregation does not raise, that
new weights (if any) are finite with the global shapes and dtypes, that the
metrics count exactly the hostile clients, that the warnings name exactly them,
and that both APIs produce identical weights. Prints the number of cases and
checks, and every failure (with the case's seed, to replay it).

    python -m benchmarks.robustness [--cases 500] [--seed 0] [--verbose]
"""

from __future__ import annotations

import argparse
import io
import logging
import re
import sys
import time
import traceback
from collections import Counter
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Parameters, Status
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.supercore.task_identity import TaskIdentity

import flwr_invariant.serverapp as message_api
from flwr_invariant import InvariantAggregation

__all__ = [
    "FAILURE",
    "HOSTILE_KINDS",
    "MESSAGE_ONLY_KINDS",
    "VALID_KINDS",
    "Case",
    "Report",
    "zero_sum_count_cases",
    "make_case",
    "run",
    "run_case",
]

VALID_KINDS = (
    "honest",
    "unchanged",  # exactly the global weights
    "float64_for_float32",
    "float16",
    "int_for_float",
    "bool_for_float",
    "fortran_order",
    "big_endian",
    "huge_finite",  # 1e38 in float32 layers, 1e300 in float64 layers
)
HOSTILE_KINDS = (
    "zero_examples",  # a non-positive sample count would break the round's weighted metrics
    "negative_examples",
    "nan",
    "inf",
    "overflow",  # float64 1e300 sent for a float32 layer
    "wrong_shape",
    "missing_array",
    "extra_array",
    "object_dtype",
    "str_dtype",
    "complex_dtype",
    "wrong_int_dtype",
    "garbage_bytes",
    "empty_bytes",
    "truncated",
    "lying_header",
    "wrong_stype",
)
MESSAGE_ONLY_KINDS = ("wrong_keys", "no_metrics", "weight_not_number", "two_array_records")
FAILURE = "failure"

_EXCLUDED = re.compile(r"round \d+: excluded the update of client (.+?): ")


def npy_bytes(array: np.ndarray) -> bytes:
    """``.npy`` serialisation as Flower does it (pickles allowed, so object arrays go through too)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


@dataclass
class Client:
    """One client's reply: per-array ``.npy`` bytes (or junk), keys, stype, sample count."""

    kind: str
    tensors: list[bytes]
    keys: list[str]
    stype: str = "numpy.ndarray"
    num_examples: Any = 10
    metrics: bool = True
    extra_record: bool = False


@dataclass
class Case:
    """A round's inputs: the global model, its keys and the clients."""

    seed: int
    global_weights: list[np.ndarray]
    keys: list[str]
    clients: list[Client]
    int_layers: list[int] = field(default_factory=list)

    def counts(self, message: bool) -> tuple[int, int, int]:
        """Expected (aggregated, excluded, failures) for one API."""
        kinds = [c.kind for c in self.clients if message or c.kind not in MESSAGE_ONLY_KINDS]
        failures = kinds.count(FAILURE)
        excluded = sum(kind in HOSTILE_KINDS or kind in MESSAGE_ONLY_KINDS for kind in kinds)
        return len(kinds) - failures - excluded, excluded, failures


def _random_global(rng: np.random.Generator) -> tuple[list[np.ndarray], list[int]]:
    layers: list[np.ndarray] = []
    for _ in range(int(rng.integers(1, 5))):
        ndim = int(rng.integers(0, 4))
        shape = tuple(int(s) for s in rng.integers(1, 5, size=ndim))
        dtype = np.float32 if rng.random() < 0.7 else np.float64
        layers.append((rng.standard_normal(shape) * 0.5).astype(dtype))
    if rng.random() < 0.3:
        layers.insert(int(rng.integers(0, len(layers) + 1)), np.zeros((0, 3), dtype=np.float32))
    int_layers = []
    if rng.random() < 0.3:
        layers.append(np.array(int(rng.integers(0, 100)), dtype=np.int64))  # like num_batches_tracked
        int_layers.append(len(layers) - 1)
    return layers, int_layers


def _target_layer(case_layers: list[np.ndarray], rng: np.random.Generator) -> int:
    """A non-empty floating layer (every global model has one)."""
    candidates = [i for i, w in enumerate(case_layers) if w.dtype.kind == "f" and w.size > 0]
    return int(rng.choice(candidates))


def _honest_arrays(global_weights: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    arrays = []
    for w in global_weights:
        if w.dtype.kind == "f":
            arrays.append(np.array(w + rng.standard_normal(w.shape) * 0.1, dtype=w.dtype))
        else:
            arrays.append(np.array(w + rng.integers(0, 3, size=w.shape), dtype=w.dtype))
    return arrays


def make_client(
    kind: str, global_weights: list[np.ndarray], rng: np.random.Generator, keys: list[str]
) -> Client:
    """A client of ``kind`` for ``global_weights`` (see the module docstring)."""
    arrays = _honest_arrays(global_weights, rng)
    target = _target_layer(global_weights, rng)
    client = Client(kind, [], list(keys))
    w = arrays[target]
    if kind == "unchanged":
        arrays = [g.copy() for g in global_weights]
    elif kind == "float64_for_float32":
        arrays = [a.astype(np.float64) if a.dtype.kind == "f" else a for a in arrays]
    elif kind == "float16":
        arrays[target] = w.astype(np.float16)
    elif kind == "int_for_float":
        arrays[target] = np.rint(w).astype(np.int32)
    elif kind == "bool_for_float":
        arrays[target] = w > 0
    elif kind == "fortran_order":
        arrays = [np.asfortranarray(a) if a.ndim else a for a in arrays]  # 0-d would become (1,)
    elif kind == "big_endian":
        arrays[target] = w.astype(w.dtype.newbyteorder(">"))
    elif kind == "huge_finite":
        w = w.copy()
        w.reshape(-1)[int(rng.integers(w.size))] = (1e38 if w.dtype == np.float32 else 1e300) * rng.choice(
            [-1, 1]
        )
        arrays[target] = w
    elif kind == "zero_examples":
        client.num_examples = 0
    elif kind == "negative_examples":
        client.num_examples = -5
    elif kind in ("nan", "inf"):
        w = w.copy()
        w.reshape(-1)[int(rng.integers(w.size))] = np.nan if kind == "nan" else rng.choice([np.inf, -np.inf])
        arrays[target] = w
    elif kind == "overflow":  # float64 1e300 for a float32 layer: |w - w_i| overflows float32
        small = [i for i, g in enumerate(global_weights) if g.dtype == np.float32 and g.size > 0]
        # (a float64 layer cannot overflow so: w - w_i stays finite for any finite w_i when |w| is small)
        layer = small[int(rng.integers(len(small)))] if small else target
        w = np.array(arrays[layer], dtype=np.float64)
        w.reshape(-1)[0] = 1e300 if small else np.nan
        arrays[layer] = w
    elif kind == "wrong_shape":
        arrays[target] = np.zeros((*w.shape, 2), dtype=w.dtype) if rng.random() < 0.5 else w.reshape(-1)[:0]
        if arrays[target].shape == global_weights[target].shape:  # a 1-element layer reshaped stays (1,)
            arrays[target] = np.zeros((w.size + 1,), dtype=w.dtype)
    elif kind == "missing_array":
        drop = int(rng.integers(len(arrays)))
        arrays.pop(drop)
        client.keys.pop(drop)
    elif kind == "extra_array":
        arrays.append(np.zeros(3, dtype=np.float32))
        client.keys.append("extra")
    elif kind == "object_dtype":
        arrays[target] = np.array([{"evil": 1}] * w.size, dtype=object).reshape(w.shape)
    elif kind == "str_dtype":
        arrays[target] = np.full(w.shape, "x", dtype="<U3")
    elif kind == "complex_dtype":
        arrays[target] = w.astype(np.complex64)
    elif kind == "wrong_int_dtype":
        if global_weights[-1].dtype.kind != "i":
            arrays[target] = np.full(w.shape, "nope", dtype="<U4")  # no integer layer: another non-numeric
        else:
            arrays[-1] = arrays[-1].astype(np.float64)
    client.tensors = [npy_bytes(a) for a in arrays]
    if kind == "garbage_bytes":
        client.tensors[target] = rng.bytes(int(rng.integers(1, 64)))
    elif kind == "empty_bytes":
        client.tensors[target] = b""
    elif kind == "truncated":
        data = client.tensors[target]
        header_end = len(data) - w.nbytes
        client.tensors[target] = data[: header_end + int(rng.integers(0, w.nbytes))]
    elif kind == "lying_header":  # a well-formed header that claims far more data than follows
        header = io.BytesIO()
        claimed = tuple(s * 1000 + 1 for s in w.shape) if w.ndim else (10**9,)
        np.lib.format.write_array_header_1_0(
            header, {"descr": np.lib.format.dtype_to_descr(w.dtype), "fortran_order": False, "shape": claimed}
        )
        client.tensors[target] = header.getvalue() + w.tobytes()
    elif kind == "wrong_stype":
        client.stype = "torch.Tensor"
    elif kind == "wrong_keys":
        client.keys = [f"{key}.renamed" for key in client.keys]
    elif kind == "no_metrics":
        client.metrics = False
    elif kind == "weight_not_number":
        client.num_examples = "ten"
    elif kind == "two_array_records":
        client.extra_record = True
    return client


def make_case(
    seed: int, num_clients: int | None = None, kinds: list[str] | None = None, skip: Collection[str] = ()
) -> Case:
    """Case ``seed``: a random global model and clients (random kinds, except ``skip``, unless ``kinds``)."""
    rng = np.random.default_rng([seed, 0xF022])
    global_weights, int_layers = _random_global(rng)
    keys = [f"layer{i}" for i in range(len(global_weights))]
    if kinds is None:
        count = int(rng.integers(0, 9)) if num_clients is None else num_clients
        pool = [k for k in (*VALID_KINDS, *HOSTILE_KINDS, *MESSAGE_ONLY_KINDS, FAILURE) if k not in skip]
        weights = np.array([4.0 if k == "honest" else 1.0 for k in pool])
        kinds = [str(k) for k in rng.choice(pool, size=count, p=weights / weights.sum())]
    clients = [
        Client(FAILURE, [], keys) if kind == FAILURE else make_client(kind, global_weights, rng, keys)
        for kind in kinds
    ]
    return Case(seed, global_weights, keys, clients, int_layers)


class _Proxy(ClientProxy):
    """Identity only: ``aggregate_fit`` reads nothing but ``cid``."""

    def get_properties(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def get_parameters(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def fit(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def reconnect(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


class _NodeList:
    """The part of a ``Grid`` that ``configure_train`` uses."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return self.node_ids


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def excluded(self) -> list[str]:
        return [m.group(1) for r in self.records if (m := _EXCLUDED.search(r.getMessage()))]


@contextmanager
def _quiet_flwr_logger() -> Iterator[_Collect]:
    """Collect the ``flwr`` logger's records instead of printing them."""
    logger = logging.getLogger("flwr")
    saved_handlers, saved_level, saved_propagate = logger.handlers[:], logger.level, logger.propagate
    collect = _Collect()
    logger.handlers[:] = [collect]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield collect
    finally:
        logger.handlers[:] = saved_handlers
        logger.setLevel(saved_level)
        logger.propagate = saved_propagate


@contextmanager
def task_identity() -> Iterator[None]:
    """Messages outside a running app need a run id (as inside a ServerApp)."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 1, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _legacy(case: Case) -> tuple[list[np.ndarray] | None, dict[str, Any], list[str], list[str]]:
    """aggregate_fit on the case; (weights, metrics, excluded labels logged, hostile labels)."""
    strategy = InvariantAggregation(min_fit_clients=1, min_evaluate_clients=1, min_available_clients=1)
    manager = SimpleClientManager()
    clients = [c for c in case.clients if c.kind not in MESSAGE_ONLY_KINDS]
    proxies = [_Proxy(f"client-{i}") for i in range(max(len(clients), 1))]
    for proxy in proxies:
        manager.register(proxy)
    strategy.configure_fit(
        1, Parameters([npy_bytes(w) for w in case.global_weights], "numpy.ndarray"), manager
    )
    results: list[tuple[ClientProxy, FitRes]] = []
    failures: list[Any] = []
    hostile = []
    for proxy, client in zip(proxies, clients, strict=False):
        if client.kind == FAILURE:
            failures.append(RuntimeError("client crashed"))
            continue
        if client.kind in HOSTILE_KINDS:
            hostile.append(proxy.cid)
        num_examples = client.num_examples if isinstance(client.num_examples, int) else 10
        params = Parameters(
            client.tensors, "numpy.ndarray" if client.stype == "numpy.ndarray" else client.stype
        )
        results.append((proxy, FitRes(Status(Code.OK, ""), params, num_examples, {"loss": 1.0})))
    with _quiet_flwr_logger() as logs:
        parameters, metrics = strategy.aggregate_fit(1, results, failures)
    weights = None if parameters is None else [_load(t) for t in parameters.tensors]
    return weights, dict(metrics), logs.excluded(), hostile


def _load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _message(case: Case) -> tuple[list[np.ndarray] | None, dict[str, Any] | None, list[str], list[str]]:
    """aggregate_train on the case; (weights, metrics, excluded labels logged, hostile labels)."""
    strategy = message_api.InvariantAggregation(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)
    node_ids = [100 + i for i in range(len(case.clients))]
    arrays = ArrayRecord(
        {
            key: Array(dtype=str(w.dtype), shape=tuple(w.shape), stype="numpy.ndarray", data=npy_bytes(w))
            for key, w in zip(case.keys, case.global_weights, strict=True)
        }
    )
    with task_identity():
        with _quiet_flwr_logger():
            strategy.configure_train(1, arrays, ConfigRecord({}), _NodeList(node_ids or [1]))
        replies = []
        hostile = []
        for node_id, client in zip(node_ids, case.clients, strict=True):
            instruction = Message(RecordDict({}), dst_node_id=node_id, message_type=MessageType.TRAIN)
            if client.kind == FAILURE:
                replies.append(Message(Error(code=1, reason="client crashed"), reply_to=instruction))
                continue
            if client.kind in HOSTILE_KINDS or client.kind in MESSAGE_ONLY_KINDS:
                hostile.append(f"node {node_id}")
            record = ArrayRecord(
                {
                    key: Array(dtype="float32", shape=(0,), stype=client.stype, data=data)
                    for key, data in zip(client.keys, client.tensors, strict=True)
                }
            )
            content: dict[str, Any] = {"arrays": record}
            if client.extra_record:
                content["more-arrays"] = record
            if client.metrics:
                content["metrics"] = MetricRecord({"num-examples": 10, "loss": 1.0})
                if client.num_examples != 10:
                    content["metrics"] = _metric_record_with(client.num_examples)
            replies.append(Message(RecordDict(content), reply_to=instruction))
        with _quiet_flwr_logger() as logs:
            new_arrays, metrics = strategy.aggregate_train(1, replies)
    weights = None if new_arrays is None else [new_arrays[key].numpy() for key in case.keys]
    return weights, (None if metrics is None else dict(metrics)), logs.excluded(), hostile


def _metric_record_with(num_examples: Any) -> MetricRecord:
    """A MetricRecord with sample count ``num_examples``; a non-number: the weight key is missing."""
    if isinstance(num_examples, int | float):
        return MetricRecord({"num-examples": num_examples, "loss": 1.0})
    return MetricRecord({"num-examples-text": 1, "loss": 1.0})  # the weight key is missing


@dataclass
class Report:
    """Outcome of a fuzzing run."""

    cases: int = 0
    checks: int = 0
    failures: list[str] = field(default_factory=list)
    kinds: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def check(self, condition: bool, message: str) -> None:
        self.checks += 1
        if not condition:
            self.failures.append(message)


def _check_weights(report: Report, case: Case, weights: list[np.ndarray] | None, api: str) -> None:
    if weights is None:
        return
    where = f"case {case.seed} [{api}]"
    report.check(len(weights) == len(case.global_weights), f"{where}: {len(weights)} arrays returned")
    for i, (new, old) in enumerate(zip(weights, case.global_weights, strict=False)):
        report.check(new.shape == old.shape, f"{where}: layer {i} shape {new.shape} != {old.shape}")
        report.check(new.dtype == old.dtype, f"{where}: layer {i} dtype {new.dtype} != {old.dtype}")
        if new.dtype.kind == "f":
            report.check(bool(np.isfinite(new).all()), f"{where}: layer {i} has non-finite weights")


def run_case(case: Case, report: Report) -> None:
    """Run ``case`` through both APIs and record every check in ``report``."""
    report.cases += 1
    report.kinds.update(c.kind for c in case.clients)
    outcomes: dict[str, list[np.ndarray] | None] = {}
    for api, runner in (("aggregate_fit", _legacy), ("aggregate_train", _message)):
        where = f"case {case.seed} [{api}] kinds={[c.kind for c in case.clients]}"
        try:
            weights, metrics, logged, hostile = runner(case)
        except Exception:  # noqa: BLE001 - any exception is a finding
            report.check(False, f"{where}: raised\n{traceback.format_exc()}")
            continue
        report.check(True, "")
        outcomes[api] = weights
        aggregated, excluded, failures = case.counts(message=api == "aggregate_train")
        _check_weights(report, case, weights, api)
        report.check(
            sorted(logged) == sorted(hostile), f"{where}: warnings named {logged}, hostile {hostile}"
        )
        if aggregated + excluded == 0:  # nothing answered: no new model, no metrics to speak of
            report.check(weights is None, f"{where}: new weights without any reply")
            continue
        report.check(metrics is not None, f"{where}: no metrics")
        metrics = metrics or {}
        got = (metrics.get("num_aggregated"), metrics.get("num_excluded"), metrics.get("num_failures"))
        report.check(
            got == (aggregated, excluded, failures),
            f"{where}: (aggregated, excluded, failures) = {got}, expected {(aggregated, excluded, failures)}",
        )
        if aggregated == 0:
            report.check(weights is None, f"{where}: new weights although no update was valid")
    if (
        len(outcomes) == 2
        and (a := outcomes["aggregate_fit"]) is not None
        and (b := outcomes["aggregate_train"])
    ):
        same = all(np.array_equal(x, y, equal_nan=True) for x, y in zip(a, b, strict=True))
        report.check(same, f"case {case.seed}: the two APIs gave different weights")
    elif len(outcomes) == 2:
        report.check(
            (outcomes["aggregate_fit"] is None) == (outcomes["aggregate_train"] is None),
            f"case {case.seed}: one API produced weights, the other did not",
        )


def corner_cases(seed: int, skip: Collection[str] = ()) -> list[Case]:
    """No client, only failures, a single honest / hostile client, every kind once."""
    every = [k for k in (*VALID_KINDS, *HOSTILE_KINDS, *MESSAGE_ONLY_KINDS, FAILURE) if k not in skip]
    cases = [
        make_case(seed, kinds=[]),
        make_case(seed + 1, kinds=[FAILURE, FAILURE, FAILURE]),
        make_case(seed + 2, kinds=["honest"]),
        make_case(seed + 3, kinds=["nan"]),
        make_case(seed + 4, kinds=["garbage_bytes", FAILURE]),
        make_case(seed + 5, kinds=["honest", *every]),
        make_case(seed + 6, kinds=["huge_finite"] * 6),
    ]
    if "negative_examples" not in skip:
        cases.append(make_case(seed + 7, kinds=["honest", "negative_examples"]))
    if "zero_examples" not in skip:
        cases.append(make_case(seed + 8, kinds=["zero_examples"] * 3))
    return cases


def zero_sum_count_cases() -> list[Case]:
    """Sample counts of the replies that sum to 0: all zero, or one client cancelling the other.

    Flower's default metrics average divides by that sum; such replies must be
    excluded instead of crashing the round.
    """
    cancel = make_case(7, kinds=["honest", "negative_examples"])
    cancel.clients[1].num_examples = -cancel.clients[0].num_examples
    return [make_case(8, kinds=["zero_examples"]), cancel]


def run(cases: int = 300, seed: int = 0, skip: Collection[str] = ()) -> Report:
    """Corner cases plus ``cases`` random ones from ``seed`` (no kind in ``skip``); the report."""
    report = Report()
    start = time.perf_counter()
    for case in corner_cases(seed * 1_000_003, skip):
        run_case(case, report)
    for index in range(cases):
        run_case(make_case(seed * 1_000_003 + 100 + index, skip=skip), report)
    report.seconds = time.perf_counter() - start
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=500, help="random cases (besides the corner cases)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="print every failure in full")
    args = parser.parse_args(argv)
    report = run(args.cases, args.seed)
    print(
        f"{report.cases} cases ({sum(report.kinds.values())} clients), {report.checks} checks, "
        f"{len(report.failures)} failures, {report.seconds:.1f} s"
    )
    print("clients per kind: " + ", ".join(f"{k}={n}" for k, n in sorted(report.kinds.items())))
    for failure in report.failures if args.verbose else report.failures[:20]:
        print("FAIL", failure)
    if len(report.failures) > 20 and not args.verbose:
        print(f"... and {len(report.failures) - 20} more (--verbose)")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
