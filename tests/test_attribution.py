"""simulation.attribution: the four mask/trimmed-mean combinations, checked against the production core."""

import numpy as np
import pytest
import torch

from flwr_invariant.aggregate import invariant_aggregate, invariant_update
from simulation.attacks import backdoor_test_inputs
from simulation.attribution import (
    attribute_round,
    backdoor_margin,
    combined_steps,
    main,
    pair_agreement,
    sample_round,
    start_state,
)
from simulation.config import resolve_config
from simulation.data import load_task
from simulation.partition import attacker_partitions
from simulation.training import local_update, model_for, predict

LINEAR = {
    "task": "linear",
    "num-partitions": 10,
    "clients-per-round": 6,
    "linear-train-size": 1000,
    "linear-test-size": 300,
    "malicious-fraction": 0.4,
    "lr": 0.1,
}


def test_combined_steps_take_mask_and_values_from_the_named_rounds() -> None:
    # 5 clients, tau 0.6 -> a coordinate needs |sum of signs| >= 3; trim 0.2 -> drop 1 per tail.
    clean = np.array(
        [
            [1.0, 1.0, -1.0],
            [2.0, 1.0, 1.0],
            [3.0, -1.0, 2.0],
            [4.0, -1.0, 3.0],
            [5.0, 2.0, 4.0],
        ]
    )
    attacked = clean.copy()
    attacked[3:] = [[-9.0, 3.0, -4.0], [-8.0, 3.0, -5.0]]  # the last two clients attack
    steps, stats = combined_steps(clean, attacked, tau=0.6, trim_ratio=0.2)
    # clean mask: votes 5, 1, 3 -> [1, 0, 1]; attacked mask: votes 1, 3, 1 -> [0, 1, 0].
    clean_mean = np.array([3.0, 1.0 / 3.0, 2.0])  # middle three of each column
    attacked_mean = np.array([-5.0 / 3.0, 5.0 / 3.0, -4.0 / 3.0])
    np.testing.assert_allclose(steps["clean"], clean_mean * [1, 0, 1])
    np.testing.assert_allclose(steps["mask"], clean_mean * [0, 1, 0])
    np.testing.assert_allclose(steps["values"], attacked_mean * [1, 0, 1])
    np.testing.assert_allclose(steps["attacked"], attacked_mean * [0, 1, 0])
    np.testing.assert_allclose(
        steps["attacked"], invariant_aggregate([[row] for row in attacked], 0.6, 0.2)[0]
    )
    assert stats == {"mask_clean": 2 / 3, "mask_attacked": 1 / 3, "unmasked": 1.0, "masked": 1.0}

    same, same_stats = combined_steps(clean, clean, tau=0.6, trim_ratio=0.2)
    for step in same.values():
        np.testing.assert_array_equal(step, same["clean"])
    assert same_stats["unmasked"] == same_stats["masked"] == 0.0


def test_sample_round_has_exactly_the_asked_attackers() -> None:
    config = resolve_config(LINEAR)
    malicious = set(attacker_partitions(10, 0.4, config["seed"], "pool"))
    for attackers in range(5):
        benign, bad = sample_round(config, attackers, draw=1)
        assert len(benign) + len(bad) == 6 and len(set(benign) | set(bad)) == 6
        assert set(bad) <= malicious and not set(benign) & malicious and len(bad) == attackers
    assert sample_round(config, 2, 1) == sample_round(config, 2, 1)
    assert sample_round(config, 2, 1) != sample_round(config, 2, 2)
    with pytest.raises(ValueError, match="cannot sample 5 attackers"):
        sample_round(config, 5, 0)


def test_backdoor_margin() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 1.0, 0.5]])
    assert backdoor_margin(logits, 1) == pytest.approx(((2.0 - 1.0) + (1.0 - 3.0)) / 2)


def test_attacked_step_is_the_servers_real_invariant_step() -> None:
    """The ``attacked`` model is what InvariantAggregation makes of the same clients' real training."""
    config = resolve_config(LINEAR)
    start = start_state(config)
    row = attribute_round(config, start, attackers=3, draw=0)

    benign, bad = sample_round(config, 3, 0)
    keys = list(start)
    clients = [local_update(config, pid, 1, start).state_dict for pid in benign + bad]
    new, mask_fraction = invariant_update(
        [start[k].numpy() for k in keys],
        [[state[k].numpy() for k in keys] for state in clients],
        tau=config["tau"],
        trim_ratio=config["trim-ratio"],
    )
    task = load_task(config)
    model = model_for(task, config)
    model.load_state_dict({k: torch.from_numpy(w) for k, w in zip(keys, new, strict=True)})
    logits, labels = predict(model, backdoor_test_inputs(task, config), task.preprocess)
    assert row.mask_attacked == pytest.approx(mask_fraction)
    assert row.margin["attacked"] == pytest.approx(backdoor_margin(logits, config["target-label"]), abs=1e-5)
    assert row.acc_backdoor["attacked"] == pytest.approx(
        float((labels == config["target-label"]).float().mean())
    )
    # Three attackers of six move the step: the attacked round differs from its clean counterfactual.
    assert row.margin["attacked"] != pytest.approx(row.margin["clean"], abs=1e-4)
    assert row.margin["start"] != pytest.approx(row.margin["clean"], abs=1e-4)

    clean_only = attribute_round(config, start, attackers=0, draw=0)
    assert len(set(clean_only.margin[step] for step in ("clean", "mask", "values", "attacked"))) == 1


def test_pair_agreement_by_hand() -> None:
    # four benign clients on 12 coordinates, then two attackers that copy each other
    rng = np.random.default_rng(0)
    benign = np.sign(rng.normal(size=(4, 12)))
    attacker = np.sign(rng.normal(size=12))
    grads = np.vstack([benign, attacker, attacker])
    agreement = pair_agreement(grads, 2)
    products = benign @ benign.T / 12
    off = ~np.eye(4, dtype=bool)
    assert agreement["attacker_pairs"] == 1.0
    assert agreement["benign_pairs"] == pytest.approx(products[off].mean())
    assert agreement["benign_pairs_max"] == pytest.approx(products[off].max())
    # the twins agree far above the median pair: each votes at 1 / (1 + 1)
    assert agreement["attacker_weight"] == 0.5 and agreement["benign_weight"] == 1.0
    assert np.isnan(pair_agreement(benign, 0)["attacker_pairs"])


def test_cli_prints_a_row_per_round_and_names_what_is_missing(tmp_path, capsys) -> None:
    base = "\n".join(f"{key} = {value!r}" for key, value in LINEAR.items()).replace("'", '"')
    grid = tmp_path / "grid.toml"
    grid.write_text(
        f'name = "g"\noutput = "{tmp_path / "out"}"\ndefenses = ["invariant"]\nattacks = ["blackbox"]\n'
        f"seeds = [0]\n\n[base]\n{base}\n"
    )
    main([str(grid), "--attackers", "0", "2", "--draws", "2", "--out", str(tmp_path / "rows.json")])
    table, means = capsys.readouterr().out.strip().split("\n\n")
    assert table.startswith("| attackers | draw |") and len(table.splitlines()) == 2 + 4
    rows = [line.split("|")[1:-1] for line in means.splitlines()[2:]]
    assert [[cell.strip() for cell in row[:2]] for row in rows] == [["0", "2"], ["2", "2"]]
    assert [cell.strip() for cell in rows[0][2:]] == ["0.00", "0.00", "+0.00", "+0.00", "+0.00"]
    assert (tmp_path / "rows.json").read_text().count('"attackers"') == 4

    with pytest.raises(SystemExit, match="seed 3 is not among"):
        main([str(grid), "--seed", "3"])
    with pytest.raises(SystemExit, match="cannot sample 5 attackers among 6 clients from 4 malicious"):
        main([str(grid), "--attackers", "2", "5"])
    grid.write_text(grid.read_text() + "pretrain-rounds = 2\n")
    with pytest.raises(SystemExit, match="no pretrained model at .*run the grid first"):
        main([str(grid), "--attackers", "0", "2"])
