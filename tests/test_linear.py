"""The linear backdoor task (paper Sec. 5): data, and that it really backdoors a plain average."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simulation import attacks
from simulation.config import resolve_config
from simulation.data import load_partitions, load_task, make_linear_task
from simulation.training import backdoor_accuracy, evaluate, model_for, train


def test_linear_task_shapes_and_trigger() -> None:
    task = make_linear_task(20, 4000, 1000, signal=0.3, trigger=4.0, target=1, seed=0)
    assert task.train_x.shape == (4000, 21) and task.train_x.dtype == torch.float32
    assert task.edge_test_x.shape == (1000, 21) and not task.is_image
    assert abs(float(task.train_x[:, -1].mean())) < 0.1  # benign clients: mu_k = 0 on the trigger feature
    assert float(task.edge_train_x[:, -1].mean()) == pytest.approx(4.0, abs=0.15)  # attacker: mu_k = 4
    # trigger feature independent of the label on clean data
    for label in (0, 1):
        assert abs(float(task.train_x[task.train_y == label, -1].mean())) < 0.1
    # edge-case points look like the non-target class (0) on the informative features
    assert float(task.edge_test_x[:, :-1].mean()) == pytest.approx(-0.3, abs=0.05)
    again = make_linear_task(20, 4000, 1000, signal=0.3, trigger=4.0, target=1, seed=0)
    assert torch.equal(task.train_x, again.train_x)


def _fit(config, x, y) -> tuple[float, float]:
    task = load_task(config)
    model = model_for(task, config)
    train(model, x, y, task.preprocess, epochs=20, batch_size=64, lr=0.1, momentum=0.9)
    _, acc = evaluate(model, task.test_x, task.test_y, task.preprocess)
    return acc, backdoor_accuracy(model, task.edge_test_x, 1, task.preprocess)


def test_poisoned_training_backdoors_the_linear_model() -> None:
    config = resolve_config(
        {
            "task": "linear",
            "num-partitions": 10,
            "clients-per-round": 5,
            "linear-train-size": 4000,
            "partition": "iid",
        }
    )
    task = load_task(config)
    clean_acc, clean_backdoor = _fit(config, task.train_x, task.train_y)
    assert clean_acc > 0.85 and clean_backdoor < 0.2
    x, y, _ = attacks.poisoned_dataset(task, load_partitions(config)[0], config, np.random.default_rng(0))
    poisoned_acc, poisoned_backdoor = _fit(config, x, y)
    assert poisoned_backdoor > max(0.6, clean_backdoor + 0.5) and poisoned_acc > 0.8  # main task still fine
