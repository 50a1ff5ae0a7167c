"""The AND-mask's vote rules (flwr_invariant.mask_rules) on hand-checked inputs, and their plumbing."""

import numpy as np
import pytest
import torch

import flwr_invariant.serverapp
import flwr_invariant.strategy
from flwr_invariant.aggregate import and_mask, invariant_update
from flwr_invariant.mask_rules import (
    MASK_RULES,
    RECALL_ROUNDS,
    RECORD_KEEPING_RULES,
    RECORD_MIN_SAMPLED,
    MaskRule,
    binomial_tail,
    busy_coordinates,
    collusion_weights,
    departure_agreement,
    departure_signs,
    extreme_lean,
    hold_quiet_coordinates,
    sign_agreement,
    unusual_records,
    weighted_consistency,
)
from flwr_invariant.settings import InvariantConfig
from simulation.adaptive import bloc_evasion_update
from simulation.config import resolve_config
from tests.test_core import FAILURE_MODES


def test_sign_agreement_by_hand() -> None:
    signs = np.array([[1, 1, -1, 0], [1, -1, -1, 0], [-1, -1, 1, 1]])
    expected = np.array([[3, 1, -3], [1, 3, -1], [-3, -1, 4]]) / 4
    agreement, count = sign_agreement([signs[:, :1] * 0.5, signs[:, 1:].reshape(3, 3, 1) * 7.0])
    np.testing.assert_array_equal(agreement, expected)
    assert count == 4


def test_sign_agreement_stays_exact_past_float32s_whole_numbers() -> None:
    # 2**24 + 3 coordinates: one float32 running sum would stop counting at 2**24.
    layer = np.ones((2, 2**24 + 3), dtype=np.float32)
    layer[1, -3:] = -1.0
    agreement, count = sign_agreement([layer])
    assert count == 2**24 + 3
    assert agreement[0, 1] * count == 2**24 - 3 and agreement[0, 0] == 1.0


def test_departure_agreement_by_hand() -> None:
    # layer 1, share 0.5 (2 of 4 coordinates): medians (2, 0, 0, 0), departures
    # [1, 0, 1, 0], [0, 0, -1, 5], [-2, 1, 0, 0]; largest two: {0, 2}, {3, 2}, {0, 1}.
    # layer 2 (1 coordinate): median 2, departure signs [-1, 0, 1].
    layer1 = np.array([[3, 0, 1, 0], [2, 0, -1, 5], [0, 1, 0, 0]], dtype=np.float32)
    layer2 = np.array([[1.0], [2.0], [3.0]])
    agreement, count = departure_agreement([layer1, layer2], share=0.5)
    expected = np.array([[2 + 1, -1 + 0, -1 - 1], [-1 + 0, 2 + 0, 0 + 0], [-1 - 1, 0 + 0, 2 + 1]]) / 3
    np.testing.assert_array_equal(agreement, expected)
    assert count == 3


def _departure_agreement_with_np_median(layers: list[np.ndarray], share: float) -> np.ndarray:
    """The definition of departure_agreement, written plainly (np.median, a full argsort)."""
    total, count = 0.0, 0
    for layer in layers:
        flat = np.asarray(layer, dtype=np.float32).reshape(layer.shape[0], -1)
        departures = flat - np.median(flat, axis=0)
        kept = int(np.ceil(share * flat.shape[1]))
        signs = np.zeros_like(departures)
        for row, departure in zip(signs, departures, strict=True):
            largest = np.argsort(-np.abs(departure), kind="stable")[:kept]
            row[largest] = np.sign(departure[largest])
        total, count = total + signs.astype(np.float64) @ signs.T, count + kept
    return total / count


@pytest.mark.parametrize("num_clients", [7, 20])
def test_departure_agreement_matches_its_definition(num_clients: int) -> None:
    # Continuous values (no ties among the largest departures), plus a layer of repeated values.
    rng = np.random.default_rng(num_clients)
    layers = [
        rng.standard_normal((num_clients, 50, 30)).astype(np.float32),
        rng.integers(-2, 3, (num_clients, 1)).astype(np.float32) * 0.25,
        rng.standard_normal((num_clients, 999)),
    ]
    agreement, _ = departure_agreement(layers, share=0.1)
    np.testing.assert_array_equal(agreement, _departure_agreement_with_np_median(layers, 0.1))


def _evading_bloc_round(seed: int) -> list[np.ndarray]:
    """16 honest updates (a common direction plus noise of scales 0.3-3) and 4 bloc-evasion updates."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(2000).astype(np.float32)

    def honest(scale: float) -> np.ndarray:
        return common + scale * rng.standard_normal(2000).astype(np.float32)

    backdoor = np.zeros(2000, dtype=np.float32)
    backdoor[rng.choice(2000, 200, replace=False)] = 4.0 * rng.choice([-1.0, 1.0], 200)
    bloc = [
        bloc_evasion_update(
            torch.tensor(honest(1.5) + backdoor), torch.tensor(np.stack([honest(1.5) for _ in range(3)])), 0.1
        )[0].numpy()
        for _ in range(4)
    ]
    return [honest(scale) for scale in np.linspace(0.3, 3.0, 16)] + bloc


def test_departure_exclusion_finds_the_bloc_that_evades_the_whole_vector_test() -> None:
    clients = _evading_bloc_round(seed=0)
    outside, _ = MaskRule("bloc-exclusion", 0.3).outside_blocs([np.stack(clients)])
    assert outside[16:].all()  # the evaders stay in; the quietest honest clients are flagged instead
    assert not outside[:4].all()

    global_weights = [np.zeros(2000, dtype=np.float32)]
    updates = [[-update] for update in clients]  # w_i = w - g_i
    config = InvariantConfig(tau=0.3, mask_rule="departure-exclusion")
    new, metrics = config.aggregate(global_weights, updates)
    expected, fraction = invariant_update(global_weights, updates[:16], tau=0.3, trim_ratio=0.45)
    np.testing.assert_array_equal(new[0], expected[0])
    assert metrics["num_bloc_excluded"] == 4 and metrics["mask_fraction"] == fraction

    # the same exclusion, then the quiet half of the coordinates held where they are
    busy = InvariantConfig(tau=0.3, mask_rule="busy-departure-exclusion")
    held, metrics = busy.aggregate(global_weights, updates)
    gate = busy_coordinates(np.stack(clients[:16]))
    assert metrics["num_bloc_excluded"] == 4 and 0.4 < gate.mean() <= 0.5 + 1e-9
    np.testing.assert_array_equal(held[0], np.where(gate, expected[0], 0.0))


def test_collusion_weights_share_a_blocs_vote() -> None:
    # 7 clients: pair agreements 0 except the bloc {4, 5, 6} (0.9 among themselves) and (0, 1) at 0.1.
    agreement = np.zeros((7, 7))
    agreement[0, 1] = agreement[1, 0] = 0.1
    for i in (4, 5, 6):
        for j in (4, 5, 6):
            agreement[i, j] = 0.9
    np.fill_diagonal(agreement, 1.0)
    # 21 pairs: 17 at 0, one at 0.1, three at 0.9 -> median 0, MAD 0: any pair above 0 stands out.
    np.testing.assert_array_equal(
        collusion_weights(agreement, 10**6), [1 / 2, 1 / 2, 1, 1, 1 / 3, 1 / 3, 1 / 3]
    )
    # Over 100 coordinates chance alone spreads agreements by 0.1: 0.1 does not stand out, 0.9 does.
    np.testing.assert_array_equal(collusion_weights(agreement, 100), [1, 1, 1, 1, 1 / 3, 1 / 3, 1 / 3])
    # Over 4 coordinates nothing can stand out.
    assert collusion_weights(agreement, 4).tolist() == [1.0] * 7
    # With a spread of 0.2 around 0.1 only the bloc stands out.
    rng = np.random.default_rng(0)
    noisy = agreement + np.triu(rng.uniform(-0.2, 0.2, (7, 7)), 1)
    noisy = np.triu(noisy, 1) + np.triu(noisy, 1).T + np.eye(7)
    noisy[4, 5] = noisy[5, 4] = noisy[4, 6] = noisy[6, 4] = noisy[5, 6] = noisy[6, 5] = 0.9
    np.testing.assert_array_equal(collusion_weights(noisy, 10**6), [1, 1, 1, 1, 1 / 3, 1 / 3, 1 / 3])
    assert collusion_weights(np.eye(2), 10**6).tolist() == [1.0, 1.0]  # no pairs to compare


def test_weighted_consistency_by_hand() -> None:
    stacked = np.array([[1.0, -2.0], [3.0, 0.0], [-1.0, -1.0]])
    np.testing.assert_allclose(weighted_consistency(stacked, np.ones(3)), [1 / 3, 2 / 3])
    np.testing.assert_allclose(weighted_consistency(stacked, np.array([1.0, 0.5, 0.5])), [1 / 2, 3 / 4])


def tipped_round(rng: np.random.Generator, num_coordinates: int = 2000) -> np.ndarray:
    """16 benign clients leaning + on every coordinate below tau = 0.6, and 4 colluders voting + as a bloc.

    Benign values: +1 with probability 0.75 (expected consistency 0.5), else -1, times noise.
    The colluders send the same +0.5 everywhere: net vote 8 + 4 = 12 = 0.6 * 20 on average.
    """
    benign = np.where(rng.random((16, num_coordinates)) < 0.75, 1.0, -1.0) * rng.uniform(0.5, 1.5, (16, 1))
    bloc = np.full((4, num_coordinates), 0.5)
    return np.concatenate([benign, bloc]).astype(np.float32)


def test_a_bloc_tips_the_papers_mask_but_not_the_collusion_rule() -> None:
    stacked = tipped_round(np.random.default_rng(1))
    paper, _ = MaskRule("paper", 0.6).scales([stacked])
    collusion, metrics = MaskRule("collusion", 0.6).scales([stacked])
    benign_only, _ = MaskRule("paper", 0.6).scales([stacked[:16]])
    assert paper[0].mean() > benign_only[0].mean() + 0.15  # the bloc lifts coordinates over tau
    assert collusion[0].mean() <= benign_only[0].mean()  # ... but not under the collusion rule
    weights = collusion_weights(*sign_agreement([stacked]))
    assert weights[16:].sum() <= weights[:16].min()  # the four colluders weigh no more than one client
    assert metrics["min_vote_weight"] == weights.min()


def test_soft_margin_scales_by_the_margin_above_tau() -> None:
    # 5 clients, tau 0.6: k = 3 votes; net votes per coordinate 5, 4 (one abstains), 3, 1
    stacked = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, -1], [1, 0, -1, -1]], dtype=float)
    scales, _ = MaskRule("soft-margin", 0.6).scales([stacked])
    np.testing.assert_allclose(scales[0], [1.0, 2 / 3, 1 / 3, 0.0])


def test_memory_needs_the_lean_to_last_across_rounds() -> None:
    rule = MaskRule("memory", 0.6)
    up = np.ones((5, 2))
    flip = np.array([[1.0, -1.0]] * 5)
    first, _ = rule.scales([up])
    assert first[0].tolist() == [1.0, 1.0]
    # Round 2 reverses coordinate 1: its own round passes it (|-5| / 5), the memory (2.5 - 5) does not.
    second, _ = rule.scales([flip])
    assert second[0].tolist() == [1.0, 0.0]


def test_memory_state_continues_where_it_was_saved() -> None:
    rng = np.random.default_rng(3)
    rounds = [[rng.normal(size=(7, 3, 2)), rng.normal(size=(7, 4))] for _ in range(4)]
    uninterrupted = MaskRule("memory", 0.4)
    expected = [uninterrupted.scales(layers)[0] for layers in rounds]

    first = MaskRule("memory", 0.4)
    assert first.memory_state is None
    for layers in rounds[:2]:
        first.scales(layers)
    saved = first.memory_state
    # decayed count 0.5 * 7 + 7, then 6 + 4 decayed vote sums
    assert saved.shape == (11,) and saved[0] == 10.5
    resumed = MaskRule("memory", 0.4)
    resumed.memory_state = saved
    assert np.array_equal(resumed.memory_state, saved)
    for layers, want in zip(rounds[2:], expected[2:], strict=True):
        got = resumed.scales(layers)[0]
        assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))

    wrong = MaskRule("memory", 0.4)
    wrong.memory_state = saved[:-1]
    with pytest.raises(ValueError, match="holds 9 coordinates; the masked layers of this round have 10"):
        wrong.scales(rounds[0])
    with pytest.raises(ValueError, match="keeps no mask memory"):
        InvariantConfig(mask_rule="collusion").restore_mask_memory(saved)


@pytest.mark.parametrize("tau", [0.6, 0.3])  # the paper's, and the one recommended with bloc-exclusion
@pytest.mark.parametrize("rule", MASK_RULES)
def test_every_rule_gets_the_papers_failure_modes_right(rule: str, tau: float) -> None:
    config = InvariantConfig(tau=tau, trim_ratio=0.2, mask_rule=rule)
    zeros = [np.zeros(2, dtype=np.float32)]
    clients = [[-row] for row in FAILURE_MODES]  # w_i = w - g_i
    new, _ = config.aggregate(zeros, clients, client_ids=range(len(clients)))
    step = zeros[0] - new[0]
    assert np.sign(step[0]) == 1.0  # the benign consensus survives the outliers
    assert step[1] == 0.0  # no benign consensus: masked


def test_bloc_exclusion_runs_the_paper_on_the_clients_outside_the_bloc() -> None:
    rng = np.random.default_rng(5)
    global_weights = [rng.standard_normal((40, 25)).astype(np.float32), np.arange(4)]
    honest = [
        [
            w + rng.standard_normal(w.shape).astype(w.dtype) if w.dtype.kind == "f" else w
            for w in global_weights
        ]
        for _ in range(16)
    ]
    shared = rng.standard_normal((40, 25)).astype(np.float32)  # the bloc's common direction
    bloc = [
        [
            global_weights[0] + shared + 0.3 * rng.standard_normal((40, 25)).astype(np.float32),
            global_weights[1],
        ]
        for _ in range(4)
    ]
    new, metrics = InvariantConfig(mask_rule="bloc-exclusion").aggregate(global_weights, honest + bloc)
    expected, fraction = invariant_update(global_weights, honest, tau=0.6, trim_ratio=0.45)
    for a, b in zip(new, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    assert metrics["num_bloc_excluded"] == 4 and metrics["mask_fraction"] == fraction
    assert metrics["trim_count"] == 7  # of the 16 left: floor(0.45 * 16)

    # independent clients: nobody is excluded, the paper's step bit for bit
    new, metrics = InvariantConfig(mask_rule="bloc-exclusion").aggregate(global_weights, honest)
    for a, b in zip(new, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    assert metrics["num_bloc_excluded"] == 0


def test_busy_coordinates_by_hand() -> None:
    # median |x| per coordinate: 2, 1, 0.5, 3 (the middle of three); their median is 1.5
    stacked = np.array([[2.0, -1.0, 0.5, 3.0], [-9.0, 1.0, -0.5, -4.0], [1.0, 0.0, 7.0, 3.0]])
    assert busy_coordinates(stacked).tolist() == [True, False, False, True]
    assert busy_coordinates(np.ones((5, 2, 3))).all()  # ties at the median are kept


def test_busy_bloc_exclusion_steps_only_where_the_clients_outside_the_bloc_move_most() -> None:
    rng = np.random.default_rng(8)
    global_weights = [np.zeros((30, 40), dtype=np.float32), np.arange(4)]  # the integer layer: a median
    # honest clients lean the same way everywhere, a hundred times less on the right half
    scale = np.where(np.arange(40) < 20, 1.0, 0.01).astype(np.float32)
    honest = [
        [-scale * (1.0 + rng.standard_normal((30, 40)).astype(np.float32)), np.arange(4) + k % 3]
        for k in range(16)
    ]
    shared = rng.standard_normal((30, 40)).astype(np.float32)
    bloc = [
        [-(shared + 0.1 * rng.standard_normal((30, 40)).astype(np.float32)), np.full(4, 99)] for _ in range(4)
    ]

    config = InvariantConfig(tau=0.3, mask_rule="busy-bloc-exclusion")
    new, metrics = config.aggregate(global_weights, honest + bloc)
    paper, _ = invariant_update(global_weights, honest, tau=0.3, trim_ratio=0.45)
    paper_mask = and_mask(np.stack([-update[0] for update in honest]), 0.3)
    assert metrics["num_bloc_excluded"] == 4
    assert metrics["mask_fraction"] == paper_mask[:, :20].sum() / paper_mask.size
    np.testing.assert_array_equal(new[0][:, :20], paper[0][:, :20])  # the busy half: the paper's step
    assert (paper[0][:, 20:] != 0).mean() > 0.5  # the paper moves most of the quiet half,
    assert (new[0][:, 20:] == 0).all()  # this rule none of it
    np.testing.assert_array_equal(new[1], paper[1])  # the median of the honest clients' integers


@pytest.mark.parametrize("backend", ["reference", "numpy", "torch"])
def test_busy_rules_equal_the_paper_step_on_updates_held_at_the_global_weights(backend: str) -> None:
    # Independent clients (nobody excluded): the gate's definition, holding the quiet
    # coordinates of every update before the step, gives the same weights bit for bit.
    rng = np.random.default_rng(11)
    global_weights = [rng.standard_normal((12, 9)).astype(np.float32), rng.standard_normal(7), np.arange(3)]
    clients = [
        [
            *(
                w + rng.standard_normal(w.shape).astype(w.dtype) * rng.uniform(0.1, 2)
                for w in global_weights[:2]
            ),
            k % 4 + np.arange(3),
        ]
        for k in range(15)
    ]
    gates = {i: busy_coordinates(np.stack([global_weights[i] - c[i] for c in clients])) for i in (0, 1)}
    held = [
        [np.where(gates[i], c[i], w) if i in gates else c[i] for i, w in enumerate(global_weights)]
        for c in clients
    ]
    for rule in ("busy-bloc-exclusion", "busy-departure-exclusion"):
        new, metrics = InvariantConfig(tau=0.3, mask_rule=rule, backend=backend).aggregate(
            global_weights, clients
        )
        expected, fraction = InvariantConfig(tau=0.3, backend=backend).aggregate(global_weights, held)
        assert metrics["num_bloc_excluded"] == 0
        for a, b in zip(new, expected, strict=True):
            np.testing.assert_array_equal(a, b)
        assert metrics["mask_fraction"] == fraction["mask_fraction"]


def test_extreme_lean_by_hand() -> None:
    # per coordinate: max + min - 2 * median = 9 + 0 - 2, -1 - 7 + 4, 3 + 1 - 4 (a tie)
    stacked = np.array([[9.0, -1.0, 1.0], [0.0, -2.0, 2.0], [1.0, -7.0, 3.0]])
    assert extreme_lean(stacked).tolist() == [1, -1, 0]
    assert extreme_lean(np.ones((4, 2, 3))).shape == (2, 3)


ZEROS_50 = [np.zeros(50, dtype=np.float32)]


def _lone_pusher_rounds(rounds: int, seed: int = 4) -> list[list[list[np.ndarray]]]:
    """``rounds`` rounds of 20 clients' updates (from :data:`ZEROS_50`) on 50 coordinates.

    Honest pseudo-gradients are ``2 + N(0, 1)`` on coordinates 0-24 and ``1 + N(0, 1)`` on the rest;
    one client a round (never flagged: nobody shares its departures) sends -30 on coordinates 0-4.
    """
    rng = np.random.default_rng(seed)
    scale = np.where(np.arange(50) < 25, 2.0, 1.0)
    result = []
    for _ in range(rounds):
        grads = scale + rng.standard_normal((20, 50))
        grads[0, :5] = -30.0
        result.append([[(-g).astype(np.float32)] for g in grads])
    return result


def _steps(config: InvariantConfig, rounds: list) -> list[tuple[np.ndarray, dict]]:
    """Each round's step from :data:`ZEROS_50` and its metrics, in order (the rule's memory carries)."""
    steps = []
    for clients in rounds:
        new, metrics = config.aggregate(ZEROS_50, clients)
        steps.append((-new[0], metrics))
    return steps


def test_persistent_departure_exclusion_holds_where_one_client_pushes_every_round() -> None:
    rounds = _lone_pusher_rounds(30)
    held = _steps(InvariantConfig(tau=0.3, mask_rule="persistent-departure-exclusion"), rounds)
    busy = _steps(InvariantConfig(tau=0.3, mask_rule="busy-departure-exclusion"), rounds)
    # a coin-flip lean cannot pass 4 standard deviations in its first 15 rounds: both rules agree
    for (step, metrics), (busy_step, _) in zip(held[:15], busy[:15], strict=True):
        np.testing.assert_array_equal(step, busy_step)
        assert metrics["lean_held_fraction"] == 0.0
    step, metrics = held[-1]
    busy_step, busy_metrics = busy[-1]
    assert metrics["num_bloc_excluded"] == busy_metrics["num_bloc_excluded"] == 0
    assert (busy_step[:5] != 0).all()  # the lone pusher's coordinates move under busy-departure-exclusion,
    assert (step[:5] == 0).all()  # not once its lean has lasted
    np.testing.assert_array_equal(step[5:], busy_step[5:])  # the honest coordinates step as before
    assert metrics["lean_held_fraction"] == 5 / 50
    assert metrics["mask_fraction"] == busy_metrics["mask_fraction"] - 5 / 50


def test_persistent_departure_exclusion_continues_from_its_saved_memory() -> None:
    rounds = _lone_pusher_rounds(30)
    expected = _steps(InvariantConfig(tau=0.3, mask_rule="persistent-departure-exclusion"), rounds)

    first = InvariantConfig(tau=0.3, mask_rule="persistent-departure-exclusion")
    _steps(first, rounds[:20])
    saved = first.mask_memory
    assert saved.shape == (1 + 50,) and saved[0] == pytest.approx(sum(0.95 ** (2 * k) for k in range(20)))
    resumed = InvariantConfig(tau=0.3, mask_rule="persistent-departure-exclusion")
    resumed.restore_mask_memory(saved)
    for (got, _), (want, _) in zip(_steps(resumed, rounds[20:]), expected[20:], strict=True):
        np.testing.assert_array_equal(got, want)
    forgotten = InvariantConfig(tau=0.3, mask_rule="persistent-departure-exclusion")
    (step, _), *_ = _steps(forgotten, rounds[20:21])
    assert (step[:5] != 0).all() and (expected[20][0][:5] == 0).all()  # the memory is what holds them


PUSHED = np.arange(0, 400, 10)  # the 40 coordinates (10% of 400) a share of colluders pushes


def _bloc_round(rng: np.random.Generator, honest_ids: range, bloc_ids: list[int], push: bool) -> tuple:
    """One round of ``(updates, ids)`` on a ``(20, 20)`` layer from zero weights.

    Honest pseudo-gradients are ``N(0, 1)``; the bloc's too, plus ``+5`` on :data:`PUSHED` when
    ``push``: then its members depart together and the pairwise test flags them.
    """
    grads, ids = [], [*honest_ids, *bloc_ids]
    for client in ids:
        grad = rng.standard_normal(400)
        if push and client in bloc_ids:
            grad[PUSHED] += 5.0
        grads.append(grad)
    return [[(-g).reshape(20, 20).astype(np.float32)] for g in grads], ids


def _split_round(rng: np.random.Generator, honest_ids: range, attacker_id: int | None) -> tuple[list, list]:
    """One :func:`_bloc_round` with at most one attacker: alone in its round, it has no partner."""
    return _bloc_round(rng, honest_ids, [] if attacker_id is None else [attacker_id], push=True)


def test_cross_round_departure_exclusion_finds_colluders_that_never_share_a_round() -> None:
    rng = np.random.default_rng(12)
    zeros = [np.zeros((20, 20), dtype=np.float32)]
    cross = InvariantConfig(tau=0.3, mask_rule="cross-round-departure-exclusion")
    busy = InvariantConfig(tau=0.3, mask_rule="busy-departure-exclusion")
    for round_index in range(4):  # a different attacker of the same share every round, new honest ids
        updates, ids = _split_round(rng, range(100 * round_index, 100 * round_index + 15), 1000 + round_index)
        _, busy_metrics = busy.aggregate(zeros, updates, client_ids=ids)
        _, metrics = cross.aggregate(zeros, updates, client_ids=ids)
        assert busy_metrics["num_bloc_excluded"] == 0  # no partner within the round
        # from the second round on, the last rounds' attacker is its partner
        assert metrics["num_bloc_excluded"] == (0 if round_index == 0 else 1)
    assert sorted(cross.recalled_departures)[-3:] == [1001, 1002, 1003]
    assert len(cross.recalled_departures) == 3 * 16  # the last RECALL_ROUNDS rounds' clients
    ages = [memory[0] for memory in cross.recalled_departures.values()]
    assert sorted(set(ages)) == [1, 2, 3]
    assert all(memory.dtype == np.int8 for memory in cross.recalled_departures.values())

    with pytest.raises(ValueError, match="'cross-round-departure-exclusion' needs one id per client"):
        cross.aggregate(zeros, updates)


def test_cross_round_departure_exclusion_never_compares_a_client_with_its_own_past() -> None:
    rng = np.random.default_rng(13)
    zeros = [np.zeros((20, 20), dtype=np.float32)]
    updates, ids = _split_round(rng, range(15), 7)
    for returning_id, excluded in ((7, 0), (8, 1)):  # the same client again; another with its update
        cross = InvariantConfig(tau=0.3, mask_rule="cross-round-departure-exclusion")
        cross.aggregate(zeros, updates, client_ids=ids)
        again, again_ids = _split_round(rng, range(100, 115), None)
        _, metrics = cross.aggregate(zeros, [*again, updates[-1]], client_ids=[*again_ids, returning_id])
        assert metrics["num_bloc_excluded"] == excluded


def test_cross_round_departure_exclusion_forgets_after_recall_rounds() -> None:
    rng = np.random.default_rng(14)
    zeros = [np.zeros((20, 20), dtype=np.float32)]
    for gap, excluded in ((RECALL_ROUNDS - 1, 1), (RECALL_ROUNDS, 0)):  # rounds without an attacker between
        cross = InvariantConfig(tau=0.3, mask_rule="cross-round-departure-exclusion")
        rounds = [_split_round(rng, range(15), 1000)]
        rounds += [_split_round(rng, range(100 * k, 100 * k + 15), None) for k in range(1, gap + 1)]
        rounds.append(_split_round(rng, range(900, 915), 2000))
        for updates, ids in rounds:
            _, metrics = cross.aggregate(zeros, updates, client_ids=ids)
        assert metrics["num_bloc_excluded"] == excluded


def test_binomial_tail_by_hand() -> None:
    assert binomial_tail(2, 2, 0.5) == pytest.approx(0.25)
    assert binomial_tail(1, 3, 0.2) == pytest.approx(1 - 0.8**3)
    assert binomial_tail(4, 5, 0.4) == pytest.approx(5 * 0.4**4 * 0.6 + 0.4**5)
    assert binomial_tail(0, 7, 0.3) == pytest.approx(1.0)
    assert binomial_tail(300, 300, 0.5) == pytest.approx(0.5**300)  # no overflow of comb(n, k) in log space


def test_unusual_records_by_hand() -> None:
    sampled = np.array([10, 10, 10, 10, 10, 4])
    flagged = np.array([3, 4, 3, 9, 2, 4])
    # Jeffreys' rates 3.5/11, 4.5/11, 3.5/11, 9.5/11, 2.5/11 (the last has too few rounds): median 3.5/11
    assert binomial_tail(9, 10, 3.5 / 11) < 1e-3 < binomial_tail(4, 10, 3.5 / 11)
    assert unusual_records(sampled, flagged).tolist() == [False, False, False, True, False, False]
    assert unusual_records(sampled, flagged, alpha=1e-5).tolist() == [False] * 6  # tail ~1.2e-4
    assert unusual_records(sampled[:2], flagged[:2]).tolist() == [False, False]  # fewer than 3 judged
    # never flagged elsewhere: the typical rate is 0.5 / 6, not 0, so one flag is not yet unusual
    assert unusual_records([5, 5, 5, 5], [0, 0, 0, 1]).tolist() == [False] * 4
    assert unusual_records([5, 5, 5, 5], [0, 0, 0, 4]).tolist() == [False, False, False, True]


@pytest.mark.parametrize("rule", RECORD_KEEPING_RULES)
def test_record_rules_keep_a_flagged_bloc_out_once_it_looks_honest(rule: str) -> None:
    rng = np.random.default_rng(21)
    zeros = [np.zeros((20, 20), dtype=np.float32)]
    record = InvariantConfig(tau=0.3, mask_rule=rule)
    cross = InvariantConfig(tau=0.3, mask_rule="cross-round-departure-exclusion")
    bloc = [1000, 1001]
    for _ in range(RECORD_MIN_SAMPLED):  # the bloc pushes together: flagged every round
        updates, ids = _bloc_round(rng, range(15), bloc, push=True)
        _, metrics = record.aggregate(zeros, updates, client_ids=ids)
        cross.aggregate(zeros, updates, client_ids=ids)
        assert metrics["num_bloc_excluded"] >= 2
        assert metrics["num_record_excluded"] == 0
    assert metrics["num_record_banned"] == 2  # 5 flags in 5 rounds, the others' typical rate about 0.1
    assert record.flag_record[1000].tolist() == [5, 5, 1, 1] and record.flag_record[1001].tolist() == [
        5,
        5,
        1,
        1,
    ]
    assert all(record.flag_record[client][2] == 0 for client in range(15))

    updates, ids = _bloc_round(rng, range(15), bloc, push=False)  # now the bloc sends honest-looking updates
    _, cross_metrics = cross.aggregate(zeros, updates, client_ids=ids)
    new, metrics = record.aggregate(zeros, updates, client_ids=ids)
    assert (
        cross_metrics["num_bloc_excluded"] == metrics["num_bloc_excluded"]
    )  # the round's test finds no bloc
    assert metrics["num_bloc_excluded"] == 0 and metrics["num_record_excluded"] == 2  # the record does
    honest_only, _ = InvariantConfig(tau=0.3, mask_rule="busy-departure-exclusion").aggregate(
        zeros, updates[:15]
    )
    np.testing.assert_array_equal(new[0], honest_only[0])
    assert record.flag_record[1000].tolist() == [6, 5, 1, 0]


@pytest.mark.parametrize("rule", RECORD_KEEPING_RULES)
def test_record_rules_continue_from_their_saved_record(rule: str) -> None:
    rng = np.random.default_rng(22)
    rounds = [_bloc_round(rng, range(15), [1000, 1001], push=k < 5) for k in range(8)]
    zeros = [np.zeros((20, 20), dtype=np.float32)]
    whole = InvariantConfig(tau=0.3, mask_rule=rule)
    expected = [whole.aggregate(zeros, updates, client_ids=ids) for updates, ids in rounds]

    first = InvariantConfig(tau=0.3, mask_rule=rule)
    for updates, ids in rounds[:5]:
        first.aggregate(zeros, updates, client_ids=ids)
    resumed = InvariantConfig(tau=0.3, mask_rule=rule)
    resumed.restore_recalled_departures(first.recalled_departures)
    resumed.restore_flag_record(first.flag_record)
    forgetful = InvariantConfig(tau=0.3, mask_rule=rule)
    forgetful.restore_recalled_departures(first.recalled_departures)
    for (updates, ids), (want, want_metrics) in zip(rounds[5:], expected[5:], strict=True):
        got, metrics = resumed.aggregate(zeros, updates, client_ids=ids)
        np.testing.assert_array_equal(got[0], want[0])
        assert metrics == want_metrics and metrics["num_record_excluded"] == 2
        assert forgetful.aggregate(zeros, updates, client_ids=ids)[1]["num_record_excluded"] == 0
    with pytest.raises(ValueError, match="keeps no flag record"):
        InvariantConfig(mask_rule="cross-round-departure-exclusion").restore_flag_record(first.flag_record)
    InvariantConfig(mask_rule="paper").restore_flag_record({})  # nothing to restore is fine


def test_record_partial_exclusion_leaves_a_flagged_client_out_on_its_largest_departures_only() -> None:
    rng = np.random.default_rng(23)
    updates, ids = _bloc_round(rng, range(15), [1000, 1001], push=True)
    # two more layers between and after: integer (a median, not tested) and floating (tested)
    updates = [
        [u[0], np.arange(4) + k % 3, rng.standard_normal(30).astype(np.float32)]
        for k, u in enumerate(updates)
    ]
    global_weights = [np.zeros((20, 20), dtype=np.float32), np.arange(4), np.zeros(30, dtype=np.float32)]
    tested = [0, 2]

    rule = MaskRule("record-partial-exclusion", 0.3)
    stacks = [-np.stack([u[i] for u in updates]) for i in tested]
    outside, metrics = rule.outside_blocs(stacks, ids)
    assert outside.all()  # no record yet: every client takes part, the flagged ones in part
    assert metrics["num_bloc_excluded"] == metrics["num_partly_excluded"] >= 2
    departed = departure_signs(stacks)[0] != 0  # (17, 430): each client's largest 10% per layer
    held = rule.without_departures(global_weights, updates, tested)
    flagged = [row for row in range(17) if held[row] is not updates[row]]
    assert len(flagged) == metrics["num_bloc_excluded"] and {15, 16} <= set(flagged)
    for row in flagged:
        for index, start, stop in ((0, 0, 400), (2, 400, 430)):
            got, sent = held[row][index].ravel(), updates[row][index].ravel()
            np.testing.assert_array_equal(got[departed[row, start:stop]], 0.0)  # the global weights there
            np.testing.assert_array_equal(got[~departed[row, start:stop]], sent[~departed[row, start:stop]])
        assert held[row][1] is updates[row][1]
    for row in (15, 16):  # the bloc's shared push is held back (all but the odd noisier honest coordinate)
        assert (held[row][0].ravel()[PUSHED] == 0).mean() >= 0.9
    assert (updates[15][0].ravel()[PUSHED] != 0).all()  # inputs are not modified

    # the strategy's step: the paper's on the held updates, quiet coordinates held
    new, metrics = InvariantConfig(tau=0.3, mask_rule="record-partial-exclusion").aggregate(
        global_weights, updates, client_ids=ids
    )
    stepped, _ = invariant_update(global_weights, held, tau=0.3, trim_ratio=0.45)
    expected, fraction = hold_quiet_coordinates(
        global_weights, stepped, ((i, -np.stack([u[i] for u in held])) for i in tested), 0.3
    )
    for a, b in zip(new, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    assert metrics["mask_fraction"] == fraction and metrics["trim_count"] == 8  # of all 17
    whole, whole_metrics = InvariantConfig(tau=0.3, mask_rule="record-departure-exclusion").aggregate(
        global_weights, updates, client_ids=ids
    )
    assert whole_metrics["trim_count"] < metrics["trim_count"]  # the whole rule left the flagged out
    with pytest.raises(ValueError, match="without_departures got 3 updates; the round's test saw 17"):
        rule.without_departures(global_weights, updates[:3], tested)


def test_record_repeat_exclusion_leaves_a_client_flagged_again_out_whole() -> None:
    rng = np.random.default_rng(24)
    zeros = [np.zeros((20, 20), dtype=np.float32)]
    rule = MaskRule("record-repeat-exclusion", 0.3)
    updates, ids = _bloc_round(rng, range(15), [1000, 1001], push=True)
    outside, metrics = rule.outside_blocs([-np.stack([u[0] for u in updates])], ids)
    held = rule.without_departures(zeros, updates, [0])
    first = {row for row, update in enumerate(updates) if held[row] is not update}
    assert outside.all() and {15, 16} <= first  # a first flag: out on the largest departures only
    assert metrics["num_partly_excluded"] == metrics["num_bloc_excluded"] == len(first)

    updates, ids = _bloc_round(rng, range(100, 115), [1000, 1001], push=True)  # new honest clients
    outside, metrics = rule.outside_blocs([-np.stack([u[0] for u in updates])], ids)
    assert not outside[15] and not outside[16]  # flagged again: out whole
    assert outside[:15].all()  # the new clients' first flags, if any, are partial
    assert metrics["num_partly_excluded"] == metrics["num_bloc_excluded"] - 2
    assert rule.without_departures(zeros, updates, [0])[15] is updates[15]  # out whole, nothing to hold

    # a record saved before it kept the last round's flag reads it as 0
    rule.flag_record = {1000: np.array([2, 2, 0])}
    assert rule.flag_record[1000].tolist() == [2, 2, 0, 0]


def test_bloc_exclusion_keeps_no_one_when_fewer_than_two_would_remain() -> None:
    rule = MaskRule("bloc-exclusion", 0.6)
    a, b, c = np.sign(np.random.default_rng(2).normal(size=(3, 64)))
    twins = np.array([a, a, b, b])  # two pairs of twins: every client has a partner
    outside, metrics = rule.outside_blocs([twins])
    assert outside.tolist() == [False] * 4 and metrics["num_bloc_excluded"] == 4 and metrics["num_kept"] == 0
    outside, metrics = rule.outside_blocs([np.vstack([twins, [-a]])])
    assert outside.tolist() == [False] * 5 and metrics["num_bloc_excluded"] == 4  # one alone is no aggregate
    outside, metrics = rule.outside_blocs([np.array([a, b, c])])
    assert outside.tolist() == [True] * 3 and metrics["num_kept"] == 3
    outside, metrics = rule.outside_blocs([np.array([a])])  # a round of one client has nothing to test
    assert outside.tolist() == [True] and metrics["num_kept"] == 1
    with pytest.raises(ValueError, match="runs the paper's step"):
        rule.scales([twins])


def test_a_round_with_no_client_left_makes_no_step(flwr_logs) -> None:
    rng = np.random.default_rng(5)
    global_weights = [rng.standard_normal((4, 16)).astype(np.float32), np.arange(3)]
    pair = [[w + np.float32(3.0) if w.dtype.kind == "f" else w for w in global_weights]] * 2
    other = [[w - np.float32(3.0) if w.dtype.kind == "f" else w for w in global_weights]] * 2
    new, metrics = InvariantConfig(mask_rule="bloc-exclusion").aggregate(global_weights, pair + other)
    for got, before in zip(new, global_weights, strict=True):
        np.testing.assert_array_equal(got, before)
    assert metrics["num_kept"] == 0 and metrics["num_bloc_excluded"] == 4 and metrics["mask_fraction"] == 0.0
    new[0][0, 0] = 99.0  # a copy: the caller's global weights stay as they were
    assert global_weights[0][0, 0] != 99.0
    warnings = {r.getMessage() for r in flwr_logs.records if "makes no step" in r.getMessage()}
    assert warnings == {
        "InvariantAggregation: mask_rule='bloc-exclusion' left fewer than 2 clients in "
        "(num_bloc_excluded=4, num_kept=0); the global model makes no step this round"
    }


@pytest.mark.parametrize("rule", RECORD_KEEPING_RULES)
def test_record_rules_never_let_an_excluded_client_back_in(rule: str) -> None:
    """Two of three clients excluded for good by their record leave one: no step, not all three."""
    rng = np.random.default_rng(23)
    zeros = [np.zeros((20, 20), dtype=np.float32)]
    banned = np.array([RECORD_MIN_SAMPLED, RECORD_MIN_SAMPLED, 1, 1])
    updates, ids = _bloc_round(rng, range(1), [1000, 1001], push=True)
    config = InvariantConfig(tau=0.3, mask_rule=rule)
    config.restore_flag_record({1000: banned, 1001: banned})
    new, metrics = config.aggregate(zeros, updates, client_ids=ids)
    np.testing.assert_array_equal(new[0], zeros[0])
    assert metrics["num_kept"] == 0 and metrics["num_record_banned"] == 2

    updates, ids = _bloc_round(rng, range(2), [1000], push=True)  # two clients in good standing remain
    new, metrics = config.aggregate(zeros, updates, client_ids=ids)
    assert metrics["num_kept"] == 2 and metrics["num_record_excluded"] + metrics["num_bloc_excluded"] >= 1
    in_good_standing, _ = InvariantConfig(tau=0.3, mask_rule="busy-departure-exclusion").aggregate(
        zeros, updates[:2]
    )
    np.testing.assert_array_equal(new[0], in_good_standing[0])


def test_paper_rule_is_the_reference_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    global_weights = [rng.standard_normal((6, 5)).astype(np.float32), np.arange(4)]
    clients = [[w + rng.standard_normal(w.shape).astype(w.dtype) for w in global_weights] for _ in range(20)]
    new, metrics = InvariantConfig(mask_rule="paper").aggregate(global_weights, clients)
    expected, fraction = invariant_update(global_weights, clients, tau=0.6, trim_ratio=0.45)
    for a, b in zip(new, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    assert metrics["mask_fraction"] == fraction


@pytest.mark.parametrize(
    "cls", [flwr_invariant.serverapp.InvariantAggregation, flwr_invariant.strategy.InvariantAggregation]
)
def test_strategies_take_and_validate_mask_rule(cls) -> None:
    with pytest.raises(
        ValueError,
        match=(
            "mask_rule must be one of paper, soft-margin, collusion, memory, bloc-exclusion, "
            "departure-exclusion, busy-bloc-exclusion, busy-departure-exclusion, "
            "persistent-departure-exclusion, cross-round-departure-exclusion, record-departure-exclusion, "
            "record-partial-exclusion, record-repeat-exclusion; got 'x'"
        ),
    ):
        cls(mask_rule="x")
    assert "mask_rule='collusion'" in repr(cls(mask_rule="collusion"))
    assert "mask_rule" not in repr(cls())


def test_run_config_validates_mask_rule() -> None:
    with pytest.raises(ValueError, match="mask-rule"):
        resolve_config({"mask-rule": "strict"})
    assert resolve_config({"mask-rule": "collusion"})["mask-rule"] == "collusion"
