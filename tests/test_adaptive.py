"""Attacks that know the defense: the ALIE rule by hand, Neurotoxin's frozen coordinates in training."""

import pytest
import torch

from simulation import adaptive
from simulation.config import resolve_config
from simulation.data import load_task
from simulation.partition import attacker_partitions
from simulation.training import local_update, model_for

LINEAR = {"task": "linear", "num-partitions": 5, "clients-per-round": 5, "linear-train-size": 1000,
          "malicious-fraction": 0.4, "partition": "iid"}  # fmt: skip


def test_alie_keeps_only_sign_agreeing_coordinates_inside_the_benign_range():
    benign = torch.tensor([[1.0, 1.0, -1.0, 2.0], [3.0, -1.0, -3.0, 2.0]])  # mean 2, 0, -2, 2; std 1, 1, 1, 0
    backdoor = torch.tensor([10.0, 10.0, 5.0, 1.0])
    sent = adaptive.alie_update(backdoor, benign, z=1.0, tau=1.0)
    # 0: signs agree, same sign: clipped to mean + std; 1: benign signs disagree: mean;
    # 2: benign agree on "-", backdoor "+": mean; 3: agree, inside the range already.
    assert sent.tolist() == [3.0, 0.0, -2.0, 2.0]


def test_top_coordinates_and_neurotoxin_hook_freeze_the_most_updated_coordinates():
    frozen = adaptive.top_coordinates(torch.tensor([0.1, -5.0, 2.0, 0.0]), 0.5)
    assert frozen.tolist() == [False, True, True, False]
    model = torch.nn.Linear(2, 2, bias=False)
    reference = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        model.weight.add_(1.0)
    adaptive.neurotoxin_hook(model, reference, frozen)(1)
    update = adaptive.flat_update(model, reference)
    assert update.tolist() == pytest.approx([1.0, 0.0, 0.0, 1.0], abs=1e-6)
    assert update[1] == 0.0 and update[2] == 0.0  # frozen coordinates are exactly the global ones


def test_bloc_evasion_keeps_its_backdoor_where_it_departs_most_from_the_benign_mean():
    benign = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 2.0]])  # mean 2, 0, 2
    backdoor = torch.tensor([2.5, -4.0, 2.0])  # departs 0.5, 4, 0
    update, kept = adaptive.bloc_evasion_update(backdoor, benign, keep=1 / 3)
    assert kept.tolist() == [False, True, False]
    assert update.tolist() == [2.0, -4.0, 2.0]  # the benign mean but where it departs most
    update, kept = adaptive.bloc_evasion_update(backdoor, benign, keep=1.0)
    assert kept.all() and update.tolist() == backdoor.tolist()  # keep = 1: the black-box attacker


def test_split_evasion_keeps_its_backdoor_only_on_its_share_of_the_coordinates():
    benign = torch.tensor([[1.0, 0.0, 2.0, 0.0], [3.0, 0.0, 2.0, 0.0]])  # mean 2, 0, 2, 0
    backdoor = torch.tensor([2.5, -4.0, 2.0, 3.0])  # departs 0.5, 4, 0, 3
    update, kept = adaptive.split_evasion_update(backdoor, benign, keep=0.25, part=0, parts=2)
    assert kept.tolist() == [True, False, False, False]  # share {0, 2}: not 1, though it departs most
    assert update.tolist() == [2.5, 0.0, 2.0, 0.0]
    update, kept = adaptive.split_evasion_update(backdoor, benign, keep=0.25, part=1, parts=2)
    assert update.tolist() == [2.0, -4.0, 2.0, 0.0]
    update, kept = adaptive.split_evasion_update(backdoor, benign, keep=1.0, part=1, parts=2)
    assert kept.tolist() == [False, True, False, True]  # at most its whole share
    assert update.tolist() == [2.0, -4.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="part must be in"):
        adaptive.split_evasion_update(backdoor, benign, keep=0.25, part=2, parts=2)


def test_rotating_share_keeps_colluders_of_different_rounds_apart_for_a_rotation():
    assert adaptive.rotating_share(rank=0, server_round=0, parts=4, rotation=4) == (0, 16)
    assert adaptive.rotating_share(rank=5, server_round=1, parts=4, rotation=4) == (5, 16)
    assert adaptive.rotating_share(rank=3, server_round=6, parts=4, rotation=4) == (11, 16)
    assert adaptive.rotating_share(rank=3, server_round=10, parts=4, rotation=4) == (11, 16)
    # every rank of four consecutive rounds: shares of different rounds never meet
    window = [{adaptive.rotating_share(r, t, 4, 4)[0] for r in range(20)} for t in range(7, 11)]
    assert all(window[i].isdisjoint(window[j]) for i in range(4) for j in range(i))
    assert adaptive.rotating_share(rank=2, server_round=9, parts=3, rotation=1) == (2, 3)  # split-evasion


@pytest.mark.parametrize("mode", ["alie", "neurotoxin", "bloc-evasion", "split-evasion", "rotating-evasion"])
def test_adaptive_attackers_train_for_real(mode):
    config = resolve_config(LINEAR, {"attack": mode, "neurotoxin-top": 0.5, "evasion-keep": 0.25})
    attacker = attacker_partitions(5, 0.4, config["seed"], "pool")[0]
    task = load_task(config)
    global_state = model_for(task, config).state_dict()
    result = local_update(config, attacker, 1, global_state)
    assert result.attacking and result.update_norm > 0
    update = torch.cat([(result.state_dict[k] - global_state[k]).reshape(-1) for k in global_state])
    if mode == "neurotoxin":
        assert (update == 0).float().mean() >= 0.5  # the frozen half did not move
    benign = local_update(resolve_config(LINEAR, {"attack": "none"}), attacker, 1, global_state)
    assert not benign.attacking


def _shares_taken(monkeypatch, overrides: dict, rounds: tuple[int, ...]) -> tuple[list, int]:
    """The ``(part, parts)`` every attacker of the pool passes to ``split_evasion_update``, round by
    round (pool order within a round), and the pool size."""
    config = resolve_config(LINEAR, overrides)
    pool = attacker_partitions(5, 0.4, config["seed"], "pool")
    global_state = model_for(load_task(config), config).state_dict()
    parts = []
    real = adaptive.split_evasion_update

    def recording(backdoor, benign, keep, part, num_parts):
        parts.append((part, num_parts))
        return real(backdoor, benign, keep, part, num_parts)

    monkeypatch.setattr(adaptive, "split_evasion_update", recording)
    for server_round in rounds:
        for partition in pool:
            local_update(config, partition, server_round, global_state)
    return parts, len(pool)


def test_split_evasion_takes_its_share_from_its_rank_in_the_malicious_pool(monkeypatch):
    parts, size = _shares_taken(monkeypatch, {"attack": "split-evasion", "evasion-parts": 2}, (1,))
    assert parts == [(rank % 2, 2) for rank in range(size)]


def test_rotating_evasion_takes_its_share_from_its_pool_rank_and_the_round(monkeypatch):
    overrides = {"attack": "rotating-evasion", "evasion-parts": 2, "evasion-rotation": 3}
    parts, size = _shares_taken(monkeypatch, overrides, (1, 2, 3))
    assert parts == [(rank % 2 + 2 * (t % 3), 6) for t in (1, 2, 3) for rank in range(size)]


def test_mask_tipping_spends_its_votes_where_colluders_reach_the_threshold():
    from simulation.adaptive import expected_votes, mask_tipping_update

    # Three benign estimates of five coordinates; the backdoor pushes every coordinate up.
    benign = torch.tensor(
        [
            [1.0, 0.2, -0.2, -1.0, 0.5],
            [1.0, 0.1, -0.1, -1.0, 0.5],
            [1.0, 0.3, -0.3, -1.0, 0.5],
        ]
    )
    backdoor = torch.tensor([5.0, 5.0, 5.0, 5.0, 0.01])
    votes = expected_votes(benign.mean(dim=0), benign.std(dim=0, unbiased=False), torch.sign(backdoor), 16)
    # coordinates 0, 4: every benign client votes up (std 0 or tiny spread); 3: all vote down;
    # 1: mean 0.2, std 0.082 -> Phi(2.45) = 0.993 up; 2: the mirror image.
    assert votes[0] == 16 and votes[4] == 16 and votes[3] == -16
    assert votes[1] == pytest.approx(16 * (2 * 0.99286 - 1), abs=1e-3) and votes[2] == pytest.approx(
        -votes[1]
    )
    update, target = mask_tipping_update(backdoor, benign, tau=0.6, clients_per_round=20, colluders=4, z=1.0)
    # min_votes(20, 0.6) = 12: 0, 1 and 4 pass with the colluders; 2 and 3 (benign lean down) do not.
    assert target.tolist() == [True, True, False, False, True]
    std = benign.std(dim=0, unbiased=False)
    assert update[0] == pytest.approx(1.0)  # clipped to mean + z * std = 1.0 (std 0)
    assert update[1] == pytest.approx(0.2 + std[1])  # clipped to the top of the benign range
    assert update[4] == pytest.approx(0.5)  # too small: raised to the bottom of the range, mean - z*std
    assert update[2] == pytest.approx(-0.2) and update[3] == pytest.approx(-1.0)  # the benign mean


def test_mask_tipping_tips_a_coordinate_benign_clients_lean_toward_but_do_not_pass():
    from simulation.adaptive import mask_tipping_update

    # mean 0.1367, std 0.1967: each benign client votes up with Phi(0.695) = 0.756, a net lean of
    # 0.513: 16 benign clients give 8.2 < 12 = min_votes(20, 0.6); 4 colluders tip it (12.2), one
    # colluder with 19 benign clients does not (10.7).
    benign = torch.tensor([[0.3], [-0.14], [0.25]])
    update, target = mask_tipping_update(
        torch.tensor([2.0]), benign, tau=0.6, clients_per_round=20, colluders=4, z=1.0
    )
    assert target.tolist() == [True] and update[0] > 0
    _, alone = mask_tipping_update(
        torch.tensor([2.0]), benign, tau=0.6, clients_per_round=20, colluders=1, z=1.0
    )
    assert alone.tolist() == [False]  # one attacker cannot tip it
