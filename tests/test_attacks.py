"""Poisoned sets, PGD projection, model replacement and acc_backdoor, with real torch training."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from simulation import attacks
from simulation.config import resolve_config
from simulation.data import load_partitions, load_task
from simulation.training import backdoor_accuracy, local_update, model_for, train

DATA_ROOT = Path(
    os.environ.get("FLWR_INVARIANT_DATA_ROOT", Path(__file__).resolve().parents[2] / "shared" / "data")
)
needs_data = pytest.mark.skipif(
    not DATA_ROOT.is_dir(), reason=f"offline data not found at {DATA_ROOT} (set FLWR_INVARIANT_DATA_ROOT)"
)


def fmnist_config(**overrides) -> dict:
    base = {
        "task": "fmnist",
        "data-root": str(DATA_ROOT),
        "num-partitions": 10,
        "clients-per-round": 5,
        "train-size": 3000,
        "partition": "iid",
    }
    return resolve_config({**base, **overrides})


def _rows_in(rows: torch.Tensor, pool: torch.Tensor) -> bool:
    flat_pool = {bytes(p.flatten().numpy()) for p in pool}
    return all(bytes(r.flatten().numpy()) in flat_pool for r in rows)


@needs_data
def test_edge_case_poisoned_set_composition() -> None:
    config = fmnist_config(**{"edge-case-samples": 100, "clean-samples": 200})
    task = load_task(config)
    own = load_partitions(config)[3]
    x, y, num_bad = attacks.poisoned_dataset(task, own, config, np.random.default_rng(0))
    assert num_bad == 100 and len(x) == len(y) == 300
    assert (y[:100] == 1).all()  # edge-case samples carry the target label
    assert _rows_in(x[:100], task.edge_train_x)  # ... and are ARDIS training 7s
    assert len({bytes(r.numpy()) for r in x[:100]}) == 66  # all 66 used before any repeats
    clean_rows = torch.from_numpy(own)
    assert _rows_in(x[100:], task.train_x[clean_rows])  # clean part from the attacker's own partition
    # clean labels are the true ones
    lookup = {bytes(task.train_x[i].numpy()): int(task.train_y[i]) for i in own}
    assert [lookup[bytes(r.numpy())] for r in x[100:]] == y[100:].tolist()
    small = fmnist_config(**{"edge-case-samples": 40, "clean-samples": 10_000})
    x, y, num_bad = attacks.poisoned_dataset(task, own, small, np.random.default_rng(0))
    assert num_bad == 40 and len(y) == 40 + len(own)  # at most the whole partition as clean data


@needs_data
def test_pixel_trigger_poisoned_set_and_backdoor_test_set() -> None:
    config = fmnist_config(
        backdoor="pixel", **{"edge-case-samples": 50, "clean-samples": 50, "trigger-size": 3}
    )
    task = load_task(config)
    own = load_partitions(config)[0]
    x, y, num_bad = attacks.poisoned_dataset(task, own, config, np.random.default_rng(1))
    assert num_bad == 50 and (y[:50] == 1).all()
    assert (x[:50, :, -3:, -3:] == 255).all()
    untriggered = x[:50].clone()
    untriggered[:, :, -3:, -3:] = 0
    sources = task.train_x[torch.from_numpy(own)][task.train_y[torch.from_numpy(own)] != 1].clone()
    sources[:, :, -3:, -3:] = 0
    assert _rows_in(untriggered, sources)  # triggered copies of the attacker's non-target images
    test_inputs = attacks.backdoor_test_inputs(task, config)
    assert len(test_inputs) == int((task.test_y != 1).sum()) and (test_inputs[:, :, -3:, -3:] == 255).all()


def test_backdoor_accuracy_is_fraction_predicted_as_target() -> None:
    model = nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        model.bias.zero_()
    inputs = torch.tensor([[2.0, 1.0], [0.0, 5.0], [-1.0, -1.0], [3.0, 0.0], [1.0, 4.0]])
    # predictions: 0, 1, 2, 0, 1
    assert backdoor_accuracy(model, inputs, 1, lambda t: t) == pytest.approx(2 / 5)
    assert backdoor_accuracy(model, inputs, 0, lambda t: t, batch_size=2) == pytest.approx(2 / 5)
    assert backdoor_accuracy(model, inputs, 2, lambda t: t) == pytest.approx(1 / 5)


def _linear_setup(**overrides):
    config = resolve_config(
        {
            "task": "linear",
            "num-partitions": 10,
            "clients-per-round": 5,
            "linear-train-size": 2000,
            "partition": "iid",
            **overrides,
        }
    )
    task = load_task(config)
    return config, task, model_for(task, config)


@pytest.mark.parametrize("eps", [0.05, 0.5])
def test_pgd_keeps_update_inside_ball(eps: float) -> None:
    config, task, model = _linear_setup()
    reference = attacks.global_snapshot(model)
    x, y, _ = attacks.poisoned_dataset(task, load_partitions(config)[0], config, np.random.default_rng(0))
    before: list[float] = []
    after: list[float] = []
    hook = attacks.pgd_hook(model, reference, eps, every=2)

    def after_step(step: int) -> None:
        before.append(attacks.update_norm(model, reference))
        hook(step)
        if step % 2 == 0:
            after.append(attacks.update_norm(model, reference))

    train(model, x, y, task.preprocess, epochs=3, batch_size=16, lr=0.5, after_step=after_step)
    attacks.project_l2_(model, reference, eps)
    assert max(before) > eps  # unconstrained optimizer steps do leave the ball ...
    assert after and max(after) <= eps * (1 + 1e-5)  # ... and every projection brings the model back
    assert attacks.update_norm(model, reference) <= eps * (1 + 1e-5)


def test_projection_is_noop_inside_ball() -> None:
    model = nn.Linear(3, 2)
    reference = attacks.global_snapshot(model)
    with torch.no_grad():
        model.weight.add_(0.01)
    delta = [p.detach() - r for p, r in zip(model.parameters(), reference, strict=True)]
    assert attacks.project_l2_(model, reference, eps=10.0) < 10.0
    for p, r, d in zip(model.parameters(), reference, delta, strict=True):
        torch.testing.assert_close(p.detach() - r, d)


def test_replacement_scaling() -> None:
    model = nn.Linear(4, 2)
    reference = attacks.global_snapshot(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    delta = [p.detach() - r for p, r in zip(model.parameters(), reference, strict=True)]
    attacks.scale_update_(model, reference, 7.5)
    for p, r, d in zip(model.parameters(), reference, delta, strict=True):
        torch.testing.assert_close(p.detach() - r, 7.5 * d)
    config = resolve_config({"num-partitions": 100, "clients-per-round": 20})
    assert attacks.replacement_factor(config, 50_000, 500) == pytest.approx(20 * 500 / 500)  # estimate
    config = resolve_config({"replace-total-examples": 12_000})
    assert attacks.replacement_factor(config, 50_000, 500) == pytest.approx(24.0)  # known total


def test_local_update_pgd_replace_end_to_end() -> None:
    config, task, model = _linear_setup(
        attack="pgd-replace", **{"malicious-fraction": 1.0, "pgd-eps": 0.3, "lr": 0.5}
    )
    result = local_update(config, 2, 1, model.state_dict())
    assert result.attacking and result.num_examples == 100 + 200  # 200 = the whole IID partition
    factor = attacks.replacement_factor(config, len(task.train_y), result.num_examples)
    assert factor == pytest.approx(5 * 2000 / 10 / 300)
    assert result.update_norm == pytest.approx(0.3 * factor, rel=1e-4)  # PGD onto eps, then scaled
    benign = local_update({**config, "malicious-fraction": 0.0}, 2, 1, model.state_dict())
    assert not benign.attacking and benign.num_examples == 200
