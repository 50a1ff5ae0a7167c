"""Both strategy adapters on real Flower records: agreement, Flower baselines, bad input."""

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg, FedTrimmedAvg

import flwr_invariant.serverapp as message_api
from flwr_invariant import InvariantAggregation
from flwr_invariant.aggregate import invariant_update

from .helpers import Proxy, legacy_round, message_round, npy_bytes, reply_content

pytestmark = pytest.mark.usefixtures("task_identity")


def make_model(rng, num_clients=10):
    global_weights = [
        rng.standard_normal((8, 5)).astype(np.float32),
        rng.standard_normal(5).astype(np.float32),
        np.array(40, dtype=np.int64),  # like BatchNorm's num_batches_tracked
    ]
    clients = [
        [
            global_weights[0] + 0.1 * rng.standard_normal((8, 5)).astype(np.float32),
            global_weights[1] + 0.1 * rng.standard_normal(5).astype(np.float32),
            np.array(40 + i % 3, dtype=np.int64),
        ]
        for i in range(num_clients)
    ]
    return global_weights, clients


def run_both_apis(global_weights, clients, **kwargs):
    legacy_weights, legacy_metrics = legacy_round(
        InvariantAggregation(**kwargs), global_weights, [[npy_bytes(a) for a in c] for c in clients]
    )
    message_weights, message_metrics = message_round(
        message_api.InvariantAggregation(**kwargs), global_weights, [reply_content(c) for c in clients]
    )
    return (legacy_weights, legacy_metrics), (message_weights, message_metrics)


def test_both_apis_give_identical_weights_and_match_the_core():
    rng = np.random.default_rng(0)
    global_weights, clients = make_model(rng)
    kwargs = {"tau": 0.6, "trim_ratio": 0.45, "server_learning_rate": 0.7}
    (legacy, legacy_metrics), (message, message_metrics) = run_both_apis(global_weights, clients, **kwargs)
    expected, mask_fraction = invariant_update(global_weights, clients, **kwargs)
    for a, b, c in zip(legacy, message, expected, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
        assert a.dtype == c.dtype
    assert legacy[2] == 41  # integer array: lower median of 40, 41, 42 counts
    assert 0.0 < mask_fraction < 1.0
    for metrics in (legacy_metrics, dict(message_metrics)):
        assert metrics["mask_fraction"] == pytest.approx(mask_fraction)
        assert metrics["num_excluded"] == 0 and metrics["num_aggregated"] == 10
        assert metrics["trim_count"] == 4  # ceil(0.45 * 10) clamped to (10 - 1) // 2


def test_full_mask_equals_flowers_fedtrimmedavg():
    rng = np.random.default_rng(1)
    global_weights, clients = make_model(rng)
    global_weights, clients = global_weights[:2], [c[:2] for c in clients]
    tensors = [[npy_bytes(a) for a in c] for c in clients]
    ours, _ = legacy_round(InvariantAggregation(tau=0.0, trim_ratio=0.2), global_weights, tensors)
    flowers, _ = legacy_round(FedTrimmedAvg(beta=0.2), global_weights, tensors)  # int(0.2 * 10) == 2
    for a, b in zip(ours, flowers, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_no_mask_no_trim_equals_fedavg_with_equal_sample_counts():
    rng = np.random.default_rng(2)
    global_weights, clients = make_model(rng, num_clients=6)
    global_weights, clients = global_weights[:2], [c[:2] for c in clients]
    ours, _ = legacy_round(
        InvariantAggregation(tau=0.0, trim_ratio=0.0),
        global_weights,
        [[npy_bytes(a) for a in c] for c in clients],
    )
    flowers = FedAvg().aggregate_fit(
        1,
        [
            (Proxy(str(i)), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(c), 10, {}))
            for i, c in enumerate(clients)
        ],
        [],
    )[0]
    for a, b in zip(ours, parameters_to_ndarrays(flowers), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_fit_metrics_aggregation_sees_only_aggregated_clients():
    rng = np.random.default_rng(3)
    global_weights, clients = make_model(rng, num_clients=4)
    tensors = [[npy_bytes(a) for a in c] for c in clients]
    tensors[3][0] = npy_bytes(np.full((8, 5), np.nan, dtype=np.float32))
    seen = []
    strategy = InvariantAggregation(
        fit_metrics_aggregation_fn=lambda m: seen.extend(m) or {"clients": len(m)}
    )
    _, metrics = legacy_round(strategy, global_weights, tensors)
    assert metrics["clients"] == 3 and [loss["loss"] for _, loss in seen] == [0.0, 1.0, 2.0]


def bad_updates(global_weights):
    """(name, fault in reason, arrays) for each kind of bad update; arrays may be raw bytes."""
    layer0 = global_weights[0]
    nan = layer0.copy()
    nan[2, 3] = np.nan
    inf = layer0.copy()
    inf[0, 0] = -np.inf
    return [
        ("nan", "NaN or Inf", [nan, *global_weights[1:]]),
        ("inf", "NaN or Inf", [inf, *global_weights[1:]]),
        ("too few arrays", "arrays, the global model has 3", global_weights[:2]),
        ("too many arrays", "arrays, the global model has 3", [*global_weights, global_weights[1]]),
        ("wrong shape", "has shape (5, 8)", [layer0.T.copy(), *global_weights[1:]]),
        ("non-numeric", "non-numeric dtype", [np.full((8, 5), "x"), *global_weights[1:]]),
        (
            "object pickle",
            "Python objects",
            [np.array([None] * 40, dtype=object).reshape(8, 5), *global_weights[1:]],
        ),
        ("garbage bytes", "could not be decoded", [b"not an npy file", *global_weights[1:]]),
        ("float in int array", "dtype float64", [*global_weights[:2], np.array(40.0)]),
        ("overflow", "too large", [np.full((8, 5), 1e39), *global_weights[1:]]),
    ]


def as_bytes(array) -> bytes:
    return array if isinstance(array, bytes) else npy_bytes(array)


def as_array(array) -> Array:
    if isinstance(array, bytes):
        return Array(dtype="float32", shape=(8, 5), stype="numpy.ndarray", data=array)
    if array.dtype.kind in "OU":
        return Array(dtype=str(array.dtype), shape=array.shape, stype="numpy.ndarray", data=npy_bytes(array))
    return Array(array)


@pytest.mark.parametrize("case", range(10))
@pytest.mark.parametrize("api", ["legacy", "message"])
def test_bad_update_is_excluded_named_and_does_not_poison(case, api, flwr_logs):
    rng = np.random.default_rng(4)
    global_weights, clients = make_model(rng, num_clients=6)
    name, fault, bad = bad_updates(global_weights)[case]
    if api == "legacy":
        tensors = [[npy_bytes(a) for a in c] for c in clients] + [[as_bytes(a) for a in bad]]
        weights, metrics = legacy_round(InvariantAggregation(), global_weights, tensors)
        culprit = "client-6"
    else:
        contents = [reply_content(c) for c in clients] + [reply_content([as_array(a) for a in bad])]
        weights, metrics = message_round(message_api.InvariantAggregation(), global_weights, contents)
        culprit = "node 106"
    expected, _ = invariant_update(global_weights, clients, tau=0.6, trim_ratio=0.45)
    for a, b in zip(weights, expected, strict=True):
        np.testing.assert_array_equal(a, b)  # as if the bad client had not taken part
    assert metrics["num_excluded"] == 1 and metrics["num_aggregated"] == 6, name
    warnings = [r.getMessage() for r in flwr_logs.records if r.levelno == logging.WARNING]
    assert any(culprit in w and fault in w for w in warnings), (name, warnings)


@pytest.mark.parametrize("api", ["legacy", "message"])
def test_no_valid_update_keeps_the_global_model(api, flwr_logs):
    rng = np.random.default_rng(5)
    global_weights, _ = make_model(rng)
    nan = [np.full((8, 5), np.nan, dtype=np.float32), *global_weights[1:]]
    if api == "legacy":
        weights, metrics = legacy_round(
            InvariantAggregation(), global_weights, [[npy_bytes(a) for a in nan]] * 3
        )
    else:
        weights, metrics = message_round(
            message_api.InvariantAggregation(), global_weights, [reply_content(nan) for _ in range(3)]
        )
    assert weights is None  # Flower keeps the current global model
    assert metrics["num_excluded"] == 3 and metrics["num_aggregated"] == 0
    assert any("stays as it was" in r.getMessage() for r in flwr_logs.records)


def test_message_api_excludes_malformed_replies_and_counts_errors(flwr_logs):
    rng = np.random.default_rng(6)
    global_weights, clients = make_model(rng, num_clients=5)
    contents = [reply_content(c) for c in clients]
    no_weight = reply_content(clients[0])
    no_weight["metrics"] = MetricRecord({"loss": 1.0})
    renamed = RecordDict(
        {
            "arrays": ArrayRecord({f"w{i}": Array(a) for i, a in enumerate(clients[0])}),
            "metrics": MetricRecord({"num-examples": 3}),
        }
    )
    weights, metrics = message_round(
        message_api.InvariantAggregation(), global_weights, [*contents, no_weight, renamed], error_nodes=[999]
    )
    expected, _ = invariant_update(global_weights, clients, tau=0.6, trim_ratio=0.45)
    for a, b in zip(weights, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    assert metrics["num_excluded"] == 2 and metrics["num_failures"] == 1
    text = " ".join(r.getMessage() for r in flwr_logs.records)
    assert "node 105" in text and "'num-examples'" in text
    assert "node 106" in text and "lack the global model's keys" in text


def test_legacy_rejects_round_with_failures_when_not_accepted():
    rng = np.random.default_rng(7)
    global_weights, clients = make_model(rng, num_clients=3)
    weights, metrics = legacy_round(
        InvariantAggregation(accept_failures=False),
        global_weights,
        [[npy_bytes(a) for a in c] for c in clients],
        failures=[RuntimeError("lost")],
    )
    assert weights is None and metrics == {}


@pytest.mark.parametrize("cls", [InvariantAggregation, message_api.InvariantAggregation])
@pytest.mark.parametrize(
    ("kwargs", "allowed"),
    [
        ({"tau": -0.1}, "[0, 1]"),
        ({"tau": 1.01}, "[0, 1]"),
        ({"trim_ratio": -0.01}, "[0, 0.5)"),
        ({"trim_ratio": 0.5}, "[0, 0.5)"),
        ({"server_learning_rate": 0.0}, "> 0"),
        ({"backend": "cupy"}, "numpy, torch, auto"),
    ],
)
def test_invalid_settings_raise_with_the_allowed_range(cls, kwargs, allowed):
    with pytest.raises(ValueError) as error:
        cls(**kwargs)
    assert allowed in str(error.value) and next(iter(kwargs)) in str(error.value)


def test_repr_and_fedavg_keywords_pass_through():
    strategy = InvariantAggregation(tau=0.5, fraction_fit=0.2, min_fit_clients=3)
    assert repr(strategy) == (
        "InvariantAggregation(tau=0.5, trim_ratio=0.45, server_learning_rate=1.0, accept_failures=True)"
    )
    assert strategy.fraction_fit == 0.2 and strategy.num_fit_clients(100) == (20, 2)
    message_strategy = message_api.InvariantAggregation(fraction_train=0.5, min_train_nodes=4)
    assert message_strategy.fraction_train == 0.5 and message_strategy.min_train_nodes == 4


def test_batchnorm_statistics_take_the_median_in_both_apis():
    rng = np.random.default_rng(9)
    keys = ["conv.weight", "bn.running_mean", "bn.num_batches_tracked"]
    global_weights = [
        rng.standard_normal((4, 3)).astype(np.float32),
        np.zeros(3, dtype=np.float32),
        np.array(7, dtype=np.int64),
    ]
    clients = [
        [global_weights[0] + 0.1 * rng.standard_normal((4, 3)).astype(np.float32),
         np.float32([1.0, -2.0, 0.5]) * (i + 1), np.array(7 + i, dtype=np.int64)]
        for i in range(5)
    ]  # fmt: skip
    contents = [reply_content(c, keys=keys) for c in clients]
    message_weights, metrics = message_round(
        message_api.InvariantAggregation(), global_weights, contents, keys=keys
    )
    legacy_weights, _ = legacy_round(
        InvariantAggregation(median_indices=[1]), global_weights, [[npy_bytes(a) for a in c] for c in clients]
    )
    expected, mask_fraction = invariant_update(
        global_weights, clients, tau=0.6, trim_ratio=0.45, median_layers={1}
    )
    np.testing.assert_array_equal(expected[1], np.float32([3.0, -6.0, 1.5]))  # median of (i + 1) multiples
    for weights in (message_weights, legacy_weights):
        for got, want in zip(weights, expected, strict=True):
            np.testing.assert_array_equal(got, want)
    assert metrics["mask_fraction"] == pytest.approx(mask_fraction)  # over conv.weight alone


@pytest.mark.parametrize(
    "cls", [InvariantAggregation, message_api.InvariantAggregation], ids=["legacy", "message"]
)
def test_constructor_lists_its_own_parameters_and_names_a_wrong_keyword(cls) -> None:
    import inspect
    import pydoc

    from flwr_invariant.settings import DEFAULT_SERVER_LEARNING_RATE, DEFAULT_TAU, DEFAULT_TRIM_RATIO

    parameters = inspect.signature(cls).parameters
    defaults = {
        "tau": DEFAULT_TAU,
        "trim_ratio": DEFAULT_TRIM_RATIO,
        "server_learning_rate": DEFAULT_SERVER_LEARNING_RATE,
    }
    for name, default in defaults.items():
        assert parameters[name].default == default
        assert f"{name} : float (default: {default})" in cls.__doc__  # the docstring says the real default
    assert "tau: 'float' = 0.6" in pydoc.render_doc(cls)  # what help() shows
    with pytest.raises(
        TypeError, match=r"InvariantAggregation\(\) got unexpected keyword argument\(s\) 'tua'"
    ):
        cls(tua=0.7)
    with pytest.raises(ValueError, match=r"tau must be in \[0, 1\], got 1.5"):
        cls(tau=1.5)
    assert "tau=0.7" in repr(cls(tau=0.7))


BN_NAMES = [
    "conv.weight",
    "bn.weight",
    "bn.bias",
    "bn.running_mean",
    "bn.running_var",
    "bn.num_batches_tracked",
]


def batchnorm_model_round(rng: np.random.Generator, num_clients: int = 5):
    """Global arrays of a conv + BatchNorm model and client replies whose running statistics disagree in
    sign (the AND-mask would zero their step and freeze them)."""
    global_weights = [
        rng.standard_normal((4, 3)).astype(np.float32),
        np.ones(4, dtype=np.float32),
        np.zeros(4, dtype=np.float32),
        np.zeros(4, dtype=np.float32),
        np.ones(4, dtype=np.float32),
        np.array(7, dtype=np.int64),
    ]
    clients = []
    for i in range(num_clients):
        client = [w + rng.standard_normal(w.shape).astype(np.float32) * 0.1 for w in global_weights[:3]]
        client += [rng.standard_normal(4).astype(np.float32), rng.random(4).astype(np.float32) + 0.5]
        client.append(np.array(8 + i, dtype=np.int64))
        clients.append(client)
    return global_weights, clients


@pytest.mark.usefixtures("task_identity")
def test_legacy_api_with_array_names_equals_message_api_batchnorm_included() -> None:
    global_weights, clients = batchnorm_model_round(np.random.default_rng(3))
    legacy = InvariantAggregation(array_names=BN_NAMES)
    legacy_weights, legacy_metrics = legacy_round(
        legacy, global_weights, [[npy_bytes(a) for a in c] for c in clients]
    )
    message = message_api.InvariantAggregation()
    contents = [reply_content(c, keys=BN_NAMES) for c in clients]
    message_weights, _ = message_round(message, global_weights, contents, keys=BN_NAMES)
    for a, b in zip(legacy_weights, message_weights, strict=True):
        np.testing.assert_array_equal(a, b)
    for index in (3, 4):  # running statistics: the clients' median, never masked or frozen
        np.testing.assert_array_equal(legacy_weights[index], np.median([c[index] for c in clients], axis=0))
        assert not np.isclose(legacy_weights[index], global_weights[index]).any()
    assert legacy.median_indices == {3, 4}
    unnamed, _ = legacy_round(
        InvariantAggregation(), global_weights, [[npy_bytes(a) for a in c] for c in clients]
    )
    assert np.isclose(unnamed[3], global_weights[3]).any()  # without names some statistics stay frozen


def test_array_names_that_do_not_fit_the_model_fail_before_any_client_trains() -> None:
    global_weights, clients = batchnorm_model_round(np.random.default_rng(4))
    with pytest.raises(ValueError, match="array_names has 5 names, the global model has 6 arrays"):
        legacy_round(InvariantAggregation(array_names=BN_NAMES[:5]), global_weights, [])
    with pytest.raises(ValueError, match="array_names has 2 names, the global model has 6 arrays"):
        InvariantAggregation(
            array_names=BN_NAMES[:2], initial_parameters=ndarrays_to_parameters(global_weights)
        )


def test_tau_that_demands_unanimity_is_warned_about_once(flwr_logs) -> None:
    global_weights = [np.zeros(3, dtype=np.float32)]
    strategy = InvariantAggregation(tau=0.6)
    for _ in range(2):
        legacy_round(strategy, global_weights, [[npy_bytes(np.ones(3, dtype=np.float32))]] * 2)
    unique = {id(r): r for r in flwr_logs.records}.values()  # a record may reach caplog's handler twice
    warnings = [r.getMessage() for r in unique if "unanimity" in r.getMessage()]
    assert warnings == [
        "InvariantAggregation: with 2 clients, tau=0.6 keeps a coordinate only if all 2 agree on its sign "
        "(unanimity); tau <= 0.5 keeps coordinates most, but not all, agree on"
    ]
    legacy_round(
        InvariantAggregation(tau=0.6), global_weights, [[npy_bytes(np.ones(3, dtype=np.float32))]] * 5
    )
    unique = {id(r): r for r in flwr_logs.records}.values()
    assert len([r for r in unique if "unanimity" in r.getMessage()]) == 1  # 3 of 5 is no unanimity
