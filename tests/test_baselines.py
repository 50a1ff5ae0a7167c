"""Every baseline on small inputs whose right answer is known by hand, through real Flower records."""

import importlib.metadata
import importlib.util
import logging

import numpy as np
import pytest

import baselines
from baselines.alignins import alignins_admitted, masked_principal_sign_alignment, median_z_scores
from baselines.common import clip_rows, pairwise_distances
from baselines.crfl import crfl_certified_radius, crfl_clip_bound, crfl_contraction, crfl_vote_bounds
from baselines.deepsight import (
    deepsight_accepted,
    division_differences,
    normalized_energy_updates,
    output_layer,
    threshold_exceedings,
)
from baselines.flain import flip_low_activation_updates, rescale_to_norm
from baselines.flame import flame_admitted, flame_step
from baselines.fltrust import fltrust_step
from baselines.foolsgold import foolsgold_weights
from baselines.krum import krum_scores, select_multi_krum
from baselines.multi_metrics import multi_metrics_features, multi_metrics_scores
from baselines.rfa import geometric_median
from baselines.robust_lr import robust_learning_rates
from baselines.signsgd import majority_vote
from baselines.sparsefed import SparseFed, top_k_indices

from .helpers import message_round, reply_content

pytestmark = pytest.mark.usefixtures("task_identity")
# Flower's own FedMedian / FedTrimmedAvg / Bulyan fail on 0-d arrays (GLOBAL[1], like BatchNorm's
# num_batches_tracked) before flwr 1.28, a Flower bug fixed there; the plugin itself is unaffected.
FLOWER_VERSION = tuple(int(part) for part in importlib.metadata.version("flwr").split(".")[:2])
flower_zero_d_bug = pytest.mark.xfail(
    FLOWER_VERSION < (1, 28), raises=TypeError, strict=True, reason="Flower < 1.28 fails on 0-d arrays"
)
FLOWER_ZERO_D_BUG = {"median", "trimmed-mean", "krum-trimmed-mean"}


#: Defenses that need the server's model work (root-dataset training, outputs on random inputs):
#: tested on a classifier with stand-ins for it.
NEEDS_SERVER_MODEL = {"fltrust", "deepsight"}


def marks_for(name: str) -> list:
    """The marks of defense ``name`` in the tests that run every defense."""
    return [needs_sklearn] * (name == "flame") + [flower_zero_d_bug] * (name in FLOWER_ZERO_D_BUG)


needs_sklearn = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None, reason="FLAME needs scikit-learn (the 'simulation' extra)"
)

GLOBAL = [np.zeros(3, dtype=np.float32), np.array(5, dtype=np.int64)]


def run(name, client_vectors, config=None, **kwargs):
    """One Message API round of defense ``name``; clients return ``GLOBAL - g`` for each g."""
    cls, defaults = baselines.DEFENSES[name]({"clients-per-round": len(client_vectors), **(config or {})})
    strategy = cls(**{**defaults, **kwargs})
    contents = [reply_content([np.asarray(GLOBAL[0] - np.float32(g)), GLOBAL[1]]) for g in client_vectors]
    weights, metrics = message_round(strategy, GLOBAL, contents)
    return (None if weights is None else GLOBAL[0] - weights[0]), metrics, strategy


HONEST = [[1.0, 1.0, 0.0], [1.1, 0.9, 0.1], [0.9, 1.1, -0.1], [1.0, 1.05, 0.05], [1.05, 0.95, 0.0]]
OUTLIER = [[-30.0, 40.0, 50.0]]


def test_registry_names_every_defense_of_the_issue():
    assert set(baselines.defense_names()) == {
        "fedavg", "invariant", "krum", "multi-krum", "multi-krum-cosine", "trimmed-mean", "median",
        "krum-trimmed-mean", "sign-sgd", "weak-dp", "foolsgold", "rfa", "sparsefed", "flame", "flain",
        "robust-lr", "invariant-collusion", "invariant-soft-margin", "invariant-memory",
        "invariant-bloc-exclusion", "invariant-departure-exclusion", "invariant-busy-bloc-exclusion",
        "invariant-busy-departure-exclusion", "invariant-persistent-departure-exclusion",
        "invariant-cross-round-departure-exclusion", "invariant-record-departure-exclusion",
        "invariant-record-partial-exclusion", "invariant-record-repeat-exclusion",
        "fltrust", "deepsight", "alignins", "crfl", "multi-metrics",
    }  # fmt: skip
    _, collusion = baselines.DEFENSES["invariant-collusion"]({"tau": 0.7})
    assert collusion["mask_rule"] == "collusion" and collusion["tau"] == 0.7
    assert baselines.assumed_malicious({"malicious-fraction": 0.2, "clients-per-round": 20}) == 4
    assert baselines.assumed_malicious({"assumed-malicious": 1, "clients-per-round": 20}) == 1
    _, bulyan = baselines.DEFENSES["krum-trimmed-mean"]({"malicious-fraction": 0.2, "clients-per-round": 10})
    assert bulyan["num_malicious_nodes"] == 1  # f = 2 would need 11 replies; the largest that fits


def test_pairwise_distances_squared_euclidean_and_cosine():
    vectors = np.array([[3.0, 4.0], [0.0, 0.0], [-6.0, -8.0]])
    np.testing.assert_allclose(
        pairwise_distances(vectors, "euclidean"), [[0, 25, 225], [25, 0, 100], [225, 100, 0]]
    )
    # a zero row has similarity 0 to everything (distance 1), itself included
    np.testing.assert_allclose(
        pairwise_distances(vectors, "cosine"), [[0, 1, 2], [1, 1, 1], [2, 1, 0]], atol=1e-12
    )
    with pytest.raises(ValueError, match="metric"):
        pairwise_distances(vectors, "manhattan")


def test_krum_picks_the_update_with_the_smallest_score():
    vectors = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [10.0, 10.0]])
    # f = 1: each score sums squared distances to the N - f - 2 = 2 nearest others.
    scores = krum_scores(vectors, num_malicious=1)
    np.testing.assert_allclose(scores[3], 0.5 + 0.5)  # (0.5, 0.5) is 0.5 from three points
    assert select_multi_krum(vectors, 1, 1)[0] == 3
    step, metrics, _ = run("krum", [*HONEST, *OUTLIER], {"assumed-malicious": 1})
    chosen = int(np.argmin(krum_scores(np.array([*HONEST, *OUTLIER]), 1)))
    np.testing.assert_allclose(step, HONEST[chosen], atol=1e-6)


def test_multi_krum_excludes_the_outlier_euclidean_and_cosine():
    for name in ("multi-krum", "multi-krum-cosine"):
        step, _, _ = run(name, [*HONEST, *OUTLIER], {"assumed-malicious": 1})
        np.testing.assert_allclose(step, np.mean(HONEST, axis=0), atol=1e-5)
    # Cosine ignores scale: a scaled honest direction is kept, an opposite one is not.
    vectors = np.array([[1.0, 0.0], [2.0, 0.1], [5.0, -0.1], [-1.0, 0.0]])
    assert 3 not in select_multi_krum(vectors, 1, 3, metric="cosine")


@flower_zero_d_bug
def test_trimmed_mean_and_median():
    step, _, _ = run("trimmed-mean", [*HONEST, *OUTLIER])  # beta 0.2 of 6: int(1.2) = 1 per tail
    expected = np.sort(np.array([*HONEST, *OUTLIER]), axis=0)[1:5].mean(axis=0)
    np.testing.assert_allclose(step, expected, atol=1e-6)
    step, _, _ = run("median", [[1.0, 5.0, 0.0], [2.0, 4.0, 0.0], [30.0, -9.0, 0.0]])
    np.testing.assert_allclose(step, [2.0, 4.0, 0.0])


@flower_zero_d_bug
def test_krum_trimmed_mean_drops_the_outlier():
    clients = [[float(v), 0.0, 0.0] for v in (1, 2, 3, 4, 5, 6)] + [[100.0, 0.0, 0.0]]
    step, _, _ = run("krum-trimmed-mean", clients, {"assumed-malicious": 1})  # N = 7 = 4f + 3
    assert 2.0 <= step[0] <= 5.0


def test_sign_sgd_majority_vote():
    vectors = np.array([[0.5, -2.0, 0.0], [3.0, -0.1, 1.0], [-100.0, 1.0, -1.0]])
    np.testing.assert_array_equal(majority_vote(vectors), [1.0, -1.0, 0.0])
    step, _, _ = run("sign-sgd", vectors)
    np.testing.assert_allclose(step, [1e-3, -1e-3, 0.0], atol=1e-9)


def test_weak_dp_clips_each_update_to_the_norm_bound():
    clients = [[3.0, 4.0, 0.0], [0.3, 0.4, 0.0], [0.0, 0.0, 0.0]]  # norms 5, 0.5, 0
    step, _, _ = run("weak-dp", clients, clipping_norm=1.0, noise_std=0.0)
    np.testing.assert_allclose(step, (np.array([0.6, 0.8, 0]) + np.array([0.3, 0.4, 0])) / 3, atol=1e-6)
    noisy, _, _ = run("weak-dp", clients, clipping_norm=1.0, noise_std=0.5)
    assert not np.allclose(noisy, step)


def test_foolsgold_down_weights_colluding_identical_updates():
    sybil = [0.0, 0.0, 1.0]
    histories = np.array([[1.0, 0.1, 0.0], [0.1, 1.0, 0.0], [-1.0, 0.0, 0.1], sybil, sybil, sybil])
    weights = foolsgold_weights(histories)
    assert np.all(weights[3:] == 0.0)
    assert np.all(weights[:3] > 0.5)
    step, metrics, strategy = run("foolsgold", [h.tolist() for h in histories], history_layer=0)
    np.testing.assert_allclose(step, (weights[:3] / weights[:3].sum()) @ histories[:3], atol=1e-6)
    assert len(strategy.histories) == 6  # one history per node id


def test_rfa_geometric_median_resists_an_outlier():
    collinear = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    median, _ = geometric_median(collinear, max_iterations=200, tolerance=0.0)
    np.testing.assert_allclose(median, [1.0, 0.0], atol=1e-3)
    step, metrics, _ = run("rfa", [*HONEST, *OUTLIER])
    assert (
        np.linalg.norm(step - np.mean(HONEST, axis=0)) < 1.0 < np.linalg.norm(np.mean([*HONEST, *OUTLIER], 0))
    )
    assert 1 <= metrics["weiszfeld_iterations"] <= 4


def test_sparsefed_applies_top_k_and_keeps_the_rest_for_later():
    np.testing.assert_allclose(
        np.linalg.norm(clip_rows(np.array([[3.0, 4.0], [0.3, 0.4]]), 1.0), axis=1), [1, 0.5]
    )
    assert set(top_k_indices(np.array([0.1, -5.0, 2.0]), 2).tolist()) == {1, 2}
    strategy_kwargs = {"clipping_norm": 100.0, "top_k_fraction": 1 / 3}
    step, _, strategy = run("sparsefed", [[3.0, 1.0, 0.5], [3.0, 1.0, 0.5]], **strategy_kwargs)
    np.testing.assert_allclose(step, [3.0, 0.0, 0.0])
    np.testing.assert_allclose(strategy.error_feedback, [0.0, 1.0, 0.5])
    mean = np.array([0.0, 1.0, 0.5], dtype=np.float32)
    step, _ = SparseFed.server_step(strategy, _round_updates(np.stack([mean, mean])))
    np.testing.assert_allclose(step, [0.0, 2.0, 0.0])  # 1 carried over + 1 new


# 4 clients x 5 coordinates; net sign votes 4, 1 (a zero abstains), -2, 0 (tie), 0 (all zero).
RLR_CLIENTS = [
    [1.0, 2.0, -1.0, 1.0, 0.0],
    [2.0, 1.0, -2.0, -1.0, 0.0],
    [1.0, -1.0, -1.0, 1.0, 0.0],
    [1.0, 0.0, 3.0, -1.0, 0.0],
]
RLR_EXAMPLES = [10, 20, 30, 40]  # weights 0.1, 0.2, 0.3, 0.4


def test_robust_learning_rates_flip_below_the_threshold():
    clients = np.array(RLR_CLIENTS, dtype=np.float32)
    np.testing.assert_array_equal(robust_learning_rates(clients, 0), [1, 1, 1, 1, 1])
    np.testing.assert_array_equal(robust_learning_rates(clients, 1), [1, 1, 1, -1, -1])
    np.testing.assert_array_equal(robust_learning_rates(clients, 2, 0.5), [0.5, -0.5, 0.5, -0.5, -0.5])
    np.testing.assert_array_equal(robust_learning_rates(clients, 3), [1, -1, -1, -1, -1])
    np.testing.assert_array_equal(robust_learning_rates(clients, 5), [-1, -1, -1, -1, -1])
    cls, robust = baselines.DEFENSES["robust-lr"]({"malicious-fraction": 0.2, "clients-per-round": 10})
    assert robust["threshold"] == 3  # f + 1
    with pytest.raises(ValueError, match="threshold"):
        cls(threshold=-1)
    _, robust = baselines.DEFENSES["robust-lr"]({"assumed-malicious": 4, "clients-per-round": 4})
    assert robust["threshold"] == 4  # at most every client


@pytest.mark.parametrize(
    ("assumed", "expected", "flipped"),
    [
        # Weighted means 1.2, 0.1, 0.4, -0.2, 0. theta = 2: votes 4 and |-2| pass; 1, 0, 0 flip.
        (1, [1.2, -0.1, 0.4, 0.2, 0.0], 3 / 5),
        # theta = 3: |-2| flips too.
        (2, [1.2, -0.1, -0.4, 0.2, 0.0], 4 / 5),
    ],
)
def test_robust_lr_step_by_hand_and_a_nan_reply_casts_no_vote(assumed, expected, flipped):
    global_weights = [np.zeros(5, dtype=np.float32), GLOBAL[1]]
    contents = [  # client i returns w - g_i = -g_i; the NaN reply would outweigh them all
        reply_content([-np.float32(g), GLOBAL[1]], num_examples=n)
        for g, n in zip(RLR_CLIENTS, RLR_EXAMPLES, strict=True)
    ]
    contents.append(reply_content([np.full(5, np.nan, dtype=np.float32), GLOBAL[1]], num_examples=1000))
    cls, kwargs = baselines.DEFENSES["robust-lr"]({"clients-per-round": 5, "assumed-malicious": assumed})
    weights, metrics = message_round(cls(**kwargs), global_weights, contents)
    np.testing.assert_allclose(-weights[0], expected, atol=1e-6)
    assert metrics["num_excluded"] == 1 and metrics["num_aggregated"] == 4
    assert metrics["robust_lr_flipped_fraction"] == pytest.approx(flipped)
    assert weights[1] == GLOBAL[1]


def _round_updates(pseudo_gradients):
    from baselines.numpy_strategy import RoundUpdates

    size = pseudo_gradients.shape[1]
    return RoundUpdates(2, pseudo_gradients, [1, 2], np.ones(2), [slice(0, size)], [(size,)], np.zeros(size))


@needs_sklearn
def test_flame_clusters_away_an_outlier_group_and_clips_to_the_median_norm():
    rng = np.random.default_rng(0)
    benign = np.array([1.0, 1.0, 0.0, 0.0]) + 0.05 * rng.standard_normal((6, 4))
    attackers = np.array([-1.0, 0.0, 3.0, 3.0]) + 0.05 * rng.standard_normal((3, 4))
    updates = np.vstack([benign, attackers]).astype(np.float32)
    assert set(flame_admitted(updates).tolist()) == set(range(6))
    step, admitted, bound = flame_step(updates, np.zeros(4, dtype=np.float32), 0.0, rng)
    assert bound == pytest.approx(np.median(np.linalg.norm(updates, axis=1)))
    scales = np.minimum(1.0, bound / np.linalg.norm(benign, axis=1))
    np.testing.assert_allclose(step, (scales[:, None] * benign).mean(axis=0), atol=1e-5)
    step, metrics, _ = run("flame", [*HONEST, *HONEST[:2], *OUTLIER * 2])
    assert 5 <= metrics["num_admitted"] <= 7  # HDBSCAN may also leave out a benign straggler
    assert np.linalg.norm(step - np.array([1.0, 1.0, 0.0])) < 0.2  # the outliers never enter


def test_flain_flips_low_activation_columns_and_keeps_the_norm():
    initial = np.zeros((2, 3), dtype=np.float32)
    final = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=np.float32)
    flipped, count = flip_low_activation_updates(initial, final, np.array([0.0, 0.5, 0.0005]), 0.001)
    np.testing.assert_array_equal(flipped, [[-1.0, 2.0, -3.0], [-4.0, 5.0, -6.0]])
    assert count == 2
    assert np.linalg.norm(rescale_to_norm(flipped * 3, float(np.linalg.norm(final)))) == pytest.approx(
        np.linalg.norm(final)
    )


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            n, marks=[needs_sklearn] * (n == "flame") + [flower_zero_d_bug] * (n in FLOWER_ZERO_D_BUG)
        )
        for n in sorted(set(baselines.DEFENSES) - NEEDS_SERVER_MODEL)
    ],
)
def test_every_defense_excludes_a_nan_update_and_survives(name, flwr_logs):
    clients = [*HONEST, *HONEST[:2]]
    contents = [reply_content([GLOBAL[0] - np.float32(g), GLOBAL[1]]) for g in clients]
    contents.append(reply_content([np.full(3, np.nan, dtype=np.float32), GLOBAL[1]]))
    cls, kwargs = baselines.DEFENSES[name]({"clients-per-round": 8, "assumed-malicious": 1})
    weights, metrics = message_round(cls(**kwargs), GLOBAL, contents)
    assert metrics["num_excluded"] == 1
    assert weights is not None and np.isfinite(weights[0]).all()
    assert any("node 107" in r.getMessage() and "NaN" in r.getMessage() for r in flwr_logs.records)
    assert all(r.levelno < logging.ERROR for r in flwr_logs.records)


# -- issue #16: FLTrust, DeepSight, AlignIns, CRFL, Multi-metrics ------------------------------------------

#: A tiny classifier ``softmax(x W^T + b)`` (weight, bias, a 0-d int array) for the defenses that look
#: at the output layer or run the model on the server.
CLASSIFIER_KEYS = ["fc.weight", "fc.bias", "bn.num_batches_tracked"]
CLASSIFIER = [np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32), np.zeros(2, np.float32), np.array(3)]


def stand_in_root_update(server_gradient):
    """FLTrust's server update without training: the global arrays minus ``server_gradient``."""

    def root_update(server_round, arrays):
        from flwr.app import Array, ArrayRecord

        trained, offset = {}, 0
        for key, array in arrays.items():
            value = array.numpy()
            if value.dtype.kind == "f":
                step = np.asarray(server_gradient[offset : offset + value.size], dtype=value.dtype)
                value, offset = value - step.reshape(value.shape), offset + value.size
            trained[key] = Array(np.ascontiguousarray(value))
        return ArrayRecord(trained)

    return root_update


def stand_in_probe(arrays):
    """DeepSight's probe for ``CLASSIFIER``: softmax outputs on 2 seeds x 4 fixed inputs."""
    inputs = np.random.default_rng(5).normal(size=(2, 4, 2))
    logits = inputs @ arrays["fc.weight"].numpy().T + arrays["fc.bias"].numpy()
    exp = np.exp(logits - logits.max(axis=2, keepdims=True))
    return exp / exp.sum(axis=2, keepdims=True)


def test_fltrust_trust_scores_and_norm_matching_by_hand():
    grads = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [-1.0, 0.0]])
    step, trust = fltrust_step(grads, np.array([1.0, 0.0]))
    # TS = ReLU(cos) = (1, 0, 1/sqrt2, 0); scaled rows (1, 0) and (1, 1)/sqrt2; sum TS = 1 + 1/sqrt2
    np.testing.assert_allclose(trust, [1.0, 0.0, 2**-0.5, 0.0], atol=1e-12)
    np.testing.assert_allclose(step, [1.5 / (1 + 2**-0.5), 0.5 / (1 + 2**-0.5)], atol=1e-6)
    step, trust = fltrust_step(np.array([[-1.0, 0.0], [0.0, 0.0]]), np.array([1.0, 0.0]))
    assert trust.tolist() == [0.0, 0.0] and step.tolist() == [0.0, 0.0]  # nobody trusted: no step
    # through Flower records: g_0 = (0.5, 0, 0); the outlier has cos < 0 and is ignored
    step, metrics, _ = run("fltrust", [*HONEST, *OUTLIER], root_update=stand_in_root_update([0.5, 0.0, 0.0]))
    assert metrics["num_admitted"] == 5 and metrics["fltrust_server_norm"] == pytest.approx(0.5)
    cos = np.array(HONEST)[:, 0] / np.linalg.norm(HONEST, axis=1)
    expected = (cos[:, None] * 0.5 * np.array(HONEST) / np.linalg.norm(HONEST, axis=1)[:, None]).sum(
        0
    ) / cos.sum()
    np.testing.assert_allclose(step, expected, atol=1e-6)


def test_fltrust_without_a_root_dataset_refuses_to_aggregate():
    with pytest.raises(RuntimeError, match="root_update"):
        run("fltrust", HONEST)
    with pytest.raises(ValueError, match="server_learning_rate"):
        baselines.DEFENSES["fltrust"]({})[0](server_learning_rate=0.0)


def test_deepsight_neups_threshold_exceedings_and_ddifs_by_hand():
    weights = np.array([[[1.0, -1.0], [0.0, 2.0]], [[3.0, 0.0], [0.0, 0.0]]])
    biases = np.array([[1.0, -1.0], [1.0, 0.0]])
    neups = normalized_energy_updates(weights, biases)  # energies (3, 3) and (4, 0)
    np.testing.assert_allclose(neups, [[0.5, 0.5], [1.0, 0.0]])
    assert threshold_exceedings(neups).tolist() == [2, 1]  # thresholds 0.5 * max: 0.25 and 0.5
    ten = np.array([[0.5, 0.3, 0.2, 0.04, 0.06, 0, 0, 0, 0, 0]])
    assert threshold_exceedings(ten).tolist() == [4]  # 0.1 * 0.5 = 0.05: 0.5, 0.3, 0.2, 0.06
    local = np.array([[[[0.5, 0.5], [0.2, 0.8]]]])  # (N=1, S=1, n=2, C=2)
    global_ = np.array([[[0.25, 0.75], [0.4, 0.6]]])
    np.testing.assert_allclose(division_differences(local, global_), [[[1.25, 1.0]]])  # (2+.5)/2, (2/3+4/3)/2
    assert output_layer([(4, 3), (4,), (2, 4), (2,)]) == (2, 3)
    with pytest.raises(ValueError, match="no output layer"):
        output_layer([(3,)])


@needs_sklearn
def test_deepsight_rejects_the_cluster_of_homogeneous_updates():
    rng = np.random.default_rng(1)
    classes = 10
    benign_neups = rng.dirichlet(np.ones(classes) * 5, size=6)  # energy on many labels: high TE
    attacker_neups = np.tile(np.eye(classes)[7] * 0.9 + 0.01, (3, 1)) + 1e-3 * rng.random((3, classes))
    neups = np.vstack([benign_neups, attacker_neups])
    bias = np.vstack(
        [rng.normal(0, 1, (6, classes)), np.tile(np.eye(classes)[7], (3, 1)) + 0.01 * rng.random((3, 10))]
    )
    ddifs = np.concatenate(
        [
            1 + 0.05 * rng.standard_normal((6, 2, classes)),
            np.tile(np.eye(classes)[7] * 3, (3, 2, 1))[:, :, :] + 0.01 * rng.random((3, 2, classes)),
        ]
    )
    accepted, final, suspicious = deepsight_accepted(bias, ddifs, neups, 1 / 3)
    assert suspicious.tolist() == [False] * 6 + [True] * 3
    assert set(accepted.tolist()) == set(range(6))
    assert len(set(final[6:])) == 1 and final[6] not in final[:6]


@needs_sklearn
def test_deepsight_round_through_flower_records_clips_to_the_median_norm():
    from baselines.deepsight import DeepSight

    grads = [np.array([[0.1, 0.2], [0.2, 0.1]]) * (1 + i) for i in range(5)]
    contents = [
        reply_content(
            [CLASSIFIER[0] - g.astype(np.float32), CLASSIFIER[1] - np.float32(0.1), CLASSIFIER[2]],
            keys=CLASSIFIER_KEYS,
        )
        for g in grads
    ]
    strategy = DeepSight(probe=stand_in_probe)
    weights, metrics = message_round(strategy, CLASSIFIER, contents, keys=CLASSIFIER_KEYS)
    flat = np.array([np.concatenate([g.ravel(), [0.1, 0.1]]) for g in grads])
    norms = np.linalg.norm(flat, axis=1)
    assert metrics["clip_bound"] == pytest.approx(np.median(norms), rel=1e-6)
    # each output neuron: energy 0.3 (1 + i) + 0.1 -> NEUPs (0.5, 0.5), TE 2 for all, none suspicious
    assert metrics["num_suspicious"] == 0 and metrics["num_admitted"] == 5
    scaled = flat * np.minimum(1.0, np.median(norms) / norms)[:, None]
    np.testing.assert_allclose(CLASSIFIER[0] - weights[0], scaled.mean(0)[:4].reshape(2, 2), atol=1e-5)
    np.testing.assert_allclose(CLASSIFIER[1] - weights[1], scaled.mean(0)[4:], atol=1e-5)
    assert weights[2] == CLASSIFIER[2]
    with pytest.raises(RuntimeError, match="probe"):
        message_round(DeepSight(), CLASSIFIER, contents, keys=CLASSIFIER_KEYS)


def test_alignins_mpsa_tda_and_post_filtering_clipping_by_hand():
    from baselines.alignins import AlignIns
    from baselines.numpy_strategy import RoundUpdates

    local_updates = np.array([[3.0, -2.0, 0.1, 0.0], [4.0, -6.0, 0.0, 0.2], [-4.0, 1.0, 0.0, 0.0]])
    # principal signs (+, -, +, +); top-2 coordinates are 0 and 1 for every update
    np.testing.assert_allclose(masked_principal_sign_alignment(local_updates, 0.5), [1.0, 1.0, 0.0])
    mz = median_z_scores(np.array([1.0, 1.0, 0.0]))  # std sqrt(2)/3
    np.testing.assert_allclose(mz, [0.0, 0.0, 3 / np.sqrt(2)])
    assert median_z_scores(np.ones(4)).tolist() == [0.0] * 4
    w = np.array([1.0, -1.0, 0.0, 0.0], dtype=np.float32)
    admitted, mpsa, tda = alignins_admitted(-local_updates, w, 0.5, 1.0, 1.0)
    np.testing.assert_allclose(tda, [5 / np.sqrt(13.01) / np.sqrt(2)] * 2 + [-5 / np.sqrt(17) / np.sqrt(2)])
    assert admitted.tolist() == [0, 1]
    # clipping bound: the lower median of (|u1|, |u2| = 2 |u1|) = |u1|; u2 is halved
    grads = (-local_updates).astype(np.float32)
    updates = RoundUpdates(3, grads, [1, 2, 3], np.ones(3), [slice(0, 4)], [(4,)], w)
    step, metrics = AlignIns(sparsity=0.5).server_step(updates)
    np.testing.assert_allclose(step, [-2.5, 2.5, -0.05, -0.05], atol=1e-6)
    assert metrics == {"num_admitted": 2, "clip_bound": pytest.approx(np.sqrt(13.01))}
    with pytest.raises(ValueError, match="sparsity"):
        AlignIns(sparsity=0.0)


def test_crfl_clips_the_model_norm_adds_seeded_noise_and_reports_the_contraction():
    from baselines.crfl import CRFL
    from baselines.numpy_strategy import RoundUpdates

    w = np.array([3.75, 4.0, 9.0], dtype=np.float32)  # fc.weight (2,), bn.running_var (1,)
    grads = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    updates = RoundUpdates(
        1, grads, [1, 2], np.array([3.0, 1.0]), [slice(0, 2), slice(2, 3)], [(2,), (1,)], w,
        ["fc.weight", "bn.running_var"],
    )  # fmt: skip
    step, metrics = CRFL(sigma=0.01, seed=7).server_step(updates)
    # mean (0.75, 0, 0) -> model (3, 4 | 9); ||(3, 4)|| = 5 > rho_1 = 2 + 0.1 -> (1.26, 1.68); then noise
    noise = np.random.default_rng(7).normal(0.0, 0.01, size=2)
    np.testing.assert_allclose(w - step, [1.26 + noise[0], 1.68 + noise[1], 9.0], atol=1e-6)
    assert metrics["crfl_model_norm"] == pytest.approx(5.0) and metrics["crfl_clip_bound"] == pytest.approx(
        2.1
    )
    assert crfl_contraction([1.0], 1.0) == pytest.approx(0.6826895, abs=1e-7)  # 2 Phi(1) - 1
    assert crfl_contraction([1.0, 2.0], 1.0) == pytest.approx(0.6826895 * 0.9544997, abs=1e-7)
    assert crfl_clip_bound(200, 2.0, 0.1, 15.0) == 15.0
    # (sqrt .9 - sqrt .1)^2 = 0.4: radius sqrt(-log(0.6) / 2) with every other factor 1
    radius = crfl_certified_radius(
        0.9, 0.1, sigma=1.0, contraction=1.0, attackers=1, local_iterations=1, learning_rate=1,
        scale_factor=1, poison_fraction=1, aggregation_weights=[1.0], lipschitz=1,
    )  # fmt: skip
    assert radius == pytest.approx(np.sqrt(-np.log(0.6) / 2))
    assert crfl_certified_radius(0.4, 0.5, **{k: 1 for k in ("sigma", "contraction", "attackers",
        "local_iterations", "learning_rate", "scale_factor", "poison_fraction", "lipschitz")},
        aggregation_weights=[1.0]) == 0.0  # fmt: skip
    with pytest.raises(ValueError, match="sigma"):
        CRFL(sigma=0.0)


def test_crfl_takes_its_noise_and_clip_schedule_from_the_run_config():
    cls, kwargs = baselines.DEFENSES["crfl"](
        {
            "seed": 3,
            "crfl-sigma": 0.02,
            "crfl-clip-start": 10.5,
            "crfl-clip-growth": 0.0,
            "crfl-clip-max": 12.0,
        }
    )
    strategy = cls(**kwargs)
    assert (strategy.sigma, strategy.clip_bound(1), strategy.clip_bound(100)) == (0.02, 10.5, 10.5)
    default = baselines.DEFENSES["crfl"]({})
    assert default[0](**default[1]).clip_bound(1) == pytest.approx(2.1)  # the authors' MNIST schedule


def test_crfl_vote_bounds_by_hand():
    # 8 noisy copies vote on 3 inputs (labels 2, 0, 1); Hoeffding margin sqrt(log(1/0.25) / 16) = 0.2943
    votes = np.array([[2, 0, 1], [2, 0, 0], [2, 1, 0], [2, 0, 1], [2, 0, 0], [2, 0, 1], [2, 0, 0], [1, 0, 1]])
    p_a, p_b, correct = crfl_vote_bounds(votes, np.array([2, 0, 1]), alpha=0.25)
    margin = np.sqrt(np.log(4.0) / 16)
    np.testing.assert_allclose(p_a, [7 / 8 - margin, 7 / 8 - margin, 4 / 8 - margin])
    np.testing.assert_allclose(p_b, [1 / 8 + margin, 1 / 8 + margin, 4 / 8 + margin])
    assert correct.tolist() == [True, True, False]  # input 3: a 4-4 tie goes to class 0, not the label 1


def test_multi_metrics_features_scores_and_selection_by_hand():
    from baselines.multi_metrics import MultiMetrics

    grads = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    # (1 - cos)^2: 1, 0, 1 (pairs 12, 13, 23); L1: 2, 1, 3; norm differences: 0, 1, 1
    np.testing.assert_allclose(multi_metrics_features(grads), [[1, 3, 1], [2, 5, 1], [1, 4, 2]])
    features = np.array([[2, 0, 0], [-2, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=float)
    # covariance diag(8/5, 2/5, 2/5): every score 4 * 5/8 = 1 * 5/2 = 2.5
    np.testing.assert_allclose(multi_metrics_scores(features), [2.5] * 6)
    step, metrics, _ = run("multi-metrics", [*HONEST, *OUTLIER], keep_fraction=0.5)
    assert metrics["num_admitted"] == 3
    assert np.linalg.norm(step - np.mean(HONEST, axis=0)) < 0.2  # three honest updates, not the outlier
    with pytest.raises(ValueError, match="keep_fraction"):
        MultiMetrics(keep_fraction=0.0)


@needs_sklearn
@pytest.mark.parametrize("name", sorted(NEEDS_SERVER_MODEL))
def test_defenses_with_server_models_exclude_a_nan_update_and_survive(name, flwr_logs):
    grads = [np.array([[0.1, 0.2], [0.2, 0.1]]) * (1 + 0.1 * i) for i in range(6)]
    contents = [
        reply_content(
            [CLASSIFIER[0] - g.astype(np.float32), CLASSIFIER[1], CLASSIFIER[2]], keys=CLASSIFIER_KEYS
        )
        for g in grads
    ]
    nan = np.full((2, 2), np.nan, dtype=np.float32)
    contents.append(reply_content([nan, CLASSIFIER[1], CLASSIFIER[2]], keys=CLASSIFIER_KEYS))
    cls, kwargs = baselines.DEFENSES[name]({"clients-per-round": 7})
    side = {"fltrust": {"root_update": stand_in_root_update([0.1, 0.2, 0.2, 0.1, 0, 0])}}
    strategy = cls(**kwargs, **side.get(name, {"probe": stand_in_probe}))
    weights, metrics = message_round(strategy, CLASSIFIER, contents, keys=CLASSIFIER_KEYS)
    assert metrics["num_excluded"] == 1 and metrics["num_aggregated"] == 6
    assert weights is not None and np.isfinite(weights[0]).all()
    assert any("node 106" in r.getMessage() and "NaN" in r.getMessage() for r in flwr_logs.records)


def test_server_side_probe_and_root_trainer_on_a_real_torch_model():
    torch = pytest.importorskip("torch")
    from flwr.app import ArrayRecord

    from baselines.server_side import OutputProbe, RootTrainer

    weight, bias = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0.0, 0.0])
    arrays = ArrayRecord({"weight": weight, "bias": bias})
    inputs = [torch.tensor([[0.0, 0.0], [float(np.log(3.0)), 0.0]])]
    probe = OutputProbe(model_fn=lambda: torch.nn.Linear(2, 2), inputs=inputs, preprocess=lambda x: x)
    # logits (0, 0) -> (1/2, 1/2); (log 3, 0) -> (3/4, 1/4)
    np.testing.assert_allclose(probe(arrays), [[[0.5, 0.5], [0.75, 0.25]]], atol=1e-6)

    def one_sgd_step(model, x, y, seed):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 1.0 * p.grad
        return float(loss)

    x, y = torch.tensor([[0.0, 0.0]]), torch.tensor([0])
    trainer = RootTrainer(model_fn=lambda: torch.nn.Linear(2, 2), x=x, y=y, train_fn=one_sgd_step, seed=3)
    trained = trainer(1, arrays)
    # at x = 0 only the bias moves: softmax (1/2, 1/2), label 0 -> gradient (-1/2, 1/2)
    np.testing.assert_allclose(trained["bias"].numpy(), [0.5, -0.5], atol=1e-7)
    np.testing.assert_allclose(trained["weight"].numpy(), weight.numpy())
