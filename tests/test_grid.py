"""The launcher, experiment grids and reports, through real Flower simulations on Ray.

Every run goes through the launcher's local SuperLink (``flower-superlink --simulation``
and ``flwr run``), as ``python -m simulation`` runs them.
"""

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from simulation import launcher
from simulation.__main__ import main as cli
from simulation.flower_app import write_app_dir
from simulation.grid import is_completed, load_grid, run_grid, run_into
from simulation.launcher import Resources, federation_config, gpu_share
from simulation.report import write_report

from .deploy.helpers import alive, free_port, port_open, process_tree, wait_for

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
    assert again == first  # bit for bit, the client metrics too: replies are summed by partition
    other_seed = next(d for d in run_dirs if d.name == "invariant__blackbox__seed1")
    assert numbers(read_rows(other_seed)) != numbers(read_rows(original))


def test_completed_runs_are_skipped_and_unfinished_ones_rerun(grid_output, monkeypatch):
    _, spec, run_dirs = grid_output
    unfinished = run_dirs[0]
    meta = json.loads((unfinished / "config.json").read_text())
    (unfinished / "config.json").write_text(json.dumps({**meta, "completed": False}))
    reran = []

    def fake_run_into(run_dir, overrides, resources, grid="", progress=True, verbose=False):
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
    with pytest.raises(ValueError, match=r"cpus-per-client must be a whole number >= 1 .* got 0.5"):
        Resources(cpus_per_client=0.5)


def test_federation_config_uses_flowers_simulation_config_names():
    config = {"clients-per-round": 8, "num-partitions": 30}
    local = federation_config(Resources(cpus_per_client=2, gpus_per_client="auto"), config, num_gpus=2)
    assert local == {
        "num-supernodes": 30,
        "client-resources-num-cpus": 2,
        "client-resources-num-gpus": 0.25,
        "init-args-logging-level": "error",
        "init-args-log-to-driver": False,
        "init-args-num-cpus": launcher.os.cpu_count(),
        "init-args-num-gpus": 2,
    }
    attached = federation_config(Resources(ray_address="auto"), config, num_gpus=0)
    assert "init-args-num-cpus" not in attached and "init-args-num-gpus" not in attached
    assert launcher.superlink_env(Resources(ray_address="auto"))["RAY_ADDRESS"] == "auto"
    assert launcher.superlink_env(Resources())["RAY_ADDRESS"] == "local"  # never a `ray start` cluster
    from flwr.proto.federation_config_pb2 import SimulationConfig

    # every key names a field of Flower's SimulationConfig (what `flwr run --federation-config` fills)
    fields = {field.name for field in SimulationConfig.DESCRIPTOR.fields}
    assert {key.replace("-", "_") for key in local} <= fields


#: One round of the linear task on 4 SuperNodes, FedAvg (it averages the clients' metrics).
RESOURCE_RUN = {
    "task": "linear",
    "defense": "fedavg",
    "num-server-rounds": 1,
    "num-partitions": 4,
    "clients-per-round": 4,
    "linear-train-size": 400,
    "linear-test-size": 100,
    "device": "cpu",
}


@pytest.fixture
def ray_resources_app(tmp_path, monkeypatch):
    """The Flower App with tests/deploy/ray_resources.py as ClientApp; this machine "has" one GPU."""
    monkeypatch.setattr(launcher, "visible_gpus", lambda: 1)
    module = Path(__file__).parent / "deploy" / "ray_resources.py"
    return write_app_dir(tmp_path / "app", clientapp="ray_resources:app", extra_modules=[module])


def test_requested_client_resources_reach_rays_scheduler(ray_resources_app, tmp_path):
    """Ray is told of one GPU; each virtual client asks for a quarter and reports what Ray gave it."""
    log_file = tmp_path / "flower.log"
    resources = Resources(cpus_per_client=1, gpus_per_client=0.25)
    record = launcher.run(
        RESOURCE_RUN, resources, progress=False, app_dir=ray_resources_app, flower_log=log_file
    )
    trained = record["rounds"][1]
    assert trained["train_ray-gpu"] == pytest.approx(0.25, abs=1e-6)
    assert trained["train_ray-cpu"] == pytest.approx(1.0)  # a weighted mean of 1.0s
    log_text = log_file.read_text()
    assert "Federation `@none/default` (4 simulated SuperNodes)" in log_text
    assert "FutureWarning" not in log_text and "DEPRECATED" not in log_text


@pytest.fixture
def ray_cluster(tmp_path):
    """``ray start --head --block``, 2 CPUs and 1 GPU, on a free port; stopped by pid, never ``ray stop``."""
    port = free_port()
    # A temp dir of its own: `ray start` records its address there (by default in
    # /tmp/ray/ray_current_cluster, where every later ray.init() on the machine would find it).
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths live under it
    ray_bin = Path(sys.executable).parent / "ray"
    command = [str(ray_bin), "start", "--head", "--block", "--port", str(port), "--num-cpus", "2"]
    command += ["--num-gpus", "1", "--include-dashboard", "false", "--disable-usage-stats"]
    command += ["--temp-dir", temp_dir]
    with (tmp_path / "ray.log").open("wb") as log:
        head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # noqa: S603
    try:
        log_path = tmp_path / "ray.log"

        def started() -> bool:
            if head.poll() is not None:
                raise RuntimeError(
                    f"`ray start --head` exited:\n{log_path.read_text(errors='replace')[-2000:]}"
                )
            return port_open(port) and "Ray runtime started" in log_path.read_text(errors="replace")

        wait_for(started, 180, "the Ray head")
        yield f"127.0.0.1:{port}"
    finally:
        tree = process_tree([head.pid])
        head.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=30)
        for pid in tree | process_tree(tree):
            with contextlib.suppress(ProcessLookupError):
                launcher.os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_address_attaches_to_a_running_cluster(ray_resources_app, ray_cluster, tmp_path):
    """The virtual clients run in the cluster at ``ray_address``, with its GPU."""
    resources = Resources(gpus_per_client=0.5, ray_address=ray_cluster)
    record = launcher.run(RESOURCE_RUN, resources, progress=False, app_dir=ray_resources_app)
    trained = record["rounds"][1]
    assert trained["train_ray-gcs-port"] == pytest.approx(int(ray_cluster.rsplit(":", 1)[1]))
    assert trained["train_ray-gpu"] == pytest.approx(0.5, abs=1e-6)


def test_launcher_refuses_gpu_request_without_gpu(monkeypatch):
    monkeypatch.setattr(launcher, "visible_gpus", lambda: 0)
    with pytest.raises(RuntimeError, match="allow-cpu-fallback"):
        launcher.run({"task": "linear"}, Resources(gpus_per_client="auto"), progress=False)


def test_a_failing_run_raises_with_the_end_of_flowers_log(tmp_path):
    """A ServerApp that fails (no data root for fmnist) ends the launcher with Flower's log quoted."""
    config = {"task": "fmnist", "data-root": str(tmp_path / "missing"), "num-server-rounds": 1}
    with pytest.raises(RuntimeError, match=r"(?s)the run ended as 'finished:failed'.*missing"):
        launcher.run(config, progress=False)


ROOT = Path(__file__).parents[1]
COMMITTED_GRIDS = sorted([*(ROOT / "configs").glob("*.toml"), *(ROOT / "docs" / "results").rglob("*.toml")])


@pytest.mark.parametrize("path", COMMITTED_GRIDS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_committed_grid_file_is_valid(path):
    spec = load_grid(path)
    assert spec.runs(), f"{path.name} defines no runs"


def test_a_cell_setting_an_invariant_defense_s_settings_names_its_runs_apart(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text(
        '[base]\ntask = "linear"\n'
        '[[cells]]\ndefenses = ["fedavg", "invariant-bloc-exclusion"]\nattacks = ["blackbox"]\n'
        '[[cells]]\ndefenses = ["fedavg", "invariant-bloc-exclusion"]\nattacks = ["blackbox"]\n'
        "base = { tau = 0.3, trim-ratio = 0.2 }\n"
        '[[cells]]\ndefenses = ["invariant-bloc-exclusion"]\nattacks = ["blackbox"]\n'
        "base = { tau = 0.3, trim-ratio = 0.2, server-learning-rate = 1.5 }\n"
    )
    runs = dict(load_grid(path).runs())
    assert list(runs) == ["fedavg__blackbox__seed0", "invariant-bloc-exclusion__blackbox__seed0",
                          "invariant-bloc-exclusion_tau_0.3_trim-ratio_0.2__blackbox__seed0",
                          "invariant-bloc-exclusion_tau_0.3_trim-ratio_0.2_server-learning-rate_1.5__blackbox__seed0",
                          ]  # fmt: skip
    assert runs["invariant-bloc-exclusion_tau_0.3_trim-ratio_0.2__blackbox__seed0"]["tau"] == 0.3
    assert "tau" not in runs["fedavg__blackbox__seed0"]  # FedAvg has no tau: the first cell's run


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
    path.write_text(
        '[base]\ntask = "fmnist"\n'
        '[[cells]]\ndefenses = ["fedavg"]\nattacks = ["blackbox"]\n'
        '[[cells]]\ndefenses = ["fedavg", "invariant"]\nattacks = ["dba", "blackbox"]\n'
        'base = { backdoor = "pixel" }\n'
    )
    runs = dict(load_grid(path).runs())
    assert list(runs) == ["fedavg__blackbox__seed0", "fedavg__dba__seed0", "invariant__dba__seed0",
                          "invariant__blackbox__seed0"]  # fmt: skip
    assert "backdoor" not in runs["fedavg__blackbox__seed0"]  # the first cell naming a run wins
    assert runs["fedavg__dba__seed0"] == {"task": "fmnist", "backdoor": "pixel", "defense": "fedavg",
                                          "attack": "dba", "seed": 0}  # fmt: skip
    path.write_text('[[cells]]\ndefenses = ["fedavg"]\nattacks = ["dba"]\nbase = { task = "fmnist" }\n')
    with pytest.raises(ValueError, match="run fedavg__dba__seed0: .*'backdoor' = 'pixel'"):
        load_grid(path)  # a cell's runs are checked with its base
    path.write_text('[[cells]]\ndefenses = ["fedavg"]\nbase = { learning-rate = 0.1 }\n')
    with pytest.raises(ValueError, match=r"in cell 1's base: \['learning-rate'\]"):
        load_grid(path)
    path.write_text('[[cells]]\ndefenses = ["fedavg"]\nrounds = 3\n')
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['rounds'\] in cell 1"):
        load_grid(path)
    path.write_text('[[cells]]\ndefenses = ["fedavg"]\nattacks = ["sneaky"]\n')
    with pytest.raises(ValueError, match="'attack' must be one of"):
        load_grid(path)


def test_compare_prints_progress_and_the_table_without_warnings(tmp_path):
    """The README's main job as a command: progress bars and the table; no Flower log, no warnings."""
    sets = ["num-partitions=4", "clients-per-round=4", "linear-train-size=400", "linear-test-size=100"]
    command = [
        sys.executable,
        "-m",
        "simulation.compare",
        "--task",
        "linear",
        "--rounds",
        "1",
        "--set",
        *sets,
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=900, check=False)  # noqa: S603
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "| fedavg | 0 | 1 |" in done.stdout and "| invariant | 0 | 1 |" in done.stdout
    assert "fedavg seed 0: 100%" in done.stderr  # the progress bar
    for unwanted in ("DEPRECATED", "Warning", "[ROUND", "Traceback"):
        assert unwanted not in output, unwanted


# Stand-ins for flower-superlink, which starts flower-superexec in a session of its own, which
# starts flwr-simulation in its session and exits when its parent does: after a grid was killed
# mid-run, flwr-simulation and its Ray went on training.
_SUPEREXEC = """
import os, subprocess, time
parent = os.getppid()
subprocess.Popen(["sleep", "600"])  # flwr-simulation
while os.getppid() == parent:
    time.sleep(0.1)
"""
_SUPERLINK = f"""
import signal, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", {_SUPEREXEC!r}], start_new_session=True)
subprocess.Popen(["sleep", "600"])  # a child left in the SuperLink's own session
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    time.sleep(0.1)
"""


@pytest.fixture
def stand_in_superlink(tmp_path):
    """A LocalSuperLink whose process is the stand-in, and the stand-ins' 4 pids once all have started."""
    from simulation.superlink import LocalSuperLink

    link = LocalSuperLink(tmp_path)
    link.process = subprocess.Popen([sys.executable, "-c", _SUPERLINK], start_new_session=True)  # noqa: S603
    group = link.process.pid
    started: set[int] = set()

    def whole_tree() -> set[int] | None:
        tree = process_tree([group])
        return tree if len(tree) == 4 else None

    try:
        started = wait_for(whole_tree, timeout=10, what="the stand-ins' children")
        yield link, started
    finally:
        for pid in started | {group}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        link.process = None


def test_closing_the_superlink_ends_what_it_left_in_its_children_s_sessions(stand_in_superlink) -> None:
    from simulation.superlink import sessions_of

    link, started = stand_in_superlink
    assert len(sessions_of(started)) == 2  # the SuperLink's and the SuperExec's
    link.close(timeout=5)
    assert [pid for pid in started if alive(pid)] == []


def test_closing_a_dead_superlink_ends_the_sessions_it_had_started(stand_in_superlink) -> None:
    """The SuperLink SIGKILLed mid-run: what its SuperExec left running is still ended on close."""
    link, started = stand_in_superlink
    superlink = link.process
    link.remember_sessions()
    superlink.kill()
    superlink.wait(timeout=10)
    orphans = started - {superlink.pid}
    assert any(alive(pid) for pid in orphans)  # the stand-in flwr-simulation outlives its SuperLink
    link.close(timeout=5)
    assert [pid for pid in orphans if alive(pid)] == []
