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


@pytest.mark.parametrize("mode", ["alie", "neurotoxin"])
def test_adaptive_attackers_train_for_real(mode):
    config = resolve_config(LINEAR, {"attack": mode, "neurotoxin-top": 0.5})
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
