"""Attack mode objects: the registry, the hooks local_update calls, pinned results per mode."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from simulation import attackers, attacks
from simulation.attackers import ATTACKERS, Attack, AttackContext, benign_estimates, make_attacker
from simulation.config import ATTACKS, TRIGGER_ATTACKS, resolve_config
from simulation.data import load_partitions, load_task
from simulation.partition import attacker_partitions
from simulation.training import local_update, model_for, train_as_configured

LINEAR = {"task": "linear", "num-partitions": 5, "clients-per-round": 5, "linear-train-size": 1000,
          "malicious-fraction": 0.4, "partition": "iid"}  # fmt: skip
#: Settings under which every mode's hooks bite (PGD projects, Neurotoxin freezes a lot).
PINNED = {**LINEAR, "project-every": 2, "pgd-eps": 0.3, "neurotoxin-top": 0.3, "lr": 0.5, "local-epochs": 2}


def _context(config: dict) -> AttackContext:
    """The context of partition 0 attacking on the linear task, as local_update builds it."""
    task = load_task(config)
    own = load_partitions(config)[0]
    model = model_for(task, config)
    rows = torch.from_numpy(own)
    x, y, _ = attacks.poisoned_dataset(task, own, config, np.random.default_rng(0))

    def train(net, inputs, labels, seed):
        return train_as_configured(net, inputs, labels, task, config, torch.device("cpu"), seed)

    reference = attacks.global_snapshot(model)
    return AttackContext(
        model, reference, task, task.train_x[rows], task.train_y[rows], x, y, config, 7, train
    )


def test_config_attacks_are_the_registry_and_none():
    assert len(set(ATTACKS)) == len(ATTACKS)
    assert set(ATTACKS) == {"none", *ATTACKERS}
    assert all(cls.name == name for name, cls in ATTACKERS.items())


def test_make_attacker_picks_the_configured_class_and_refuses_none():
    for name, cls in ATTACKERS.items():
        if name not in TRIGGER_ATTACKS:  # those need a pixel trigger: tests/test_trigger_attacks.py
            assert type(make_attacker(_context(resolve_config(LINEAR, {"attack": name})))) is cls
    with pytest.raises(ValueError, match="attack"):
        make_attacker(_context(resolve_config(LINEAR, {"attack": "none"})))


def test_benign_estimates_train_copies_with_distinct_batch_orders():
    context = _context(resolve_config(LINEAR, {"adaptive-estimates": 3}))
    start = copy.deepcopy(context.model.state_dict())
    estimates = benign_estimates(context)
    assert estimates.shape == (3, sum(p.numel() for p in context.model.parameters()))
    assert all(torch.equal(start[k], v) for k, v in context.model.state_dict().items())  # model untouched
    assert not torch.equal(estimates[0], estimates[1]) and not torch.equal(estimates[1], estimates[2])
    assert torch.equal(estimates, benign_estimates(context))


def test_local_update_calls_the_hooks_in_order_with_the_attackers_data(monkeypatch):
    """What a new attack (e.g. one editing its final update from benign estimates) relies on."""
    config = resolve_config(LINEAR, {"attack": "blackbox"})
    partition = attacker_partitions(5, 0.4, config["seed"], "pool")[0]
    task = load_task(config)
    global_state = model_for(task, config).state_dict()
    events = []

    class Recorder(Attack):
        name = "blackbox"

        def before(self):
            context = self.context
            rows = torch.from_numpy(load_partitions(config)[partition])
            assert torch.equal(context.own_x, task.train_x[rows]) and torch.equal(
                context.own_y, task.train_y[rows]
            )
            assert context.config is config and context.task is task
            assert attacks.update_norm(context.model, context.reference) == 0.0  # still the global model
            twin = copy.deepcopy(context.model)
            context.train(twin, context.own_x, context.own_y, context.seed + 1)
            assert attacks.update_norm(twin, context.reference) > 0
            events.append("before")

        def after_step(self, step):
            events.append(step)

        def finish(self):
            assert attacks.update_norm(self.context.model, self.context.reference) > 0  # trained
            events.append(("finish", len(self.context.y)))
            with torch.no_grad():
                for param, ref in zip(self.context.model.parameters(), self.context.reference, strict=True):
                    param.copy_(ref)

    monkeypatch.setitem(attackers.ATTACKERS, "blackbox", Recorder)
    result = local_update(config, partition, 1, global_state)
    steps = -(-(100 + 200) // config["batch-size"])  # 100 edge-case + the whole 200-example partition
    assert events == ["before", *range(1, steps + 1), ("finish", 300)]
    assert result.attacking and result.num_examples == 300
    assert result.update_norm == 0.0  # what finish() leaves in the model is what the client sends
    assert all(torch.equal(result.state_dict[k], v) for k, v in global_state.items())


# (train_loss, update_norm, trigger weight of the target minus the other class) of partition
# 0 in round 1 under PINNED, as computed before the attack modes became objects.
PINNED_RESULTS = {
    "none": (0.3142373254522681, 4.2763671875, -0.3027896285057068),
    "blackbox": (0.49969416856765747, 5.271282196044922, 3.263091802597046),
    "pgd": (0.5688000053167344, 0.29999998211860657, 0.14134971797466278),
    "pgd-replace": (0.5688000053167344, 0.9999998807907104, 0.917152464389801),
    "alie": (0.49969416856765747, 4.3281097412109375, -0.25261396169662476),
    "neurotoxin": (0.625141230225563, 4.175466060638428, 2.0132675170898438),
    # with 3 clients a round and one colluder it spends its update exactly where ALIE does
    "mask-tipping": (0.49969416856765747, 4.3281097412109375, -0.25261396169662476),
    # computed when it was added: the black-box trigger weight survives, on 4 of the 44 coordinates
    "bloc-evasion": (0.49969416856765747, 5.137474536895752, 3.263091802597046),
    # computed when it was added: pool rank 0 keeps only coordinates 0, 4, 8, ...; one of the two
    # trigger weights is among them
    "split-evasion": (0.49969418346881866, 4.645575523376465, 1.5052391290664673),
    # computed when it was added: in round 1 pool rank 0 keeps only coordinates 4, 20, 36 (share 4
    # of 16); the trigger weight at 20 is among them, as it is for split-evasion
    "rotating-evasion": (0.49969418346881866, 4.662761211395264, 1.5052391290664673),
}


@pytest.mark.parametrize("mode", [mode for mode in ATTACKS if mode not in TRIGGER_ATTACKS])
def test_every_mode_reproduces_its_pinned_result(mode):
    assert set(PINNED_RESULTS) == set(ATTACKS) - set(TRIGGER_ATTACKS)
    config = resolve_config(PINNED, {"attack": mode})
    partition = attacker_partitions(5, 0.4, config["seed"], "pool")[0]
    result = local_update(config, partition, 1, model_for(load_task(config), config).state_dict())
    weight = result.state_dict["weight"]
    trigger = float(weight[1, -1] - weight[0, -1])
    assert (result.train_loss, result.update_norm, trigger) == pytest.approx(PINNED_RESULTS[mode], rel=1e-5)
