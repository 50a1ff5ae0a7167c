"""Benign federated pretraining (``pretrain-rounds``): real Flower simulations on the linear task."""

import json

import pytest
import torch

from simulation.config import resolve_config
from simulation.data import load_task
from simulation.grid import load_grid
from simulation.pretrain import cache_file, load_cached
from simulation.report import load_runs
from simulation.training import evaluate, local_update, model_for

from .simulate import run_experiments

#: Every partition malicious: any round that is not pretraining has attackers.
SMALL = {
    "task": "linear",
    "num-partitions": 4,
    "clients-per-round": 4,
    "linear-train-size": 800,
    "linear-test-size": 300,
    "malicious-fraction": 1.0,
    "num-server-rounds": 1,
    "pretrain-rounds": 3,
}


def test_pretraining_rounds_are_benign_even_for_attackers() -> None:
    config = resolve_config(SMALL)
    state = model_for(load_task(config), config).state_dict()
    assert local_update(config, 0, 1, state).attacking
    assert not local_update(config, 0, 1, state, pretrain=True).attacking


@pytest.fixture(scope="module")
def pretrained_runs(tmp_path_factory):
    """The same run twice with a pretrain cache, and once more with another defense."""
    cache = tmp_path_factory.mktemp("pretrained")
    config = resolve_config({**SMALL, "pretrain-cache": str(cache)})
    first, again, other = run_experiments(config, [config, config, {**config, "defense": "fedavg"}])
    return cache, first, again, other


def test_run_starts_from_the_pretrained_model(pretrained_runs):
    cache, first, _, _ = pretrained_runs
    summary = first["pretrain"]
    assert summary["rounds"] == 3 and summary["cached"] is False
    start = next(row for row in first["rounds"] if row["round"] == 0)
    # Round 0 evaluates the model the experiment starts from: the pretrained one (the
    # cached file, evaluated here independently), which learnt the task (a fresh
    # linear model is near chance on it).
    config = resolve_config(SMALL)
    task = load_task(config)
    pretrained = model_for(task, config)
    (saved,) = cache.glob("pretrained-*.pt")
    pretrained.load_state_dict(load_cached(saved, pretrained.state_dict()))
    _, pretrained_acc = evaluate(pretrained, task.test_x, task.test_y, task.preprocess)
    assert start["acc_main"] == pytest.approx(pretrained_acc)
    assert summary["acc_main"] == start["acc_main"]
    assert summary["acc_main"] > 0.7
    fresh = model_for(task, config)
    _, fresh_acc = evaluate(fresh, task.test_x, task.test_y, task.preprocess)
    assert summary["acc_main"] > fresh_acc + 0.1


def test_pretrained_model_is_cached_and_shared_across_defenses(pretrained_runs):
    cache, first, again, other = pretrained_runs
    files = sorted(cache.glob("pretrained-*.pt"))
    assert len(files) == 1
    assert again["pretrain"]["cached"] is True and other["pretrain"]["cached"] is True
    for record in (again, other):
        assert record["pretrain"]["acc_main"] == first["pretrain"]["acc_main"]
        assert record["pretrain"]["acc_backdoor"] == first["pretrain"]["acc_backdoor"]
    # The experiment's round 1 has attackers (every partition is malicious) and
    # its record differs by defense, while the starting model is the same.
    assert first["rounds"][-1]["attackers_sampled"] == 4


def test_cache_key_depends_on_training_settings_only(tmp_path):
    config = resolve_config({**SMALL, "pretrain-cache": str(tmp_path)})
    same = resolve_config({**SMALL, "pretrain-cache": str(tmp_path), "defense": "krum", "attack": "pgd"})
    other_seed = resolve_config({**SMALL, "pretrain-cache": str(tmp_path), "seed": 1})
    longer = resolve_config({**SMALL, "pretrain-cache": str(tmp_path), "pretrain-rounds": 4})
    assert cache_file(config) == cache_file(same)
    assert len({cache_file(config), cache_file(other_seed), cache_file(longer)}) == 3
    assert cache_file(resolve_config(SMALL)) is None


def test_unreadable_or_mismatched_cache_file_is_named(tmp_path):
    config = resolve_config(SMALL)
    template = model_for(load_task(config), config).state_dict()
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="corrupt.pt.*cannot be read"):
        load_cached(corrupt, template)
    wrong = tmp_path / "wrong.pt"
    torch.save({key: torch.zeros(3) for key in template}, wrong)
    with pytest.raises(ValueError, match="wrong.pt.*shape"):
        load_cached(wrong, template)
    missing = tmp_path / "missing.pt"
    torch.save({"weight": template["weight"]}, missing)
    with pytest.raises(ValueError, match="missing.pt.*state dict"):
        load_cached(missing, template)


def test_grid_shares_one_pretrain_cache_under_its_output(tmp_path):
    spec_file = tmp_path / "grid.toml"
    spec_file.write_text(
        f'output = "{tmp_path / "out"}"\ndefenses = ["fedavg", "invariant"]\n'
        '[base]\ntask = "linear"\npretrain-rounds = 5\n'
    )
    runs = load_grid(spec_file).runs()
    assert {overrides["pretrain-cache"] for _, overrides in runs} == {str(tmp_path / "out" / "pretrained")}
    assert json.dumps(runs)  # overrides stay JSON-serialisable for config.json


def test_report_leaves_the_pretrain_cache_out(tmp_path):
    (tmp_path / "pretrained").mkdir()
    (tmp_path / "pretrained" / "pretrained-0123456789abcdef.pt").write_bytes(b"")
    (tmp_path / "broken-run").mkdir()
    runs, skipped = load_runs(tmp_path)
    assert runs == [] and list(skipped) == ["broken-run"]
