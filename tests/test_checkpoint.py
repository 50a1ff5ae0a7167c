"""Round checkpoints (simulation/checkpoint.py) and resumption (the ServerApp's round loop, the grid).

* the file format: round trip, atomic replacement, refusal of truncated, altered, foreign and
  mismatched checkpoints by file name;
* every defense continues from a checkpoint exactly as without one, with new node ids;
* a real ``python -m simulation grid`` SIGKILLed mid-run resumes and ends with the per-round
  metrics of an uninterrupted run of the same seed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

import simulation.checkpoint as checkpoint_module
from baselines import DEFENSES
from simulation.__main__ import main as cli
from simulation.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    CheckpointError,
    check_model,
    checkpoint_lock,
    read_checkpoint,
    restore_strategy_state,
    strategy_state,
    write_checkpoint,
)
from simulation.config import resolve_config
from simulation.sampling import RoundSampler, make_strategy

from .deploy.helpers import alive, process_tree, wait_for
from .helpers import NodeList

REPO = Path(__file__).resolve().parents[1]
CONFIG = resolve_config({"task": "linear", "num-partitions": 10, "clients-per-round": 6})


def small_checkpoint(server_round: int = 2) -> Checkpoint:
    rng = np.random.default_rng(server_round)
    model = {
        "fc.weight": rng.normal(size=(2, 21)).astype(np.float32),
        "fc.bias": rng.normal(size=2).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
    }
    return Checkpoint(
        server_round=server_round,
        model=model,
        history={"evaluate": {"0": {"acc_main": 0.5}}, "train": {}, "seconds": {"0": 1.0}, "attackers": {}},
        initial={k: v + 1 for k, v in model.items()},
        strategy_arrays={"strategy/histories/3": rng.normal(size=5)},
        strategy_meta={
            "class": "FoolsGold",
            "attributes": {"histories": {"kind": "per-node", "partitions": [3]}},
        },
        pretrain={"rounds": 3, "seconds": 1.5, "cached": False},
        attack_trigger="00ff",
    )


# -- format ----------------------------------------------------------------------------------------------


def test_round_trip_keeps_every_array_and_field(tmp_path):
    saved = small_checkpoint()
    path = write_checkpoint(tmp_path, CONFIG, saved)
    assert path == tmp_path / CHECKPOINT_FILE
    loaded = read_checkpoint(tmp_path, CONFIG)
    assert loaded is not None and loaded.server_round == 2 and loaded.path == tmp_path / "round-000002.npz"
    for mine, theirs in ((saved.model, loaded.model), (saved.initial, loaded.initial)):
        assert list(theirs) == list(mine)
        for key in mine:
            assert theirs[key].dtype == mine[key].dtype and np.array_equal(theirs[key], mine[key])
    assert np.array_equal(
        loaded.strategy_arrays["strategy/histories/3"], saved.strategy_arrays["strategy/histories/3"]
    )
    assert (loaded.history, loaded.strategy_meta, loaded.pretrain, loaded.attack_trigger) == (
        saved.history,
        saved.strategy_meta,
        saved.pretrain,
        saved.attack_trigger,
    )
    document = json.loads(path.read_text())
    assert document["format"] == "flwr-invariant-checkpoint" and document["round"] == 2
    assert ["model/fc.weight", [2, 21], "<f4"] in document["arrays"]["entries"]


def test_only_the_newest_arrays_file_is_kept(tmp_path):
    write_checkpoint(tmp_path, CONFIG, small_checkpoint(1))
    write_checkpoint(tmp_path, CONFIG, small_checkpoint(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE, "round-000002.npz"]
    assert read_checkpoint(tmp_path, CONFIG).server_round == 2


def test_no_checkpoint_file_means_no_checkpoint(tmp_path):
    assert read_checkpoint(tmp_path, CONFIG) is None
    (tmp_path / "round-000001.npz").write_bytes(b"left by a crash before the first checkpoint.json")
    assert read_checkpoint(tmp_path, CONFIG) is None


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    write_checkpoint(tmp_path, CONFIG, small_checkpoint(1))

    def savez_then_die(stream, **arrays):
        stream.write(b"PK\x03\x04 half an archive")
        raise KeyboardInterrupt  # the process dies while writing the arrays

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_module.np, "savez", savez_then_die)
        with pytest.raises(KeyboardInterrupt):
            write_checkpoint(tmp_path, CONFIG, small_checkpoint(2))
    assert read_checkpoint(tmp_path, CONFIG).server_round == 1

    real_replace = os.replace

    def replace_arrays_only(source, target):
        if Path(target).name == CHECKPOINT_FILE:
            raise KeyboardInterrupt  # dies after the new arrays, before the new checkpoint.json
        real_replace(source, target)

    monkeypatch.setattr(checkpoint_module.os, "replace", replace_arrays_only)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, CONFIG, small_checkpoint(2))
    loaded = read_checkpoint(tmp_path, CONFIG)
    assert loaded.server_round == 1
    assert np.array_equal(loaded.model["fc.weight"], small_checkpoint(1).model["fc.weight"])


def test_truncated_arrays_are_refused_by_name(tmp_path):
    write_checkpoint(tmp_path, CONFIG, small_checkpoint())
    npz = tmp_path / "round-000002.npz"
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{npz}.* are corrupt \(truncated or altered\)"):
        read_checkpoint(tmp_path, CONFIG)
    npz.unlink()
    with pytest.raises(CheckpointError, match=rf"{npz}.* are missing"):
        read_checkpoint(tmp_path, CONFIG)


def test_truncated_checkpoint_json_is_refused_by_name(tmp_path):
    path = write_checkpoint(tmp_path, CONFIG, small_checkpoint())
    path.write_text(path.read_text()[:100])
    with pytest.raises(CheckpointError, match=rf"{path}.* is not valid JSON \(truncated\?\)"):
        read_checkpoint(tmp_path, CONFIG)
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match=rf"{path}.* is not a flwr-invariant-checkpoint file"):
        read_checkpoint(tmp_path, CONFIG)


def test_a_checkpoint_of_another_run_config_is_refused_naming_the_keys(tmp_path):
    path = write_checkpoint(tmp_path, CONFIG, small_checkpoint())
    other = resolve_config({**CONFIG, "seed": 1, "defense": "fedavg"})
    with pytest.raises(CheckpointError) as refused:
        read_checkpoint(tmp_path, other)
    message = str(refused.value)
    assert str(path) in message and "written by another run" in message
    assert "defense is 'invariant' there, 'fedavg' here" in message and "seed is 0 there, 1 here" in message
    # where files go and how the run executes may change between a run and its resumption
    moved = resolve_config({**CONFIG, "results-file": "/elsewhere.json", "device": "cpu", "round-timeout": 5})
    assert read_checkpoint(tmp_path, moved).server_round == 2


def test_a_key_added_by_a_newer_version_resumes_at_its_default_only(tmp_path):
    """A checkpoint written before a run-config key existed resumes while the run leaves it at its default."""
    path = write_checkpoint(tmp_path, CONFIG, small_checkpoint())
    document = json.loads(path.read_text())
    del document["config"]["deepsight-probe-size"]  # as written by a version without the key
    path.write_text(json.dumps(document))
    assert read_checkpoint(tmp_path, CONFIG).server_round == 2
    changed = resolve_config({**CONFIG, "deepsight-probe-size": 7})
    with pytest.raises(CheckpointError, match="deepsight-probe-size is '<unset>' there, 7 here"):
        read_checkpoint(tmp_path, changed)


def test_a_model_of_other_shapes_is_refused_naming_the_key(tmp_path):
    from simulation.data import load_task
    from simulation.training import model_for

    def model(**overrides):
        config = resolve_config(
            {"task": "linear", "linear-train-size": 200, "linear-test-size": 50, **overrides}
        )
        return {k: v.numpy() for k, v in model_for(load_task(config), config).state_dict().items()}

    saved = small_checkpoint()
    saved.model, saved.initial = model(), None  # weight (2, 21), bias (2,)
    write_checkpoint(tmp_path, CONFIG, saved)
    loaded = read_checkpoint(tmp_path, CONFIG)
    check_model(loaded, model())
    with pytest.raises(
        CheckpointError,
        match=rf"{loaded.path}.*model 'weight' has shape \(2, 21\), this run's model has \(2, 31\)",
    ):
        check_model(loaded, model(**{"linear-features": 30}))
    with pytest.raises(
        CheckpointError, match=rf"{loaded.path}.*other keys than this run's model \(missing \['extra'\]"
    ):
        check_model(loaded, {**model(), "extra": np.zeros(1)})


def test_object_arrays_are_never_written(tmp_path):
    saved = small_checkpoint()
    saved.strategy_arrays = {"strategy/x": np.array([{"a": 1}], dtype=object)}
    with pytest.raises(TypeError, match="'strategy/x' has dtype object"):
        write_checkpoint(tmp_path, CONFIG, saved)


def test_one_serverapp_per_checkpoint_directory(tmp_path):
    in_use = pytest.raises(CheckpointError, match=rf"{tmp_path}.* is in use by pid {os.getpid()}")
    with checkpoint_lock(tmp_path), in_use, checkpoint_lock(tmp_path):
        pass
    with checkpoint_lock(tmp_path):  # released
        pass
    started = time.monotonic()
    with (
        checkpoint_lock(tmp_path),
        pytest.raises(CheckpointError, match="in use"),
        checkpoint_lock(tmp_path, 1.0),
    ):
        pass
    assert time.monotonic() - started >= 1.0  # waited for the holder first


# -- every defense continues exactly -----------------------------------------------------------------------

GLOBAL = {
    "hidden.weight": np.linspace(-1, 1, 48, dtype=np.float32).reshape(8, 6),
    "hidden.bias": np.zeros(8, dtype=np.float32),
    "out.weight": np.linspace(1, -1, 16, dtype=np.float32).reshape(2, 8),
    "out.bias": np.zeros(2, dtype=np.float32),
    "bn.num_batches_tracked": np.array(0, dtype=np.int64),
}


def train_round(strategy, server_round: int, arrays: ArrayRecord, node_of: dict[int, int]):
    """One round on a stand-in federation: each partition's update depends on (partition, round) only."""
    partition_of = {node: pid for pid, node in node_of.items()}
    messages = strategy.configure_train(server_round, arrays, ConfigRecord({}), NodeList(node_of.values()))
    replies = []
    for message in sorted(messages, key=lambda m: partition_of[m.metadata.dst_node_id]):
        pid = partition_of[message.metadata.dst_node_id]
        rng = np.random.default_rng([pid, server_round])
        bias = 0.5 if pid in strategy.sampler.attackers else 0.0  # colluders push one way
        trained = {}
        for key, array in arrays.items():
            value = array.numpy()
            if value.dtype.kind == "f":
                value = value - (0.1 * rng.normal(size=value.shape) + bias).astype(value.dtype)
            else:
                value = np.asarray(value + server_round, dtype=value.dtype)
            trained[key] = Array(np.asarray(value))
        metrics = MetricRecord({"num-examples": 10 + pid, "train_loss": float(rng.random())})
        replies.append(
            Message(RecordDict({"arrays": ArrayRecord(trained), "metrics": metrics}), reply_to=message)
        )
    new_arrays, metrics = strategy.aggregate_train(server_round, replies)
    return (arrays if new_arrays is None else new_arrays), dict(metrics or {})


def stand_in_root_update(server_round: int, arrays: ArrayRecord) -> ArrayRecord:
    """FLTrust's server update on GLOBAL's model without a task: every float moves by 0.05 / round."""
    return ArrayRecord(
        {
            k: Array(
                a.numpy() - np.float32(0.05 / server_round) if a.numpy().dtype.kind == "f" else a.numpy()
            )
            for k, a in arrays.items()
        }
    )


def stand_in_probe(arrays: ArrayRecord) -> np.ndarray:
    """DeepSight's outputs of GLOBAL's MLP (6 -> 8 -> 2) on 2 seeds x 5 fixed random inputs."""
    x = np.random.default_rng(3).normal(size=(2, 5, 6))
    hidden = np.maximum(x @ arrays["hidden.weight"].numpy().T + arrays["hidden.bias"].numpy(), 0.0)
    logits = hidden @ arrays["out.weight"].numpy().T + arrays["out.bias"].numpy()
    exp = np.exp(logits - logits.max(axis=2, keepdims=True))
    return exp / exp.sum(axis=2, keepdims=True)


def federation(defense: str, node_base: int):
    """The defense with seeded sampling over 10 partitions, and stand-ins for any server-side model work."""
    config = resolve_config({**CONFIG, "defense": defense, "malicious-fraction": 0.3})
    node_of = {pid: node_base + 7 * pid for pid in range(config["num-partitions"])}
    strategy = make_strategy(config, RoundSampler(node_of, config))
    if hasattr(strategy, "root_update"):
        strategy.root_update = stand_in_root_update
    if hasattr(strategy, "probe"):
        strategy.probe = stand_in_probe
    return strategy, node_of


def fingerprint(value):
    """A comparable summary of an attribute's value (arrays by content, generators by state)."""
    if isinstance(value, np.ndarray):
        return ("array", value.shape, value.dtype.str, value.tobytes())
    if isinstance(value, np.random.Generator):
        return ("generator", json.dumps(value.bit_generator.state))
    if isinstance(value, dict):
        return tuple(sorted((repr(k), fingerprint(v)) for k, v in value.items()))
    return repr(value)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("defense", list(DEFENSES))
def test_every_defense_resumes_exactly_with_new_node_ids(defense, tmp_path):
    rounds, stop = 5, 2
    strategy, node_of = federation(defense, node_base=1000)
    arrays, reference = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}), []
    for server_round in range(1, rounds + 1):
        arrays, metrics = train_round(strategy, server_round, arrays, node_of)
        reference.append(metrics)
        if server_round == stop:
            partition_of = {node: pid for pid, node in node_of.items()}
            state_arrays, state_meta = strategy_state(strategy, partition_of)
            model = {k: a.numpy() for k, a in arrays.items()}
            write_checkpoint(tmp_path, CONFIG, Checkpoint(stop, model, {}, None, state_arrays, state_meta))
    expected = {k: a.numpy() for k, a in arrays.items()}

    saved = read_checkpoint(tmp_path, CONFIG)
    strategy, node_of = federation(defense, node_base=90000)  # nodes reconnected: other ids
    restore_strategy_state(strategy, saved, node_of)
    arrays, resumed = ArrayRecord({k: Array(v) for k, v in saved.model.items()}), []
    for server_round in range(stop + 1, rounds + 1):
        arrays, metrics = train_round(strategy, server_round, arrays, node_of)
        resumed.append(metrics)

    assert resumed == reference[stop:]
    for key, value in expected.items():
        assert np.array_equal(arrays[key].numpy(), value), key


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("defense", list(DEFENSES))
def test_carried_state_lists_everything_a_defense_keeps_across_rounds(defense):
    """A defense that keeps something across rounds without listing it in ``carried_state`` fails here."""
    strategy, node_of = federation(defense, node_base=1000)
    before = {name: fingerprint(value) for name, value in vars(strategy).items()}
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    for server_round in (1, 2):
        arrays, _ = train_round(strategy, server_round, arrays, node_of)
    after = {name: fingerprint(value) for name, value in vars(strategy).items()}
    changed = {name for name in after if before.get(name) != after[name]}
    transient = {"_global_arrays"}  # the arrays sent this round, set again by configure_train
    assert changed - transient <= set(getattr(strategy, "carried_state", ())), changed


# -- a real simulation, SIGKILLed and resumed -------------------------------------------------------------

BASE = {
    "task": "linear",
    "num-server-rounds": 6,
    "num-partitions": 6,
    "clients-per-round": 4,
    "linear-train-size": 1200,
    "linear-test-size": 300,
    "device": "cpu",
}


def grid_text(output: Path, **changes) -> str:
    """A one-run grid file of BASE (with ``changes``) writing to ``output``."""
    base = "\n".join(f"{k} = {json.dumps(v)}" for k, v in {**BASE, **changes}.items())
    head = f'name = "resume"\noutput = "{output}"\ndefenses = ["invariant"]\nattacks = ["blackbox"]\n'
    return f"{head}[base]\n{base}\n"


RUN = "invariant__blackbox__seed0"  # the aggregate does not depend on reply order: bit for bit


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_round(run_dir: Path) -> int | None:
    try:
        return json.loads((run_dir / "checkpoint" / CHECKPOINT_FILE).read_text())["round"]
    except (OSError, ValueError):
        return None


def kill_tree(popen: subprocess.Popen) -> None:
    """SIGKILL the process and every descendant (Ray's too), by pid."""
    for pid in process_tree([popen.pid]):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    popen.wait(timeout=30)


def start_grid(root: Path, **changes) -> tuple[Path, subprocess.Popen]:
    """``python -m simulation grid`` of :func:`grid_text` into ``root / "results"``, in its own
    session (output in ``root / "grid.log"``); returns the grid file and the process."""
    grid_file = root / "grid.toml"
    grid_file.write_text(grid_text(root / "results", **changes))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with (root / "grid.log").open("wb") as log:
        popen = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "simulation", "grid", str(grid_file), "--no-progress"],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return grid_file, popen


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """A one-run grid SIGKILLed after its round-2 checkpoint, then resumed by running the grid again."""
    root = tmp_path_factory.mktemp("resume")
    grid_file, popen = start_grid(root)
    run_dir = root / "results" / RUN
    try:
        wait_for(lambda: (checkpoint_round(run_dir) or 0) >= 2, 600, "the round-2 checkpoint")
    finally:
        kill_tree(popen)
    killed_at = checkpoint_round(run_dir)
    rows_when_killed = read_rows(run_dir)
    meta = json.loads((run_dir / "config.json").read_text())
    cli(["grid", str(grid_file), "--no-progress"])
    return run_dir, killed_at, rows_when_killed, meta


def test_sigterm_stops_the_grid_and_everything_it_started(tmp_path):
    """``kill <pid>`` of ``python -m simulation grid``: its SuperLink, runs and Ray go too."""
    _, popen = start_grid(tmp_path, **{"num-server-rounds": 60})
    run_dir = tmp_path / "results" / RUN
    try:
        wait_for(lambda: (checkpoint_round(run_dir) or 0) >= 1, 600, "the round-1 checkpoint")
        started = process_tree([popen.pid]) - {popen.pid}
        assert len(started) >= 3  # the SuperLink, its simulation runtime, Ray's processes
        popen.send_signal(signal.SIGTERM)
        assert popen.wait(timeout=120) == 128 + signal.SIGTERM
        # Ray's DashboardAgent and RuntimeEnvAgent leave on their own once their raylet is gone:
        # 60-90 s after the grid on this 2-core machine (Ray 2.55), hence 180 s.
        wait_for(lambda: not any(alive(pid) for pid in started), 180, "the processes the grid started to end")
    finally:
        kill_tree(popen)


def test_grid_killed_mid_run_resumes_from_its_checkpoint(killed_and_resumed):
    run_dir, killed_at, rows_when_killed, meta_when_killed = killed_and_resumed
    assert meta_when_killed["completed"] is False
    assert 2 <= killed_at < BASE["num-server-rounds"], "the run was not killed mid-run"
    assert [r["round"] for r in rows_when_killed][: killed_at + 1] == list(range(killed_at + 1))
    meta = json.loads((run_dir / "config.json").read_text())
    assert meta["completed"] is True
    assert [entry["from_round"] for entry in meta["resumed"]] == [killed_at]
    assert meta["started"] == meta_when_killed["started"]
    rows = read_rows(run_dir)
    assert [r["round"] for r in rows] == list(range(BASE["num-server-rounds"] + 1))  # each round once
    assert checkpoint_round(run_dir) == BASE["num-server-rounds"]


def test_resumed_run_has_the_metrics_of_an_uninterrupted_one(killed_and_resumed, tmp_path):
    run_dir, *_ = killed_and_resumed
    reference_dir = tmp_path / "uninterrupted"
    sets = [f"{k}={v}" for k, v in {**BASE, "defense": "invariant", "attack": "blackbox", "seed": 0}.items()]
    cli(["run", "--out", str(reference_dir), "--set", *sets])

    def numbers(rows):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    resumed, reference = numbers(read_rows(run_dir)), numbers(read_rows(reference_dir))
    assert resumed == reference  # bit for bit, the client metrics too: replies are summed by partition


def test_corrupt_or_foreign_checkpoints_stop_the_grid_before_training(
    killed_and_resumed, tmp_path, monkeypatch
):
    run_dir, *_ = killed_and_resumed
    monkeypatch.setattr("simulation.grid.run", lambda *a, **k: pytest.fail("training started"))
    results = tmp_path / "results"
    copy = results / RUN
    shutil.copytree(run_dir, copy)
    meta = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**meta, "completed": False}))
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(grid_text(results))
    checkpoint_dir = copy / "checkpoint"
    shutil.rmtree(checkpoint_dir)
    shutil.copytree(run_dir / "checkpoint", checkpoint_dir)
    npz = next(checkpoint_dir.glob("round-*.npz"))
    npz.write_bytes(npz.read_bytes()[:-40])  # truncated

    with pytest.raises(SystemExit, match=rf"error: checkpoint arrays '{npz}' are corrupt"):
        cli(["grid", str(grid_file), "--no-progress"])

    grid_file.write_text(grid_text(results, **{"linear-test-size": 200}))
    foreign = r"written by another run: linear-test-size is 300 there, 200 here"
    with pytest.raises(SystemExit, match=foreign):
        cli(["grid", str(grid_file), "--no-progress"])
    sets = {**BASE, "defense": "invariant", "attack": "blackbox", "seed": 0, "linear-test-size": 200}
    with pytest.raises(SystemExit, match=foreign):  # `run` into the interrupted run's directory
        cli(["run", "--out", str(copy), "--set", *(f"{k}={v}" for k, v in sets.items())])
