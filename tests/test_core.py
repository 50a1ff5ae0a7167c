"""The reference algorithm and every engine against a plain per-coordinate reference, and the paper's
failure modes."""

import importlib.util
import sys
from fractions import Fraction
from functools import partial

import numpy as np
import pytest

from flwr_invariant.aggregate import (
    _middle_sum,
    and_mask,
    coordinate_median,
    invariant_aggregate,
    invariant_update,
    sign_consistency,
    trim_count,
    trimmed_mean,
)
from flwr_invariant.engines import chunked, middle_ranks, select_engine, torch_sort

#: Every ``invariant_aggregate`` implementation: the readable reference and the fast engine.
AGGREGATES = {"reference": invariant_aggregate, "chunked": chunked.invariant_aggregate}
#: Every engine by backend name (torch on the CPU here).
ENGINES = {
    "reference": invariant_update,
    "numpy": chunked.invariant_update,
    "torch": partial(torch_sort.invariant_update, device="cpu"),
}
needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="the torch engine needs the 'torch' extra"
)
needs_numba = pytest.mark.skipif(
    importlib.util.find_spec("numba") is None, reason="the compiled step needs the 'fast' extra"
)
#: The numpy engine's methods, the compiled one only where numba is installed.
METHOD_NAMES = [
    pytest.param(name, marks=[needs_numba] if name == "compiled" else []) for name in chunked.METHODS
]
ENGINE_NAMES = [pytest.param(name, marks=[needs_torch] if name == "torch" else []) for name in ENGINES]


def reference_trim(num_values: int, trim_ratio: float) -> int:
    return min(int(-(-Fraction(str(trim_ratio)) * num_values // 1)), (num_values - 1) // 2)


def reference_aggregate(values: np.ndarray, tau: float, trim_ratio: float) -> np.ndarray:
    """One coordinate at a time, with Python lists and exact fractions."""
    num_values = values.shape[0]
    trim = reference_trim(num_values, trim_ratio)
    flat = values.reshape(num_values, -1)
    out = np.zeros(flat.shape[1])
    for k in range(flat.shape[1]):
        column = sorted(float(v) for v in flat[:, k])
        votes = sum((v > 0) - (v < 0) for v in column)
        if Fraction(abs(votes), num_values) >= Fraction(str(tau)):
            kept = column[trim : num_values - trim]
            out[k] = sum(kept) / len(kept)
    return out.reshape(values.shape[1:])


def random_updates(rng: np.random.Generator, num_clients: int, shape: tuple) -> np.ndarray:
    """Continuous values with many exact zeros and repeated (tied) values."""
    values = rng.standard_normal((num_clients, *shape)).astype(np.float32)
    values[rng.random(values.shape) < 0.2] = 0.0
    ties = rng.random(values.shape) < 0.2
    values[ties] = rng.choice(np.float32([-0.5, 0.25, 1.0]), size=int(ties.sum()))
    return values


@pytest.mark.parametrize("num_clients", list(range(1, 51)))
def test_matches_reference_for_every_client_count(num_clients: int) -> None:
    rng = np.random.default_rng(num_clients)
    for tau, trim_ratio in [(0.6, 0.45), (0.0, 0.0), (1.0, 0.2), (0.3, 0.1), (0.5, 0.49)]:
        layers = [random_updates(rng, num_clients, shape) for shape in [(7, 3), (11,), ()]]
        pseudo_gradients = [[layer[i] for layer in layers] for i in range(num_clients)]
        for got in (
            invariant_aggregate(pseudo_gradients, tau, trim_ratio),
            *(
                chunked.invariant_aggregate(pseudo_gradients, tau, trim_ratio, chunk_bytes=256, method=method)
                for method in ("auto", "network", "sort")
            ),
        ):
            for layer, aggregate in zip(layers, got, strict=True):
                assert aggregate.dtype == np.float32 and aggregate.shape == layer.shape[1:]
                np.testing.assert_allclose(aggregate, reference_aggregate(layer, tau, trim_ratio), atol=1e-6)


def test_integer_valued_inputs_with_heavy_ties() -> None:
    rng = np.random.default_rng(7)
    for num_clients in (2, 3, 10, 20, 33):
        layer = rng.integers(-2, 3, size=(num_clients, 500)).astype(np.float32)
        for aggregate_fn in AGGREGATES.values():
            got = aggregate_fn([[row] for row in layer], 0.6, 0.45)[0]
            np.testing.assert_allclose(got, reference_aggregate(layer, 0.6, 0.45), atol=1e-6)


def test_sign_consistency_and_trimmed_mean_public_functions() -> None:
    rng = np.random.default_rng(3)
    stacked = random_updates(rng, 9, (4, 5))
    votes = np.array([[int(np.sign(stacked[:, i, j]).sum()) for j in range(5)] for i in range(4)])
    np.testing.assert_array_equal(sign_consistency(stacked), np.abs(votes) / 9)
    assert sign_consistency(np.zeros((4, 2))).tolist() == [0.0, 0.0]  # zeros are no vote
    expected = reference_aggregate(stacked, 0.0, 0.25)
    np.testing.assert_allclose(trimmed_mean(stacked, 0.25), expected, atol=1e-6)
    assert trimmed_mean(stacked, 0.25).shape == (4, 5)


def test_and_mask_is_the_mask_invariant_aggregate_applies() -> None:
    rng = np.random.default_rng(11)
    for num_clients, tau in ((20, 0.6), (20, 0.7), (7, 0.5), (5, 1.0)):
        stacked = rng.integers(-2, 3, size=(num_clients, 400)).astype(np.float32)
        kept = and_mask(stacked, tau)
        votes = np.abs(np.sign(stacked).sum(axis=0))
        np.testing.assert_array_equal(kept, votes / num_clients >= tau - 1e-12)
        aggregate = invariant_aggregate([[row] for row in stacked], tau, 0.45)[0]
        np.testing.assert_array_equal(aggregate, np.where(kept, trimmed_mean(stacked, 0.45), 0.0))
    assert not and_mask(np.zeros((4, 3)), 0.1).any()  # zeros are no vote


def test_trim_count_follows_the_design() -> None:
    assert trim_count(20, 0.45) == 9  # keeps 2 of 20, as the released code
    assert trim_count(10, 0.2) == 2
    assert trim_count(30, 0.1) == 3  # 0.1 * 30 is 3.0000000000000004 in floating point
    assert trim_count(11, 0.1) == 2  # ceil(1.1)
    assert trim_count(2, 0.45) == 0  # clamped to (N - 1) // 2
    assert trim_count(1, 0.4) == 0


def test_chunking_and_threads_do_not_change_the_result() -> None:
    rng = np.random.default_rng(11)
    clients = [[rng.standard_normal((64, 33)).astype(np.float32)] for _ in range(13)]
    base = chunked.invariant_aggregate(clients, 0.6, 0.45, num_threads=1, chunk_bytes=1 << 30)[0]
    for threads, chunk in [(1, 100), (2, 1000), (4, 52)]:
        other = chunked.invariant_aggregate(clients, 0.6, 0.45, num_threads=threads, chunk_bytes=chunk)[0]
        np.testing.assert_array_equal(base, other)
    np.testing.assert_array_equal(base, invariant_aggregate(clients, 0.6, 0.45)[0])  # = the reference


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_invariant_update_steps_from_global_weights_and_medians_integer_arrays(engine: str) -> None:
    rng = np.random.default_rng(5)
    global_weights = [rng.standard_normal((6, 4)).astype(np.float32), np.array(7, dtype=np.int64)]
    clients = [
        [global_weights[0] + rng.standard_normal((6, 4)).astype(np.float32), np.array(c, dtype=np.int64)]
        for c in (9, 3, 8, 100, 8)
    ]
    snapshot = [[a.copy() for a in c] for c in clients]
    weights, mask_fraction = ENGINES[engine](
        global_weights, clients, tau=0.6, trim_ratio=0.2, server_learning_rate=0.5
    )
    pseudo = np.stack([global_weights[0] - c[0] for c in clients])
    aggregate = reference_aggregate(pseudo, 0.6, 0.2)
    np.testing.assert_allclose(weights[0], global_weights[0] - 0.5 * aggregate, atol=1e-6)
    assert weights[0].dtype == np.float32
    assert (
        isinstance(weights[1], np.ndarray) and weights[1].dtype == np.int64 and int(weights[1]) == 8
    )  # lower median of 3,8,8,9,100
    kept = np.count_nonzero(np.abs(np.sign(pseudo).sum(0)) / 5 >= 0.6)
    assert mask_fraction == pytest.approx(kept / 24)
    for before, after in zip(snapshot, clients, strict=True):
        for a, b in zip(before, after, strict=True):
            np.testing.assert_array_equal(a, b)  # inputs untouched


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_full_mask_equals_trimmed_mean_of_returned_weights(engine: str) -> None:
    rng = np.random.default_rng(8)
    global_weights = [rng.standard_normal(50).astype(np.float32)]
    clients = [[rng.standard_normal(50).astype(np.float32)] for _ in range(10)]
    weights, mask_fraction = ENGINES[engine](global_weights, clients, tau=0.0, trim_ratio=0.2)
    expected = trimmed_mean(np.stack([c[0] for c in clients]), 0.2)
    np.testing.assert_allclose(weights[0], expected, atol=1e-5)
    assert mask_fraction == 1.0


def test_coordinate_median_returns_input_values() -> None:
    stacked = np.array([[1, 5], [4, 2], [3, 3], [10, 0]], dtype=np.int64)
    np.testing.assert_array_equal(coordinate_median(stacked), [3, 2])


@needs_torch
def test_torch_backend_matches_numpy_backend() -> None:
    rng = np.random.default_rng(21)
    global_weights = [rng.standard_normal((40, 9)).astype(np.float32), np.array([3, 4], dtype=np.int64)]
    clients = [
        [global_weights[0] - random_updates(rng, 1, (40, 9))[0], np.array([3, i], dtype=np.int64)]
        for i in range(17)
    ]
    kwargs = {"tau": 0.6, "trim_ratio": 0.3, "server_learning_rate": 1.0}
    numpy_weights, numpy_mask = chunked.invariant_update(global_weights, clients, **kwargs)
    torch_weights, torch_mask = torch_sort.invariant_update(global_weights, clients, device="cpu", **kwargs)
    np.testing.assert_allclose(numpy_weights[0], torch_weights[0], atol=1e-6)
    np.testing.assert_array_equal(numpy_weights[1], torch_weights[1])
    assert numpy_mask == torch_mask


# Paper Sec. 4.1 / Fig. 1. Ten clients, two of them malicious; two coordinates.
# Coordinate 0 (failure mode 1): all benign clients agree (+0.1) and the two
#   malicious ones are huge outliers (-10). Sign consistency |8 - 2| / 10 = 0.6
#   passes the mask, so the AND-mask with a plain mean follows the outliers.
# Coordinate 1 (failure mode 2): benign clients disagree (4 x +0.1, 4 x -0.1),
#   the malicious ones push a moderate +0.2; trimming two values per tail
#   (trim_ratio 0.2) removes the outliers of coordinate 0 but leaves the
#   trimmed mean of coordinate 1 with the malicious sign.
FAILURE_MODES = np.array(
    [[0.1, 0.1]] * 4 + [[0.1, -0.1]] * 4 + [[-10.0, 0.2]] * 2,
    dtype=np.float32,
)
MALICIOUS_SIGN = np.array([-1.0, 1.0])


@pytest.mark.parametrize("invariant_aggregate", AGGREGATES.values(), ids=AGGREGATES)
def test_and_mask_alone_fails_on_outliers_where_benign_signs_agree(invariant_aggregate) -> None:
    and_mask_only = invariant_aggregate([[row] for row in FAILURE_MODES], 0.6, trim_ratio=0.0)[0]
    assert np.sign(and_mask_only[0]) == MALICIOUS_SIGN[0]


@pytest.mark.parametrize("invariant_aggregate", AGGREGATES.values(), ids=AGGREGATES)
def test_trimmed_mean_alone_fails_where_benign_signs_disagree(invariant_aggregate) -> None:
    trimmed_only = invariant_aggregate([[row] for row in FAILURE_MODES], 0.0, trim_ratio=0.2)[0]
    assert np.sign(trimmed_only[0]) == 1.0  # the trimmed mean handles the outliers
    assert np.sign(trimmed_only[1]) == MALICIOUS_SIGN[1]


@pytest.mark.parametrize("invariant_aggregate", AGGREGATES.values(), ids=AGGREGATES)
def test_invariant_aggregation_gets_both_coordinates_right(invariant_aggregate) -> None:
    combined = invariant_aggregate([[row] for row in FAILURE_MODES], 0.6, trim_ratio=0.2)[0]
    assert np.sign(combined[0]) == 1.0  # the benign consensus survives the outliers
    assert combined[1] == 0.0  # no benign consensus: masked, the attacker gains nothing


def assert_bit_equal(got: np.ndarray, expected: np.ndarray) -> None:
    """Same dtype, shape and bytes (so ``-0.0`` differs from ``0.0``)."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(
        np.ascontiguousarray(got).reshape(-1).view(np.uint8),
        np.ascontiguousarray(expected).reshape(-1).view(np.uint8),
    )


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("num_clients", [20, 50, 100])
def test_fast_engine_equals_the_reference_bit_for_bit(num_clients: int, method: str) -> None:
    """Same values summed in the same order: identical weights with ties and zeros, no trimming,
    float64 updates of a float32 layer, and median (BatchNorm-style and integer) layers."""
    rng = np.random.default_rng(num_clients)
    global_weights = [
        rng.standard_normal((30, 7)).astype(np.float32),
        rng.standard_normal(12).astype(np.float32),  # a "running statistic": median
        np.array(5, dtype=np.int64),
        rng.standard_normal(9).astype(np.float32),  # updated in float64 by the clients
        np.zeros(4, dtype=np.float32),  # the global value -0.0 and +0.0 updates give -0.0 steps
    ]
    global_weights[4][:2] = -0.0
    clients = [
        [
            global_weights[0] - random_updates(rng, 1, (30, 7))[0],
            rng.standard_normal(12).astype(np.float32),
            np.array(int(rng.integers(0, 9)), dtype=np.int64),
            global_weights[3] + 1e-9 * rng.standard_normal(9),
            np.zeros(4, dtype=np.float32),
        ]
        for _ in range(num_clients)
    ]
    for tau, trim_ratio in [(0.0, 0.45), (0.6, 0.45), (0.9, 0.45), (0.6, 0.1), (0.3, 0.0)]:
        kwargs = {"tau": tau, "trim_ratio": trim_ratio, "server_learning_rate": 0.7, "median_layers": {1}}
        expected, expected_mask = invariant_update(global_weights, clients, **kwargs)
        got, mask = chunked.invariant_update(
            global_weights, clients, chunk_bytes=4096, num_threads=2, method=method, **kwargs
        )
        assert mask == expected_mask
        for a, b in zip(got, expected, strict=True):
            assert_bit_equal(a, b)


@pytest.mark.parametrize("num_clients", [20, 50, 100])
def test_middle_rank_sums_equal_the_reference(num_clients: int) -> None:
    """Both selection methods add the same middle values in the same order as the reference."""
    rng = np.random.default_rng(num_clients + 1)
    values = random_updates(rng, num_clients, (257,))
    for trim in (0, 1, trim_count(num_clients, 0.45)):
        expected = _middle_sum(values, trim)
        scratch, total = np.empty(257, np.float32), np.empty(257)
        assert_bit_equal(middle_ranks.network_middle_sum(list(values.copy()), trim, scratch, total), expected)
        columns = np.ascontiguousarray(values.T)
        assert_bit_equal(middle_ranks.sorted_middle_sum(columns, trim, np.empty(257)), expected)
    assert not middle_ranks.use_sort(10, 5) and middle_ranks.use_sort(20, 9) and middle_ranks.use_sort(5, 0)
    with pytest.raises(ValueError, match="method must be one of"):
        chunked.invariant_update([values[0]], [[values[0]]], tau=0.6, trim_ratio=0.45, method="heap")


def test_compiled_method_without_numba_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "numba", None)  # what an install without the extra looks like
    weights = [np.zeros(3, dtype=np.float32)]
    with pytest.raises(ImportError, match=r"pip install 'flwr-invariant\[fast\]'"):
        chunked.invariant_update(weights, [weights], tau=0.6, trim_ratio=0.45, method="compiled")


def test_select_engine_by_backend_name() -> None:
    assert select_engine("reference") is invariant_update
    assert select_engine("numpy", num_threads=2).keywords == {"num_threads": 2}
    with pytest.raises(ValueError, match="backend must be one of"):
        select_engine("cuda")


def test_torch_backend_without_torch_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # what an install without the extra looks like
    with pytest.raises(ImportError, match=r"pip install 'flwr-invariant\[torch\]'"):
        select_engine("torch")
    assert select_engine("auto").func is chunked.invariant_update  # no torch, no GPU: numpy


@needs_torch
def test_select_torch_engine() -> None:
    assert select_engine("torch") is torch_sort.invariant_update
