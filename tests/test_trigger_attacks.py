"""DBA, F3BA and A3FL: defining steps on hand-made inputs, local rounds, real simulations, resume."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict
from torch import nn

from simulation import a3fl, dba, f3ba
from simulation.attackers import A3FL, ATTACKERS, DBA, F3BA
from simulation.config import resolve_config
from simulation.data import load_partitions, load_task
from simulation.partition import attacker_partitions
from simulation.training import local_update, model_for
from simulation.triggers import (
    RELAY_KEY,
    Trigger,
    TriggerRelay,
    attacker_trigger,
    evaluation_trigger,
    initial_trigger,
    mean_trigger,
    reply_record,
    square_trigger,
)

from .simulate import run_experiments

DATA_ROOT = Path(
    os.environ.get("FLWR_INVARIANT_DATA_ROOT", Path(__file__).resolve().parents[2] / "shared" / "data")
)

needs_data = pytest.mark.skipif(
    not DATA_ROOT.is_dir(), reason=f"offline data not found at {DATA_ROOT} (set FLWR_INVARIANT_DATA_ROOT)"
)
FMNIST = {"task": "fmnist", "data-root": str(DATA_ROOT), "backdoor": "pixel", "num-partitions": 4,
          "clients-per-round": 4, "train-size": 800, "partition": "iid", "malicious-fraction": 0.5,
          "edge-case-samples": 20, "clean-samples": 40}  # fmt: skip


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


# ---------------------------------------------------------------- configuration and triggers


def test_trigger_attacks_are_registered_by_name():
    assert (ATTACKERS["dba"], ATTACKERS["f3ba"], ATTACKERS["a3fl"]) == (DBA, F3BA, A3FL)


def test_trigger_is_another_name_for_the_pixel_backdoor():
    assert resolve_config({"task": "fmnist", "attack": "f3ba", "backdoor": "trigger"})["backdoor"] == "pixel"


@pytest.mark.parametrize("attack", ["dba", "f3ba", "a3fl"])
def test_trigger_attacks_refuse_a_non_pixel_backdoor(attack):
    with pytest.raises(ValueError, match=f"'attack' = '{attack}' .* 'backdoor' = 'edge-case'"):
        resolve_config({"task": "linear", "attack": attack})


def test_trigger_stamps_rounded_pixels_on_its_mask_only_and_round_trips():
    mask = torch.zeros(2, 2, dtype=torch.bool)
    mask[0, 1] = True
    trigger = Trigger(torch.tensor([[[0.2, 0.5]], [[0.0, 1.0]]]).expand(2, 2, 2).clone(), mask)
    images = torch.full((1, 2, 2, 2), 7, dtype=torch.uint8)
    stamped = trigger.stamp(images)
    # 0.5 * 255 = 127.5 rounds half to even: 128; channel 1 gets 255; every other pixel stays 7
    assert stamped[0, :, 0, 1].tolist() == [128, 255]
    assert stamped[0, :, 0, 0].tolist() == [7, 7] and stamped[0, :, 1].flatten().tolist() == [7] * 4
    again = Trigger.from_bytes(trigger.to_bytes())
    assert torch.equal(again.pattern, trigger.pattern) and torch.equal(again.mask, trigger.mask)
    other = trigger.with_pattern(torch.zeros(2, 2, 2))
    assert torch.allclose(mean_trigger([trigger, other]).pattern, trigger.pattern / 2)
    with pytest.raises(ValueError, match="not a serialised trigger"):
        Trigger.from_bytes(b"junk")


# ---------------------------------------------------------------- DBA


def test_dba_parts_are_the_released_layout_and_their_union_is_the_full_trigger():
    masks = dba.part_masks((28, 28), parts=4, length=4)
    # the released code's 0..3_poison_pattern: rows 0 and 3, columns 0-3 and 6-9
    expected = [(0, range(0, 4)), (0, range(6, 10)), (3, range(0, 4)), (3, range(6, 10))]
    for mask, (row, columns) in zip(masks, expected, strict=True):
        assert sorted(map(tuple, torch.nonzero(mask).tolist())) == [(row, c) for c in columns]
    config = resolve_config(FMNIST, {"attack": "dba", "trigger-size": 4})
    full = evaluation_trigger(config, (1, 28, 28))
    assert int(full.mask.sum()) == 16 and torch.equal(full.mask, torch.stack(masks).any(dim=0))
    assert torch.equal(full.pattern, torch.ones(1, 28, 28))  # white
    with pytest.raises(ValueError, match="'dba-parts' = 6 bars of 'trigger-size' = 14 pixels need 7 x 30"):
        dba.part_masks((28, 28), parts=6, length=14)


def test_each_dba_attacker_stamps_its_own_part():
    config = resolve_config(FMNIST, {"attack": "dba", "num-partitions": 8, "malicious-fraction": 0.5})
    pool = attacker_partitions(8, 0.5, config["seed"], "pool")
    assert len(pool) == 4
    masks = dba.part_masks((28, 28), 4, config["trigger-size"])
    for rank, partition in enumerate(pool):
        assert dba.attacker_part(config, partition, 1) == rank
        assert torch.equal(attacker_trigger(config, (1, 28, 28), partition, 1).mask, masks[rank])
    with pytest.raises(ValueError, match="not a malicious partition"):
        dba.attacker_part(config, next(p for p in range(8) if p not in pool), 1)
    every_k = resolve_config(config, {"attack-schedule": "every-k", "attack-every": 2})
    (single,) = attacker_partitions(8, 0.5, config["seed"], "every-k")
    assert [dba.attacker_part(every_k, single, r) for r in (2, 4, 6, 8, 10)] == [1, 2, 3, 0, 1]


@needs_data
def test_a_dba_attacker_trains_on_images_changed_only_on_its_part():
    config = resolve_config(FMNIST, {"attack": "dba"})
    task = load_task(config)
    partition = attacker_partitions(4, 0.5, config["seed"], "pool")[1]
    seen = {}

    class Spy(DBA):
        def before(self):
            seen["x"], seen["n"] = self.context.x, self.context.num_backdoor

    from simulation import attackers

    original = attackers.ATTACKERS["dba"]
    attackers.ATTACKERS["dba"] = Spy
    try:
        result = local_update(config, partition, 1, model_for(task, config).state_dict())
    finally:
        attackers.ATTACKERS["dba"] = original
    assert result.attacking and result.trigger is None  # nothing to relay
    part = dba.part_masks((28, 28), 4, config["trigger-size"])[1]
    backdoor = seen["x"][: seen["n"]]
    assert seen["n"] == 20 and bool((backdoor[:, 0][:, part] == 255).all())
    sources = task.train_x[torch.from_numpy(load_partitions(config)[partition])]
    pool = {bytes(img[0][~part].numpy()) for img in sources}
    assert all(bytes(img[0][~part].numpy()) in pool for img in backdoor)  # untouched off the part


# ---------------------------------------------------------------- F3BA


def test_f3ba_candidates_are_the_lowest_movement_scores():
    weight = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    grad = torch.tensor([[0.5, 1.0], [-1.0, 2.0]])
    # score -g*w = [[-0.5, 2.0], [3.0, -1.0]]: the two lowest are -1.0 and -0.5
    assert f3ba.candidate_mask(weight, grad, 0.5).tolist() == [[True, False], [False, True]]
    assert f3ba.candidate_mask(weight, grad, 0.1).tolist() == [[False, False], [False, True]]  # at least 1


def test_f3ba_flips_candidates_toward_the_scaled_pattern():
    kernel = torch.tensor([[[[0.4, -0.2], [0.1, -0.3]]]])
    patch = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    candidates = torch.tensor([[[[True, False], [True, True]]]])
    # patch scaled into the filter's [-0.3, 0.4]: [[-0.3, 0.4], [0.4, -0.3]] -> signs [[-, +], [+, -]];
    # 0.4 changes sign (times flip factor 2 -> -0.8); -0.2 would too but is no candidate;
    # 0.1 and -0.3 keep theirs
    flipped = f3ba.flip_toward_pattern(kernel, candidates, patch, flip_factor=2.0)
    assert flipped.flatten().tolist() == pytest.approx([-0.8, -0.2, 0.1, -0.3])


def test_f3ba_trigger_step_ascends_the_activation_gap_by_its_sign():
    conv = nn.Conv2d(1, 1, 1, bias=False)
    mask = torch.zeros(2, 2, dtype=torch.bool)
    mask[0, 0] = True
    images = torch.zeros(3, 1, 2, 2)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    # gap = p^2 (only the masked pixel lights up): grad 2p > 0, so p + lr; unmasked pixels have no grad
    pattern = torch.full((1, 2, 2), 0.5)
    stepped = f3ba.trigger_step(conv, pattern, mask, images, identity, lr=0.1)
    assert stepped.flatten().tolist() == pytest.approx([0.6, 0.5, 0.5, 0.5])
    assert f3ba.trigger_step(conv, torch.full((1, 2, 2), 0.95), mask, images, identity, 0.1)[0, 0, 0] == 1.0
    with torch.no_grad():
        conv.weight.fill_(-1.0)  # relu(-p) = 0: no gradient, no step
    assert torch.equal(f3ba.trigger_step(conv, pattern, mask, images, identity, lr=0.1), pattern)


def test_f3ba_round_leaves_the_first_conv_flipped_toward_the_final_trigger():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    images = torch.rand(10, 1, 6, 6)
    labels = torch.arange(10) % 3
    trigger = square_trigger((1, 6, 6), 3).with_pattern(torch.rand(1, 6, 6))
    raw = model[0].weight.detach().clone()
    dense = model[3].weight.detach().clone()
    pattern, changed = f3ba.focused_flip(
        model, trigger.pattern, trigger.mask, images, labels, identity,
        fraction=0.25, flip_factor=1.0, epochs=2, lr=0.05, batch_size=4, seed=3,
    )  # fmt: skip
    check = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    check.load_state_dict(model.state_dict())
    with torch.no_grad():
        check[0].weight.copy_(raw)
    torch.nn.functional.cross_entropy(check(images), labels).backward()
    candidates = f3ba.candidate_mask(raw, check[0].weight.grad, 0.25)
    assert int(candidates.sum()) == 9  # a quarter of 4 * 9 kernel weights
    expected = f3ba.flip_toward_pattern(raw, candidates, pattern[:, 3:, 3:], 1.0)
    assert torch.equal(model[0].weight, expected)
    assert torch.equal(model[0].weight[~candidates], raw[~candidates]) and torch.equal(model[3].weight, dense)
    assert changed == int((torch.sign(expected) != torch.sign(raw)).sum()) and changed <= 9
    assert torch.equal(pattern[:, :3], trigger.pattern[:, :3]) and not torch.equal(pattern, trigger.pattern)
    assert float(pattern.min()) >= 0.0 and float(pattern.max()) <= 1.0


# ---------------------------------------------------------------- A3FL


def _tiny(weight: list[list[float]]) -> nn.Sequential:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor(weight))
        model[1].bias.zero_()
    return model


def test_a3fl_adversarial_model_unlearns_the_trigger_with_true_labels():
    model = _tiny([[0.0] * 4, [0.0] * 4])
    mask = torch.zeros(2, 2, dtype=torch.bool)
    mask[0, 0] = True
    images, labels = torch.zeros(1, 1, 2, 2), torch.tensor([0])
    adversary = a3fl.unlearn(
        model, torch.ones(1, 2, 2), mask, images, labels, identity, epochs=1, lr=0.1, batch_size=8, seed=0
    )
    # stamped input x = [1, 0, 0, 0]; logits 0 -> softmax (1/2, 1/2); dCE/dlogits = (-1/2, 1/2);
    # one SGD step from zero weights (momentum and weight decay add nothing yet): W -= 0.1 * g x^T
    assert adversary[1].weight.flatten().tolist() == pytest.approx([0.05, 0, 0, 0, -0.05, 0, 0, 0])
    assert adversary[1].bias.tolist() == pytest.approx([0.05, -0.05])
    assert model[1].weight.abs().sum() == 0  # the global model is untouched
    assert a3fl.similarity(_tiny([[1, 0, 0, 0], [0] * 4]), _tiny([[1, 1, 0, 0], [0] * 4])) == pytest.approx(
        1 / math.sqrt(2)
    )


@pytest.mark.parametrize(("lambda_", "direction"), [(0.0, +1), (0.1, +1), (1.0, -1)])
def test_a3fl_trigger_step_descends_both_models_losses_by_the_sign(lambda_, direction):
    model, adversary = _tiny([[0] * 4, [2, 0, 0, 0]]), _tiny([[3, 0, 0, 0], [0] * 4])
    mask = torch.zeros(2, 2, dtype=torch.bool)
    mask[0, 0] = True
    pattern = torch.full((1, 2, 2), 0.5)
    # target 1, p = 0.5: model logits (0, 2p) -> dCE/dp = 2 (s1 - 1) = -0.538;
    # adversary logits (3p, 0) -> dCE/dp = 3 s0' = +2.453; total -0.538 + lambda * 2.453
    stepped = a3fl.trigger_step(
        model, [(adversary, lambda_)], pattern, mask, torch.zeros(1, 1, 2, 2), 1, identity, 0.1
    )
    assert stepped[0, 0, 0] == pytest.approx(0.5 - 0.1 * -direction)
    assert stepped[0, 0, 1:].tolist() == [0.5] and stepped[0, 1].tolist() == [0.5, 0.5]


def test_a3fl_search_is_deterministic_and_leaves_the_model_alone():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = torch.rand(12, 1, 4, 4), torch.arange(12) % 3
    trigger = square_trigger((1, 4, 4), 2).with_pattern(torch.full((1, 4, 4), 0.5))
    kwargs = dict(epochs=2, lr=0.05, adv_epochs=1, adv_lr=0.01, lambda0=0.01, batch_size=5, seed=4)
    first = a3fl.search_trigger(model, trigger.pattern, trigger.mask, images, labels, 2, identity, **kwargs)
    second = a3fl.search_trigger(model, trigger.pattern, trigger.mask, images, labels, 2, identity, **kwargs)
    assert torch.equal(first, second) and not torch.equal(first, trigger.pattern)
    assert torch.equal(first[:, ~trigger.mask], trigger.pattern[:, ~trigger.mask])
    # 2 epochs x 3 batches of +-0.05 steps: the masked pixels moved by a multiple of 0.05, at most 0.3
    moved = (first - trigger.pattern)[:, trigger.mask].abs()
    assert float(moved.max()) <= 0.3 + 1e-6
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()) and model.training


# ---------------------------------------------------------------- relay, local rounds, simulations


def _reply(content: RecordDict, node: int = 1) -> Message:
    instruction = Message(RecordDict({}), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(content, reply_to=instruction)


def test_trigger_relay_averages_the_attackers_and_attaches_the_latest(task_identity):
    relay, config = TriggerRelay(), ConfigRecord({})
    relay.attach(config)
    assert RELAY_KEY not in config
    base = square_trigger((1, 4, 4), 2)
    replies = [
        _reply(RecordDict({"trigger": reply_record(base.with_pattern(torch.full((1, 4, 4), value)), pid)}))
        for pid, value in ((3, 0.2), (1, 0.6))
    ]
    instruction = Message(RecordDict({}), dst_node_id=3, message_type=MessageType.TRAIN)
    failed = Message(Error(code=1, reason="crashed"), reply_to=instruction)
    relay.collect([*replies, _reply(RecordDict({}), 2), failed])
    assert torch.allclose(relay.current.pattern, torch.full((1, 4, 4), 0.4))
    relay.attach(config)
    assert torch.equal(Trigger.from_bytes(bytes(config[RELAY_KEY])).pattern, relay.current.pattern)
    previous = relay.current
    relay.collect([_reply(RecordDict({}), 2)])  # a round without attackers keeps the trigger
    assert relay.current is previous


@needs_data
@pytest.mark.parametrize("attack", ["f3ba", "a3fl"])
def test_an_optimising_attacker_trains_on_its_refined_trigger(attack):
    config = resolve_config(FMNIST, {"attack": attack})
    task = load_task(config)
    partition = attacker_partitions(4, 0.5, config["seed"], "pool")[0]
    state = model_for(task, config).state_dict()
    start = initial_trigger(config, (1, 28, 28))
    result = local_update(config, partition, 1, state)
    assert result.attacking and result.trigger is not None
    assert torch.equal(result.trigger.mask, start.mask) and not torch.equal(
        result.trigger.pattern, start.pattern
    )
    again = local_update(config, partition, 1, state)
    assert torch.equal(again.trigger.pattern, result.trigger.pattern)  # deterministic per seed
    relayed = local_update(config, partition, 2, state, trigger=result.trigger)
    assert not torch.equal(relayed.trigger.pattern, result.trigger.pattern)  # refined further
    benign = local_update(config, next(p for p in range(4) if p != partition and p not in
                                       attacker_partitions(4, 0.5, 0, "pool")), 1, state)  # fmt: skip
    assert not benign.attacking and benign.trigger is None


def check_simulated_run(record, setting) -> None:
    """A 2-round run of ``setting``'s trigger attack: attackers sampled, the relayed trigger refined."""
    attack, rounds = setting["attack"], record["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and record["config"]["attack"] == attack
    assert all(0.0 <= r["acc_backdoor"] <= 1.0 and math.isfinite(r["acc_main"]) for r in rounds)
    assert rounds[1]["attackers_sampled"] == 2 and rounds[1]["train_attacker"] > 0
    if attack == "dba":
        assert "attack_trigger" not in record
        return
    trigger = Trigger.from_bytes(bytes.fromhex(record["attack_trigger"]))  # relayed through both rounds
    start = initial_trigger(setting, (1, 28, 28))
    assert torch.equal(trigger.mask, start.mask) and not torch.equal(trigger.pattern, start.pattern)


@needs_data
@pytest.mark.parametrize("attack", ["dba", "a3fl"])  # f3ba: in the resume test below
def test_trigger_attack_runs_by_name_in_a_real_simulation(attack):
    """Clients and server share the run config (the attack is the clients' setting)."""
    setting = resolve_config(FMNIST, {"num-server-rounds": 2, "defense": "fedavg", "attack": attack})
    (record,) = run_experiments(setting, [setting])
    check_simulated_run(record, setting)


class InterruptError(Exception):
    """Stands for a crash after round 1's checkpoint was written (round 2's is written after its row)."""


@needs_data
def test_f3ba_runs_by_name_and_resumes_with_the_relayed_trigger(tmp_path):
    """The trigger the server relays is in the round checkpoint: resuming changes no number."""
    setting = resolve_config(FMNIST, {"num-server-rounds": 2, "defense": "fedavg", "attack": "f3ba"})
    whole = {**setting, "checkpoint-dir": str(tmp_path / "whole")}
    split = {**setting, "checkpoint-dir": str(tmp_path / "split")}
    round_2_rows = []

    def crash_the_second_run_in_round_2(row):
        if row["round"] == 2:
            round_2_rows.append(row)
            if len(round_2_rows) == 2:
                raise InterruptError

    uninterrupted, interrupted, resumed = run_experiments(
        setting, [whole, split, split], crash_the_second_run_in_round_2, keep_errors=True
    )

    check_simulated_run(uninterrupted, setting)
    assert isinstance(interrupted, InterruptError)
    assert resumed["resumed_from_round"] == 1 and resumed["attack_trigger"] == uninterrupted["attack_trigger"]

    for mine, theirs in zip(resumed["rounds"], uninterrupted["rounds"], strict=True):
        mine.pop("seconds"), theirs.pop("seconds")
        assert mine == theirs, mine["round"]  # bit for bit: replies are aggregated in partition order
