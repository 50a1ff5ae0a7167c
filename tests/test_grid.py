"""The launcher, experiment grids and reports, through real Flower simulations on Ray."""

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import ray
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from simulation import launcher
from simulation.__main__ import main as cli
from simulation.grid import is_completed, load_grid, run_grid, run_into
from simulation.launcher import Resources, backend_config, gpu_share
from simulation.report import write_report

GRID = """
name = "smoke"
output = "{output}"
defenses = ["fedavg", "invariant"]
attacks = ["blackbox"]
seeds = [0, 1]

[base]
task = "linear"
num-server-rounds = 2
num-partitions = 6
clients-per-round = 6
linear-train-size = 1200
linear-test-size = 300
"""


@pytest.fixture(scope="module")
def grid_output(tmp_path_factory):
    """A 2-round grid (linear task, FedAvg and Invariant, seeds 0 and 1), run once for the module."""
    root = tmp_path_factory.mktemp("grid")
    config = root / "smoke.toml"
    config.write_text(GRID.format(output=root / "results"))
    spec = load_grid(config)
    run_dirs = run_grid(spec, progress=False)
    return config, spec, run_dirs


def read_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grid_writes_metrics_and_config_for_every_run(grid_output):
    _, spec, run_dirs = grid_output
    assert sorted(d.name for d in run_dirs) == sorted(
        f"{d}__blackbox__seed{s}" for d in ("fedavg", "invariant") for s in (0, 1)
    )
    for run_dir in run_dirs:
        meta = json.loads((run_dir / "config.json").read_text())
        assert meta["completed"] is True and meta["grid"] == "smoke"
        assert meta["run"]["num-server-rounds"] == 2 and meta["run"]["lr"] == 0.1  # resolved
        assert {"flwr", "torch", "numpy", "python", "git-commit"} <= set(meta["versions"])
        rows = read_rows(run_dir)
        assert [r["round"] for r in rows] == [0, 1, 2]
        for row in rows:
            assert {"acc_main", "acc_backdoor", "loss", "seconds"} <= set(row)
            assert 0 <= row["acc_main"] <= 1 and row["seconds"] >= 0
        if run_dir.name.startswith("invariant"):
            assert 0 <= rows[1]["train_mask_fraction"] <= 1 and rows[1]["train_num_aggregated"] == 6


def test_same_seed_gives_the_same_numbers(grid_output, tmp_path):
    _, spec, run_dirs = grid_output
    original = next(d for d in run_dirs if d.name == "invariant__blackbox__seed0")
    meta = json.loads((original / "config.json").read_text())
    run_into(tmp_path / "again", meta["overrides"], spec.resources, progress=False)

    def numbers(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    again, first = numbers(read_rows(tmp_path / "again")), numbers(read_rows(original))
    assert [r["acc_main"] for r in again] == [r["acc_main"] for r in first]  # bit for bit
    for row, reference in zip(again, first, strict=True):
        # client metrics are averaged in reply-arrival order: equal up to the last bit
        assert row == pytest.approx(reference, rel=1e-9)
    other_seed = next(d for d in run_dirs if d.name == "invariant__blackbox__seed1")
    assert numbers(read_rows(other_seed)) != numbers(read_rows(original))


def test_completed_runs_are_skipped_and_unfinished_ones_rerun(grid_output, monkeypatch):
    _, spec, run_dirs = grid_output
    unfinished = run_dirs[0]
    meta = json.loads((unfinished / "config.json").read_text())
    (unfinished / "config.json").write_text(json.dumps({**meta, "completed": False}))
    reran = []

    def fake_run_into(run_dir, overrides, resources, grid="", progress=True):
        reran.append(run_dir.name)
        (run_dir / "config.json").write_text(json.dumps({**meta, "completed": True}))

    monkeypatch.setattr("simulation.grid.run_into", fake_run_into)
    run_grid(spec, progress=False)
    assert reran == [unfinished.name]
    assert all(is_completed(d) for d in run_dirs)


def test_report_table_and_plots_from_the_grid(grid_output, tmp_path):
    _, spec, run_dirs = grid_output
    files = write_report(spec.output, tmp_path)
    table = files.markdown.read_text()
    assert "| fedavg |" in table and "| invariant |" in table
    final = [read_rows(d)[-1]["acc_backdoor"] for d in run_dirs if d.name.startswith("invariant")]
    assert f"{np.mean(final):.3f} ± {np.std(final):.3f}" in table
    rows = list(csv.DictReader(files.csv.open()))
    assert {r["defense"] for r in rows} == {"fedavg", "invariant"} and all(r["seeds"] == "2" for r in rows)
    assert len(files.plots) == 2
    for plot in files.plots:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000


def test_cli_report(grid_output, tmp_path, capsys):
    _, spec, _ = grid_output
    cli(["report", str(spec.output), "--out", str(tmp_path)])
    assert "| invariant |" in capsys.readouterr().out
    assert (tmp_path / "report.csv").exists()


def test_grid_file_errors_name_the_key_or_value(tmp_path):
    def grid_file(text, suffix=".toml"):
        path = tmp_path / f"g{suffix}"
        path.write_text(text)
        return path

    with pytest.raises(ValueError, match=r"unknown key\(s\) \['rounds'\]"):
        load_grid(grid_file('rounds = 3\ndefenses = ["fedavg"]'))
    with pytest.raises(ValueError, match=r"unknown run-config key\(s\) in \[base\]: \['learning-rate'\]"):
        load_grid(grid_file("[base]\nlearning-rate = 0.1"))
    with pytest.raises(ValueError, match="'defense' must be one of fedavg, invariant, krum"):
        load_grid(grid_file('defenses = ["fedavg", "bogus"]'))
    with pytest.raises(ValueError, match="'attack' must be one of none, blackbox"):
        load_grid(grid_file('attacks = ["sneaky"]'))
    with pytest.raises(ValueError, match=r"unknown resources key\(s\) \['gpus'\]"):
        load_grid(grid_file("[resources]\ngpus = 1"))
    spec = load_grid(grid_file("defenses: [krum]\nseeds: [3]\nbase: {task: linear}\n", ".yaml"))
    assert spec.runs() == [
        ("krum__blackbox__seed3", {"task": "linear", "defense": "krum", "attack": "blackbox", "seed": 3})
    ]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("tau", 1.5, r"run config 'tau' must be in \[0, 1\], got 1.5"),
        ("trim-ratio", 0.5, r"run config 'trim-ratio' must be in \[0, 0.5\), got 0.5"),
        ("server-learning-rate", 0, r"run config 'server-learning-rate' must be a finite number > 0, got 0"),
    ],
)
def test_bad_strategy_parameters_are_rejected_before_any_data_is_loaded(
    tmp_path, monkeypatch, key, value, message
):
    monkeypatch.setattr("simulation.data.load_task", lambda *a, **k: pytest.fail("data loaded"))
    monkeypatch.setattr("simulation.grid.run_into", lambda *a, **k: pytest.fail("training started"))
    path = tmp_path / "g.toml"
    path.write_text(
        f'defenses = ["invariant"]\n[base]\ntask = "fmnist"\npretrain-rounds = 30\n{key} = {value}\n'
    )
    with pytest.raises(ValueError, match=message):
        load_grid(path)
    with pytest.raises(SystemExit, match=message):
        cli(["run", "--out", str(tmp_path / "run"), "--set", f"{key}={value}"])


def test_unwritable_output_is_reported_before_training(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    path = tmp_path / "g.toml"
    path.write_text(f'output = "{blocker / "results"}"\n[base]\ntask = "linear"\n')
    monkeypatch.setattr("simulation.grid.run_into", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(PermissionError, match="is not writable"):
        run_grid(load_grid(path))


def test_gpu_share_rules():
    assert gpu_share(Resources(gpus_per_client="auto"), num_gpus=2, clients_per_round=8) == 0.25
    assert gpu_share(Resources(gpus_per_client="auto", concurrency=1), num_gpus=2, clients_per_round=8) == 1.0
    assert gpu_share(Resources(gpus_per_client=0.5), num_gpus=1, clients_per_round=8) == 0.5
    with pytest.raises(RuntimeError, match="no CUDA GPU is visible"):
        gpu_share(Resources(gpus_per_client=0.25), num_gpus=0, clients_per_round=8)
    assert gpu_share(Resources(gpus_per_client="auto", allow_cpu_fallback=True), 0, 8) == 0.0
    with pytest.raises(ValueError, match="gpus-per-client"):
        Resources(gpus_per_client=2)
    config = {"clients-per-round": 4}
    attached = backend_config(Resources(ray_address="auto"), config, num_gpus=0)["init_args"]
    assert attached["address"] == "auto" and "num_cpus" not in attached
    own = backend_config(Resources(), config, num_gpus=0)["init_args"]
    assert own["address"] == "local" and own["num_cpus"] >= 1  # never a cluster `ray start` left


def test_requested_client_resources_reach_rays_scheduler(caplog):
    """Ray is told of one GPU; each virtual client asks for a quarter and reports what Ray gave it."""
    assigned = []
    client_app = ClientApp()

    @client_app.train()
    def train(message: Message, context: Context) -> Message:
        resources = ray.get_runtime_context().get_assigned_resources()
        metrics = MetricRecord(
            {"num-examples": 1, "gpu": resources.get("GPU", 0.0), "cpu": resources.get("CPU", 0.0)}
        )
        content = RecordDict({"arrays": message.content["arrays"], "metrics": metrics})
        return Message(content, reply_to=message)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        from flwr.serverapp.strategy import FedAvg

        # min_train_nodes=4: Flower sizes the sample before waiting for nodes, so it
        # would otherwise train on min_train_nodes (2) when nodes connect late.
        strategy = FedAvg(
            fraction_evaluate=0.0, min_train_nodes=4, min_available_nodes=4, train_metrics_aggr_fn=collect
        )
        strategy.start(grid=grid, initial_arrays=ArrayRecord([np.zeros(2)]), num_rounds=1)

    def collect(contents, key):
        assigned.extend((c["metrics"]["cpu"], c["metrics"]["gpu"]) for c in contents)
        return MetricRecord({})

    backend = backend_config(
        Resources(cpus_per_client=0.5, gpus_per_client=0.25), {"clients-per-round": 4}, 1
    )
    assert backend["client_resources"] == {"num_cpus": 0.5, "num_gpus": 0.25}
    logging.getLogger("flwr").setLevel(logging.INFO)
    run_simulation(server_app, client_app, 4, backend_config=backend)
    assert assigned == [(0.5, 0.25)] * 4


def test_launcher_refuses_gpu_request_without_gpu(monkeypatch):
    monkeypatch.setattr(launcher, "visible_gpus", lambda: 0)
    with pytest.raises(RuntimeError, match="allow-cpu-fallback"):
        launcher.run({"task": "linear"}, Resources(gpus_per_client="auto"), progress=False)


COMMITTED_GRIDS = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", COMMITTED_GRIDS, ids=lambda p: p.name)
def test_every_committed_grid_file_is_valid(path):
    spec = load_grid(path)
    assert spec.runs(), f"{path.name} defines no runs"


def test_grid_cells_are_a_union_of_products_each_run_once(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text(
        '[base]\ntask = "linear"\n'
        '[[cells]]\ndefenses = ["fedavg", "invariant"]\nattacks = ["blackbox"]\nseeds = [0, 1]\n'
        '[[cells]]\ndefenses = ["invariant", "robust-lr"]\nattacks = ["blackbox", "pgd"]\n'
    )
    names = [name for name, _ in load_grid(path).runs()]
    assert names == [
        "fedavg__blackbox__seed0",
        "fedavg__blackbox__seed1",
        "invariant__blackbox__seed0",
        "invariant__blackbox__seed1",
        "invariant__pgd__seed0",
        "robust-lr__blackbox__seed0",
        "robust-lr__pgd__seed0",
    ]
    path.write_text('[[cells]]\ndefenses = ["fedavg"]\nrounds = 3\n')
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['rounds'\] in cell 1"):
        load_grid(path)
    path.write_text('[[cells]]\ndefenses = ["fedavg"]\nattacks = ["sneaky"]\n')
    with pytest.raises(ValueError, match="'attack' must be one of"):
        load_grid(path)
