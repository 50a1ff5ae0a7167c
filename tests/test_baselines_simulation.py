"""Every defense by name in a real 2-round Flower simulation (one federation, one run each)."""

import math

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

import baselines
from simulation.client_app import make_client_app
from simulation.config import resolve_config
from simulation.server_app import run_experiment

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
    records = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        for name in baselines.defense_names():
            records[name] = run_experiment(grid, resolve_config(CONFIG, {"defense": name}))

    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"address": "local", "num_cpus": 2},
    }
    run_simulation(server_app, make_client_app(CONFIG), CONFIG["num-partitions"], backend_config=backend)

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
