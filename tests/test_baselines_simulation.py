"""Every defense by name in a real 2-round Flower simulation (one federation, one run each)."""

import math

import baselines
from flwr_invariant.mask_rules import CLIENT_SELECTING_RULES
from simulation.config import resolve_config

from .simulate import run_experiments

CONFIG = {
    "task": "linear",
    "num-partitions": 8,
    "clients-per-round": 8,
    "linear-train-size": 1600,
    "linear-test-size": 400,
    "num-server-rounds": 2,
    "malicious-fraction": 0.25,
}


def test_every_defense_runs_two_rounds_by_name():
    names = baselines.defense_names()
    results = run_experiments(CONFIG, [resolve_config(CONFIG, {"defense": name}) for name in names])
    records = dict(zip(names, results, strict=True))

    assert sorted(records) == sorted(baselines.defense_names())
    for name, record in records.items():
        rounds = record["rounds"]
        assert [r["round"] for r in rounds] == [0, 1, 2], name
        assert all(math.isfinite(r["acc_main"]) and math.isfinite(r["loss"]) for r in rounds), name
        assert record["config"]["defense"] == name
        assert rounds[1]["train_num_aggregated"] == 8, name
    assert 0.0 < records["invariant-collusion"]["rounds"][1]["train_min_vote_weight"] <= 1.0
    for rule in CLIENT_SELECTING_RULES:
        name = f"invariant-{rule}"
        assert records[name]["rounds"][1]["train_num_bloc_excluded"] >= 0
    # no client has taken part in 5 rounds yet, so no record is judged
    record_round = records["invariant-record-departure-exclusion"]["rounds"][2]
    assert record_round["train_num_record_excluded"] == record_round["train_num_record_banned"] == 0
    assert (
        0.0
        <= records["invariant-persistent-departure-exclusion"]["rounds"][1]["train_lean_held_fraction"]
        <= 1
    )
    assert 0.0 <= records["robust-lr"]["rounds"][1]["train_robust_lr_flipped_fraction"] <= 1.0
    assert records["fltrust"]["rounds"][1]["train_fltrust_server_norm"] > 0  # trained on its root dataset
    assert records["deepsight"]["rounds"][1]["train_num_clusters"] >= 1  # probed the models' outputs
    assert 1 <= records["alignins"]["rounds"][1]["train_num_admitted"] <= 8
    assert records["crfl"]["rounds"][1]["train_crfl_clip_bound"] == 2.1
    certificate = records["crfl"]["crfl_certificate"]  # 1000 noisy copies of the final model voted
    assert (certificate["copies"], certificate["inputs"], certificate["t_adv"]) == (1000, 400, 2)
    assert certificate["contraction"] == 1.0  # attacked in the last round: nothing after t_adv contracts
    assert certificate["smoothed_accuracy"] > 0.5 and min(certificate["radius_quartiles"]) >= 0.0
    assert "crfl_certificate" not in records["fedavg"]
    assert records["multi-metrics"]["rounds"][1]["train_num_admitted"] == 2  # int(0.3 * 8)
    flain_final = records["flain"]["rounds"][-1]
    assert "flain_flipped" in flain_final and "before_repair_acc_main" in flain_final


def test_crfl_smoothed_votes_are_the_models_votes_under_seeded_noise():
    from simulation.crfl_certify import smoothed_votes
    from simulation.data import load_task
    from simulation.training import model_for, predict

    config = resolve_config(CONFIG)
    task = load_task(config)
    model = model_for(task, config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = task.test_x[:50]
    plain = predict(model, x, task.preprocess)[1].numpy()
    assert (smoothed_votes(model, state, x, task, 1e-9, 3, seed=1) == plain).all()  # no noise to speak of
    noisy = smoothed_votes(model, state, x, task, 10.0, 4, seed=1)
    assert noisy.shape == (4, 50) and (noisy != plain).any()
    assert (smoothed_votes(model, state, x, task, 10.0, 4, seed=1) == noisy).all()  # seeded
