"""The ClientApp (benign and malicious replies), the ServerApp's sampling, and real simulations."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.metadata import Metadata

from baselines import DEFENSES
from simulation.client_app import make_client_app, partition_of
from simulation.config import resolve_config
from simulation.data import load_task
from simulation.partition import attacker_partitions
from simulation.sampling import RoundSampler, make_strategy
from simulation.training import make_evaluate_fn, model_for

from .helpers import NodeList
from .simulate import run_experiments

LINEAR = {
    "task": "linear",
    "num-partitions": 5,
    "clients-per-round": 3,
    "linear-train-size": 1000,
    "partition": "iid",
    "lr": 0.1,
}


def _context(partition: int, num_partitions: int = 5) -> Context:
    return Context(
        run_id=1,
        node_id=100 + partition,
        node_config={"partition-id": partition, "num-partitions": num_partitions},
        state=RecordDict(),
        run_config={},
    )


def _delivered(content: RecordDict, message_type: str, node_id: int = 100) -> Message:
    """A message as the SuperLink delivers it (with run and message ids), so a reply can be built."""
    metadata = Metadata(
        run_id=1,
        message_id="m1",
        src_node_id=0,
        dst_node_id=node_id,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )
    return Message(content=content, metadata=metadata)


def _train_message(arrays: ArrayRecord, server_round: int) -> Message:
    return _delivered(
        RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}), "train"
    )


@pytest.mark.parametrize("malicious", [False, True])
def test_client_app_train_reply(malicious: bool) -> None:
    config = resolve_config({**LINEAR, "malicious-fraction": 1.0 if malicious else 0.0})
    task = load_task(config)
    arrays = ArrayRecord(model_for(task, config).state_dict())
    app = make_client_app({**LINEAR, "malicious-fraction": 1.0 if malicious else 0.0})
    reply = app(_train_message(arrays, 1), _context(2))
    assert not reply.has_error(), reply.error if reply.has_error() else ""
    metrics = reply.content["metrics"]
    assert set(reply.content["arrays"].keys()) == set(arrays.keys())
    assert metrics["num-examples"] == (100 + 200 if malicious else 200)
    assert metrics["attacker"] == int(malicious) and metrics["train_loss"] > 0
    trained = reply.content["arrays"].to_torch_state_dict()
    assert not torch.equal(trained["weight"], arrays.to_torch_state_dict()["weight"])


def test_client_app_query_and_evaluate() -> None:
    config = resolve_config(LINEAR)
    arrays = ArrayRecord(model_for(load_task(config), config).state_dict())
    app = make_client_app(LINEAR)
    reply = app(_delivered(RecordDict({"config": ConfigRecord()}), "query", 103), _context(3))
    assert reply.content["metrics"]["partition-id"] == 3
    evaluate = _delivered(RecordDict({"arrays": arrays, "config": ConfigRecord()}), "evaluate", 103)
    reply = app(evaluate, _context(3))
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 200 and 0.0 <= metrics["eval_acc"] <= 1.0


def test_partition_of_errors() -> None:
    config = resolve_config(LINEAR)
    assert partition_of(_context(4), config) == 4
    with pytest.raises(ValueError, match="'num-partitions'"):
        partition_of(_context(1, num_partitions=7), config)
    no_id = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="'partition-id'"):
        partition_of(no_id, config)


def test_round_sampler_is_seeded_and_schedules_attackers() -> None:
    config = resolve_config({**LINEAR, "num-partitions": 20, "clients-per-round": 5})
    node_of = {p: 1000 + p for p in range(20)}
    first, second = RoundSampler(node_of, config), RoundSampler(node_of, config)
    assert [first.partitions(r) for r in range(1, 6)] == [second.partitions(r) for r in range(1, 6)]
    other = RoundSampler(node_of, {**config, "seed": 1})
    assert [first.partitions(r) for r in range(1, 6)] != [other.partitions(r) for r in range(1, 6)]
    assert first.nodes(3) == [1000 + p for p in first.partitions(3)]
    every = {**config, "attack-schedule": "every-k", "attack-every": 3}
    sampler = RoundSampler(node_of, every)
    (attacker,) = attacker_partitions(20, 0.2, 0, "every-k")
    for server_round in range(1, 10):
        chosen = sampler.partitions(server_round)
        assert len(chosen) == 5 and (attacker in chosen) == (server_round % 3 == 0)
        assert sampler.num_attackers(server_round) == int(server_round % 3 == 0)


@pytest.mark.usefixtures("task_identity")
def test_sampled_strategies_aggregate_in_partition_order_whatever_the_arrival_order() -> None:
    """Float sums change with their order: replies are summed by partition, so runs repeat bit for bit."""
    config = resolve_config({**LINEAR, "defense": "fedavg"})
    node_of = {p: 900 - 7 * p for p in range(5)}  # node ids in the opposite order to partition ids
    strategy = make_strategy(config, RoundSampler(node_of, config))
    start = ArrayRecord({"w": Array(np.zeros(16, np.float32))})
    messages = strategy.configure_train(1, start, ConfigRecord({}), NodeList(node_of.values()))
    rng = np.random.default_rng(0)
    replies = []
    for i, message in enumerate(messages):
        update = (rng.normal(size=16) * 10.0 ** rng.integers(-4, 5, size=16)).astype(np.float32)
        metrics = MetricRecord({"num-examples": 3 + i, "train_loss": float(rng.random())})
        replies.append(
            Message(
                RecordDict({"arrays": ArrayRecord({"w": Array(update)}), "metrics": metrics}),
                reply_to=message,
            )
        )

    def outcome(order):
        arrays, metrics = strategy.aggregate_train(1, order)
        return arrays["w"].numpy().tobytes(), tuple(sorted(dict(metrics).items()))

    assert len(replies) == 3
    assert len({outcome(order) for order in itertools.permutations(replies)}) == 1


def test_strategy_registry() -> None:
    config = resolve_config(LINEAR)
    sampler = RoundSampler({p: p for p in range(5)}, config)
    assert {"fedavg", "invariant", "krum", "flame", "flain"} <= set(DEFENSES)
    strategy = make_strategy({**config, "defense": "invariant", "tau": 0.7}, sampler)
    assert "tau=0.7" in repr(strategy) and strategy.fraction_evaluate == 0.0
    with pytest.raises(ValueError, match="'defense'"):
        make_strategy({**config, "defense": "no-such-defense"}, sampler)


def test_evaluate_fn_metrics() -> None:
    config = resolve_config(LINEAR)
    task = load_task(config)
    model = model_for(task, config)
    with torch.no_grad():  # a model that always says "target" (class 1)
        model.weight.zero_()
        model.bias.copy_(torch.tensor([0.0, 1.0]))
    metrics = make_evaluate_fn(config)(1, ArrayRecord(model.state_dict()))
    assert metrics["acc_backdoor"] == 1.0
    assert metrics["acc_main"] == pytest.approx(float((task.test_y == 1).float().mean()))


def test_eval_every_skips_the_clean_test_set_but_not_the_backdoor_set() -> None:
    config = resolve_config({**LINEAR, "eval-every": 3, "num-server-rounds": 7})
    task = load_task(config)
    arrays = ArrayRecord(model_for(task, config).state_dict())
    evaluate_fn = make_evaluate_fn(config)
    full = [r for r in range(8) if "acc_main" in evaluate_fn(r, arrays)]
    assert full == [0, 3, 6, 7]  # round 0, every third, the last
    assert all("acc_backdoor" in evaluate_fn(r, arrays) for r in range(8))
    assert "loss" not in evaluate_fn(1, arrays)
    with pytest.raises(ValueError, match="'eval-every'"):
        resolve_config({**LINEAR, "eval-every": 0})


def test_experiments_in_a_real_simulation_with_eval_every_and_invariant() -> None:
    clients = resolve_config({**LINEAR, "malicious-fraction": 0.4})
    sparse_evaluation = {**clients, "num-server-rounds": 3, "eval-every": 2}
    invariant = {**clients, "defense": "invariant", "num-server-rounds": 2}
    sparse, record = run_experiments(clients, [sparse_evaluation, invariant])
    rounds = sparse["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert [("acc_main" in r) for r in rounds] == [True, False, True, True]
    assert all(0.0 <= r["acc_backdoor"] <= 1.0 for r in rounds)
    assert "train_num_aggregated" in rounds[1]

    rounds = record["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(0.0 <= r["acc_main"] <= 1.0 and 0.0 <= r["acc_backdoor"] <= 1.0 for r in rounds)
    assert rounds[2]["acc_main"] > 0.6  # learned something in two rounds
    assert rounds[1]["train_num_aggregated"] == 3 and 0.0 <= rounds[1]["train_mask_fraction"] <= 1.0
    assert record["config"]["defense"] == "invariant"
