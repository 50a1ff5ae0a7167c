"""End-to-end deployment tests: real ``flower-superlink`` and ``flower-supernode`` processes on 127.0.0.1.

Each test starts a SuperLink (``--isolation subprocess``) and SuperNodes (one
per partition, ``--node-config "partition-id=N num-partitions=M"``), submits
the Flower App with ``flwr run ... --stream`` and checks the ServerApp's
results-file, the logs, and that every process stops on SIGTERM.

* plain (insecure) run of ``defense='invariant'`` with an attacker among the nodes;
* TLS + SuperNode authentication: an unregistered SuperNode is refused and never trains;
* a SuperNode SIGKILLed in the middle of a round: the run completes every round;
* SuperNodes that send garbage (NaN, wrong shapes, wrong keys): excluded and named;
* the SuperLink SIGKILLed after round 2 of 4 and started again: the resubmitted run
  continues from the ServerApp's round checkpoint and runs rounds 3-4 only.

They take about a minute each on 2 cores; ``-k "not test_deployment"`` skips them.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from simulation.partition import attacker_partitions

from .deploy.helpers import (
    REPO,
    Deployment,
    Process,
    alive,
    crash_lines,
    make_app_dir,
    read_metrics,
    wait_for,
)
from .deploy.pki import make_node_keys, make_tls_files

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and POSIX signals")

#: Small linear-task run: seconds per round on 2 cores, not minutes.
BASE_CONFIG: dict[str, Any] = {
    "task": "linear",
    "defense": "invariant",
    "seed": 0,
    "linear-train-size": 800,
    "linear-test-size": 200,
    "malicious-fraction": 0.34,
    "attack": "blackbox",
    "attack-schedule": "pool",
    "device": "cpu",
}
RUN_TIMEOUT = 150.0  # seconds for `flwr run --stream` (the run itself takes ~30-70 s)


@pytest.fixture
def deployment_factory(tmp_path: Path) -> Iterator[Any]:
    """Builds :class:`Deployment` objects; every process they started is killed at teardown."""
    created: list[Deployment] = []

    def make(**kwargs: Any) -> Deployment:
        deployment = Deployment(tmp_path / f"deployment-{len(created)}", **kwargs)
        created.append(deployment)
        return deployment

    yield make
    for deployment in created:
        deployment.close()


def start_nodes(
    deployment: Deployment, num_partitions: int, extra: dict[int, dict[str, Any]] | None = None
) -> dict[int, tuple[Process, int]]:
    """One SuperNode per partition; partition -> (process, node id) once all are connected."""
    processes = {
        pid: deployment.start_supernode(
            f"supernode-{pid}",
            {"partition-id": pid, "num-partitions": num_partitions, **(extra or {}).get(pid, {})},
        )
        for pid in range(num_partitions)
    }
    return {pid: (process, deployment.wait_node_id(process)) for pid, process in processes.items()}


def run_and_read(
    deployment: Deployment, app: Path, config: dict[str, Any], results: Path
) -> tuple[str, dict]:
    """``flwr run`` with ``config``; the streamed log and the results-file (asserting both exist)."""
    done = deployment.run_app(app, {**config, "results-file": str(results)}, timeout=RUN_TIMEOUT)
    stream = done.stdout + done.stderr
    assert done.returncode == 0, f"flwr run failed:\n{stream}\n{deployment.tails()}"
    assert results.exists(), f"the ServerApp wrote no results-file:\n{stream}\n{deployment.tails()}"
    return stream, read_metrics(results)


def assert_complete(record: dict, num_rounds: int) -> list[dict]:
    """Rounds 0..num_rounds are all in the record with finite metrics; the rows."""
    rows = record["rounds"]
    assert [row["round"] for row in rows] == list(range(num_rounds + 1))
    for row in rows:
        for key in ("acc_main", "acc_backdoor", "loss"):
            assert math.isfinite(row[key]), row
    return rows


def assert_run_finished(deployment: Deployment) -> None:
    """``flwr ls`` shows exactly one run, finished and completed."""
    runs = deployment.runs()
    assert len(runs) == 1, runs
    assert runs[0]["status"] == "finished:completed", runs


def assert_clean_shutdown(
    deployment: Deployment, skip: tuple[str, ...] = (), stale_run: str | None = None
) -> None:
    """SIGTERM every process: each exits with 0 within the timeout, no traceback, no leftover child.

    ``stale_run``: a run the SuperLink dropped mid-round. A SuperNode still training for it logs
    Flower's traceback when its reply is refused; that one is allowed, only for that run.
    """
    codes = deployment.shutdown(timeout=30.0)
    for process in deployment.processes:
        if process.name in skip:
            continue
        # uvicorn re-raises the signal after its graceful shutdown, so -SIGTERM is a clean exit too
        assert codes[process.name] in (0, -signal.SIGTERM), f"{process.name}: exit {codes[process.name]}"
        log = process.log()
        marker = (
            "Finished server process"
            if process is deployment.superlink
            else "SuperNode terminated gracefully"
        )
        assert marker in log, f"{process.name} did not shut down gracefully\n{process.tail()}"
        if stale_run is not None and f"Run ID {stale_run} is not in `RUNNING` status" in log:
            log = log.replace("Failed to push reply message\nTraceback", "")
        assert not crash_lines(log), process.tail(80)
    left = deployment.leftovers()
    assert not left, f"processes left running:\n{deployment.describe(left)}\n{deployment.tails()}"


def test_invariant_run_over_a_real_superlink(deployment_factory, tmp_path: Path) -> None:
    """3 SuperNodes (partition 1 malicious) x 3 rounds of defense='invariant' through flwr run."""
    deployment = deployment_factory()
    deployment.start_superlink()
    nodes = start_nodes(deployment, 3)
    assert set(deployment.nodes()) == {node_id for _, node_id in nodes.values()}
    config = {**BASE_CONFIG, "num-partitions": 3, "clients-per-round": 3, "num-server-rounds": 3}
    assert attacker_partitions(3, config["malicious-fraction"], config["seed"], "pool") == [1]

    stream, record = run_and_read(deployment, REPO, config, tmp_path / "metrics.json")

    rows = assert_complete(record, 3)
    assert rows[-1]["acc_main"] > 0.6, rows  # the linear task starts near 0.5
    for row in rows[1:]:
        assert row["attackers_sampled"] == 1
        assert 0.0 <= row["train_mask_fraction"] <= 1.0
        assert row["train_num_aggregated"] == 3 and row["train_num_excluded"] == 0
        assert row["train_num_failures"] == 0
        assert row["train_attacker"] > 0  # partition 1's node did run the attack (a simulation label)
    # every node trained in every round
    for process, _ in nodes.values():
        assert process.log().count("Receiving: train message") == 3, process.tail()
    assert "wrote per-round metrics" in stream
    assert_run_finished(deployment)
    assert_clean_shutdown(deployment)


def test_tls_and_supernode_authentication(deployment_factory, tmp_path: Path) -> None:
    """TLS everywhere; 3 registered SuperNodes train, a 4th with an unregistered key is refused."""
    tls = make_tls_files(tmp_path / "tls")
    deployment = deployment_factory(tls=tls, node_auth=True)
    deployment.start_superlink()
    keys = {pid: make_node_keys(tmp_path / "keys", f"node-{pid}") for pid in range(3)}
    intruder_keys = make_node_keys(tmp_path / "keys", "intruder")
    for pair in keys.values():
        done = deployment.flwr("supernode", "register", str(pair.public), "test", timeout=60)
        assert done.returncode == 0 and "registered successfully" in done.stdout, done.stdout + done.stderr
    registered = set(deployment.nodes())
    assert len(registered) == 3

    processes = {
        pid: deployment.start_supernode(f"supernode-{pid}", {"partition-id": pid, "num-partitions": 3}, pair)
        for pid, pair in keys.items()
    }
    # The intruder claims partition 0 (a duplicate the ServerApp would notice if it were admitted).
    intruder = deployment.start_supernode(
        "intruder", {"partition-id": 0, "num-partitions": 3}, intruder_keys, extra=["--max-retries", "3"]
    )
    node_ids = {pid: deployment.wait_node_id(process) for pid, process in processes.items()}
    assert set(node_ids.values()) == registered
    wait_for(lambda: not intruder.running(), 60, "the unregistered SuperNode to give up")
    assert deployment.node_id(intruder) is None, intruder.tail()
    assert intruder.popen.returncode != 0, intruder.tail()
    assert "Exit Code: 305" in intruder.log() and "Failed to activate SuperNode" in intruder.log()
    superlink_log = deployment.superlink.log()  # type: ignore[union-attr]
    assert "No SuperNode found with the given public key" in superlink_log
    assert re.search(r'"POST /v1/fleet/activate-node HTTP/1.1" 412', superlink_log)
    # TLS is really on: a client that talks plain HTTP to the same port gets nowhere.
    plain = deployment.flwr("ls", "plain", timeout=60)
    assert plain.returncode != 0, plain.stdout

    config = {**BASE_CONFIG, "num-partitions": 3, "clients-per-round": 3, "num-server-rounds": 1}
    stream, record = run_and_read(deployment, REPO, config, tmp_path / "metrics.json")

    rows = assert_complete(record, 1)
    assert rows[1]["train_num_aggregated"] == 3 and rows[1]["train_num_failures"] == 0
    assert set(deployment.nodes()) == registered
    assert "Receiving" not in intruder.log()
    for process in processes.values():
        assert process.log().count("Receiving: train message") == 1
    assert_run_finished(deployment)
    assert_clean_shutdown(deployment, skip=("intruder",))


def test_supernode_killed_mid_round(deployment_factory, tmp_path: Path) -> None:
    """SIGKILL a SuperNode (and its ClientApp) while it trains in round 1: every round still completes.

    Flower marks the node unavailable once its heartbeat lapses (2 x 30 s) and the
    SuperLink answers its instructions with an error; the strategy counts those as
    failures and aggregates the others.
    """
    deployment = deployment_factory()
    deployment.start_superlink()
    nodes = start_nodes(deployment, 3)
    victim, victim_id = nodes[2]
    config = {**BASE_CONFIG, "num-partitions": 3, "clients-per-round": 3, "num-server-rounds": 2}
    results = tmp_path / "metrics.json"

    outcome: dict[str, Any] = {}

    def submit() -> None:
        try:
            outcome["value"] = run_and_read(deployment, REPO, config, results)
        except BaseException as err:  # noqa: BLE001 - re-raised in the test thread
            outcome["error"] = err

    runner = threading.Thread(target=submit, daemon=True)
    runner.start()
    wait_for(lambda: "Receiving: train message" in victim.log(), 90, "round 1 to reach the victim")
    victim.kill_everything()  # the machine dies: SuperNode, its SuperExec and ClientApp
    assert victim.popen.returncode == -signal.SIGKILL
    runner.join(RUN_TIMEOUT + 30)
    assert not runner.is_alive(), "flwr run did not return"
    if "error" in outcome:
        raise outcome["error"]
    stream, record = outcome["value"]

    rows = assert_complete(record, 2)
    for row in rows[1:]:
        assert row["train_num_failures"] == 1, row
        assert row["train_num_aggregated"] == 2, row
    for server_round in (1, 2):
        # The SuperLink itself answers for the dead node (with its own node id), and the
        # strategy says so instead of blaming a node; the reason is Flower's NODE_UNAVAILABLE.
        source = "the SuperLink replied with an error for a node it could not reach"
        assert re.search(rf"round {server_round}: {source}: .*Node Unavailable", stream)
    for pid in (0, 1):
        assert nodes[pid][0].log().count("Receiving: train message") == 2
    assert deployment.nodes()[victim_id] == "offline"
    assert_run_finished(deployment)
    assert_clean_shutdown(deployment, skip=(victim.name,))


def test_garbage_updates_are_excluded_in_deployment(deployment_factory, tmp_path: Path) -> None:
    """SuperNodes whose ClientApp sends NaN, wrong shapes or wrong keys are excluded and named each round."""
    app = make_app_dir(
        tmp_path / "app",
        clientapp="misbehaving_client:app",
        extra_modules=[Path(__file__).parent / "deploy" / "misbehaving_client.py"],
    )
    deployment = deployment_factory()
    deployment.start_superlink()
    modes = {1: "nan", 2: "shape", 3: "keys"}
    nodes = start_nodes(deployment, 4, {pid: {"misbehave": mode} for pid, mode in modes.items()})
    config = {
        **BASE_CONFIG,
        "num-partitions": 4,
        "clients-per-round": 4,
        "num-server-rounds": 1,
        "malicious-fraction": 0.0,
    }
    stream, record = run_and_read(deployment, app, config, tmp_path / "metrics.json")

    rows = assert_complete(record, 1)
    assert rows[1]["train_num_excluded"] == 3 and rows[1]["train_num_aggregated"] == 1, rows
    assert rows[1]["train_num_failures"] == 0
    assert rows[1]["acc_main"] > 0.55, rows  # the model moved with the honest node, not to NaN
    reasons = {}
    for pid in modes:
        node_id = nodes[pid][1]
        match = re.search(rf"round 1: excluded the update of client node {node_id}: (.*)", stream)
        assert match, f"no exclusion warning for partition {pid} (node {node_id})\n{stream}"
        reasons[modes[pid]] = match.group(1)
    assert not re.search(rf"excluded the update of client node {nodes[0][1]}:", stream)
    assert "non-finite" in reasons["nan"] or "NaN" in reasons["nan"], reasons
    assert "shape" in reasons["shape"], reasons
    assert "keys" in reasons["keys"], reasons
    for process, _ in nodes.values():
        assert "Sending: train message" in process.log()  # every node did answer
    assert_run_finished(deployment)
    assert_clean_shutdown(deployment)


def checkpoint_round(directory: Path) -> int | None:
    """The round of the ServerApp's checkpoint in ``directory`` (None before the first)."""
    try:
        return int(json.loads((directory / "checkpoint.json").read_text())["round"])
    except (OSError, ValueError, KeyError):
        return None


def train_messages_of_run(log: str, run_id: int) -> int:
    """How many train messages a SuperNode's log shows it received for run ``run_id``
    (each message's lines follow a ``[RUN <id>]`` line)."""
    current, count = None, 0
    for line in log.splitlines():
        found = re.search(r"\[RUN (\d+)\]", line)
        if found:
            current = int(found.group(1))
        elif "Receiving: train message" in line and current == int(run_id):
            count += 1
    return count


def test_superlink_killed_after_round_2_resumes_from_the_checkpoint(
    deployment_factory, tmp_path: Path
) -> None:
    """SIGKILL the SuperLink after round 2 of 4, start it again (same port, same ``--database``)
    and submit the same run: the SuperNodes reconnect by themselves (the database keeps them and
    their node ids) and the ServerApp runs rounds 3-4 from its checkpoint, FoolsGold's per-client
    histories included."""
    deployment = deployment_factory()
    database = ["--database", str(tmp_path / "superlink-state.db")]
    deployment.start_superlink(extra=database)
    nodes = start_nodes(deployment, 3)
    checkpoints = tmp_path / "checkpoint"
    config = {
        **BASE_CONFIG,
        "defense": "foolsgold",
        "num-partitions": 3,
        "clients-per-round": 3,
        "num-server-rounds": 4,
        "checkpoint-dir": str(checkpoints),
        "checkpoint-every": 2,  # rounds 0, 2 and 4: the kill lands between two checkpoints
    }
    results = tmp_path / "metrics.json"
    outcome: dict[str, Any] = {}

    def submit() -> None:
        outcome["first"] = deployment.run_app(REPO, {**config, "results-file": str(results)}, RUN_TIMEOUT)

    runner = threading.Thread(target=submit, daemon=True)
    runner.start()
    wait_for(lambda: checkpoint_round(checkpoints) == 2, RUN_TIMEOUT, "the round-2 checkpoint")
    (interrupted,) = deployment.runs()
    killed = deployment.superlink
    assert killed is not None
    killed.remember_descendants()
    os.kill(killed.pid, signal.SIGKILL)  # the SuperLink only: its SuperExec and ServerApp notice
    killed.popen.wait(timeout=30)
    # the orphans must be gone before a SuperLink listens on the same ports again, or one that is
    # still retrying could reconnect to it and outlive the deployment
    orphans = deployment.leftovers(pids=killed.descendants)
    assert not orphans, f"the killed SuperLink's children outlived it:\n{deployment.describe(orphans)}"
    runner.join(RUN_TIMEOUT)
    assert not runner.is_alive() and outcome["first"].returncode != 0, "flwr run did not notice the crash"
    assert checkpoint_round(checkpoints) == 2 and not results.exists()
    saved = json.loads((checkpoints / "checkpoint.json").read_text())["history"]["evaluate"]

    deployment.start_superlink(name="superlink-restarted", extra=database)
    wait_for(lambda: sorted(deployment.nodes().values()) == ["online"] * 3, 90, "the SuperNodes to reconnect")
    stream, record = run_and_read(deployment, REPO, config, results)

    assert re.search(r"resuming from .*round-000002\.npz: 2 of 4 rounds done", stream), stream
    assert "[ROUND 3/4]" in stream and "[ROUND 4/4]" in stream
    assert "[ROUND 1/4]" not in stream and "[ROUND 2/4]" not in stream
    assert record["resumed_from_round"] == 2
    rows = assert_complete(record, 4)
    for row in rows[:3]:  # rounds 0-2 come from the checkpoint, unchanged
        assert {k: row[k] for k in saved[str(row["round"])]} == saved[str(row["round"])]
    for row in rows[1:]:
        assert row["train_num_aggregated"] == 3 and row["train_num_failures"] == 0, row
    assert checkpoint_round(checkpoints) == 4
    statuses = {run["run-id"]: run["status"] for run in deployment.runs()}
    assert statuses.pop(interrupted["run-id"]).startswith("finished:"), statuses
    assert list(statuses.values()) == ["finished:completed"]
    (resumed_run,) = statuses
    for process, _ in nodes.values():  # every node trained rounds 3 and 4 of the resumed run
        assert train_messages_of_run(process.log(), resumed_run) == 2, process.tail()
    # a SuperNode may still be training round 3 of the killed run when the new SuperLink ends it
    assert_clean_shutdown(deployment, skip=(killed.name,), stale_run=str(interrupted["run-id"]))
    assert not any(alive(pid) for pid in killed.descendants)  # the old ServerApp did exit
