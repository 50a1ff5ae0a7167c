"""Every defense by name in a real 2-round Flower simulation (one federation, one run each)."""

import math

import baselines
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
    assert records["invariant-bloc-exclusion"]["rounds"][1]["train_num_bloc_excluded"] >= 0
    assert 0.0 <= records["robust-lr"]["rounds"][1]["train_robust_lr_flipped_fraction"] <= 1.0
    assert records["fltrust"]["rounds"][1]["train_fltrust_server_norm"] > 0  # trained on its root dataset
    assert records["deepsight"]["rounds"][1]["train_num_clusters"] >= 1  # probed the models' outputs
    assert 1 <= records["alignins"]["rounds"][1]["train_num_admitted"] <= 8
    assert records["crfl"]["rounds"][1]["train_crfl_clip_bound"] == 2.1
    assert records["multi-metrics"]["rounds"][1]["train_num_admitted"] == 2  # int(0.3 * 8)
    flain_final = records["flain"]["rounds"][-1]
    assert "flain_flipped" in flain_final and "before_repair_acc_main" in flain_final
