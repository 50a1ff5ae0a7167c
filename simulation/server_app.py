"""Flower ``ServerApp`` (Message API) for the backdoor experiments.

Reads the run config (:mod:`simulation.config`), builds the defense from
:data:`baselines.DEFENSES`, samples ``clients-per-round`` partitions per round
with a generator seeded by ``(seed, round)`` (so every defense sees the same
clients on the same seed), runs ``strategy.start(...)`` with the server-side
``evaluate_fn`` and records per-round metrics (``acc_main``, ``acc_backdoor``,
``loss``, number of attackers sampled, and the defense's train metrics).

Before round 1 the app sends one ``query`` message to every node to learn its
``partition-id``; the sampler then works on partitions, not on node ids (which
differ from run to run). Under ``attack-schedule = "every-k"`` the single
attacker is left out of the random draw and added in rounds k, 2k, ...
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from baselines import DEFENSES
from baselines.flain import FLAIN, FlainRepair

from .config import resolve_config
from .partition import attacker_partitions, is_attack_round
from .pretrain import pretrain

__all__ = [
    "RoundSampler",
    "discover_partitions",
    "make_server_app",
    "make_strategy",
    "app",
]


class RoundSampler:
    """Chooses each round's node ids from partition ids, reproducibly from ``seed``.

    ``node_of``: partition id -> node id. ``pool`` schedule: ``clients-per-round``
    partitions uniformly without replacement (malicious ones like everyone
    else). ``every-k``: the attacker only in rounds divisible by ``attack-every``.
    ``stream`` is mixed into the seed: another stream draws other clients.
    """

    def __init__(self, node_of: Mapping[int, int], config: Mapping[str, Any], stream: int = 0x5A) -> None:
        self.node_of = dict(node_of)
        self.config = config
        self.stream = stream
        self.attackers = set(
            attacker_partitions(
                config["num-partitions"],
                config["malicious-fraction"],
                config["seed"],
                config["attack-schedule"],
            )
        )
        self.history: dict[int, list[int]] = {}

    def partitions(self, server_round: int) -> list[int]:
        """Sorted partition ids sampled for ``server_round``."""
        config = self.config
        rng = np.random.default_rng([config["seed"], server_round, self.stream])
        everyone = sorted(self.node_of)
        count = min(config["clients-per-round"], len(everyone))
        if config["attack-schedule"] == "every-k" and config["attack"] != "none":
            benign = [p for p in everyone if p not in self.attackers]
            attack_round = is_attack_round(
                server_round, "every-k", config["attack-every"], config["attack-start-round"]
            )
            drawn = rng.choice(benign, size=count - attack_round, replace=False).tolist()
            chosen = drawn + (sorted(self.attackers) if attack_round else [])
        else:
            chosen = rng.choice(everyone, size=count, replace=False).tolist()
        self.history[server_round] = sorted(int(p) for p in chosen)
        return self.history[server_round]

    def nodes(self, server_round: int) -> list[int]:
        """Node ids of :meth:`partitions`."""
        return [self.node_of[p] for p in self.partitions(server_round)]

    def num_attackers(self, server_round: int) -> int:
        """How many sampled partitions of ``server_round`` are malicious (a simulation label)."""
        config = self.config
        attacks = is_attack_round(
            server_round, config["attack-schedule"], config["attack-every"], config["attack-start-round"]
        )
        if config["attack"] == "none" or not attacks:
            return 0
        return sum(p in self.attackers for p in self.history.get(server_round, []))


class _FixedNodesGrid:
    """A view of a ``Grid`` whose ``get_node_ids`` returns the nodes chosen for the round."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid = grid
        self._node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class SeededSampling:
    """Mixin for Message API strategies: train on the nodes :class:`RoundSampler` picks."""

    def __init__(self, *, sampler: RoundSampler, **kwargs: Any) -> None:
        self.sampler = sampler
        super().__init__(**kwargs)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Any:
        """Configure like the wrapped strategy, on this round's sampled nodes only."""
        nodes = self.sampler.nodes(server_round)
        log(INFO, "round %s: partitions %s", server_round, self.sampler.history[server_round])
        return super().configure_train(server_round, arrays, config, _FixedNodesGrid(grid, nodes))  # type: ignore[misc]


def make_strategy(config: Mapping[str, Any], sampler: RoundSampler) -> FedAvg:
    """The run config's ``defense`` (from :data:`baselines.DEFENSES`) with seeded sampling."""
    if config["defense"] not in DEFENSES:
        raise ValueError(
            f"run config 'defense' must be one of {', '.join(DEFENSES)}; got {config['defense']!r}"
        )
    cls, kwargs = DEFENSES[config["defense"]](config)
    sampled = type(f"Sampled{cls.__name__}", (SeededSampling, cls), {})
    return sampled(
        sampler=sampler,
        fraction_train=1.0,
        fraction_evaluate=0.0,  # evaluation happens server-side (evaluate_fn)
        min_train_nodes=1,
        min_available_nodes=1,
        **kwargs,
    )


def discover_partitions(grid: Grid, num_partitions: int, timeout: float = 120.0) -> dict[int, int]:
    """Ask every node for its ``partition-id``; returns partition id -> node id.

    Waits until ``num_partitions`` nodes are connected; raises ``RuntimeError``
    when they do not connect or do not all answer with distinct ids in
    ``[0, num_partitions)``.
    """
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < num_partitions:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of num-partitions={num_partitions} nodes connected")
        time.sleep(0.5)
    messages = [
        Message(
            content=RecordDict({"config": ConfigRecord()}), message_type=MessageType.QUERY, dst_node_id=node
        )
        for node in nodes
    ]
    node_of: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} failed the partition query: {reply.error}")
        pid = int(reply.content["metrics"]["partition-id"])
        node_of[pid] = reply.metadata.src_node_id
    if sorted(node_of) != list(range(num_partitions)):
        raise RuntimeError(f"nodes reported partitions {sorted(node_of)}, expected 0..{num_partitions - 1}")
    return node_of


def flain_repair(task: Any, config: Mapping[str, Any]) -> FlainRepair:
    """FLAIN's repair with ``flain-aux-size`` clean training examples held by the server.

    The auxiliary examples are a seeded sample of the training pool (clients may
    hold the same images, as a server's clean data would come from the same
    distribution); never the test set that ``acc_main`` is measured on.
    """
    from .training import model_for

    rng = np.random.default_rng([config["seed"], 0xF1A1])
    count = min(config["flain-aux-size"], len(task.train_y))
    chosen = torch.from_numpy(np.sort(rng.choice(len(task.train_y), count, replace=False)))
    x, y = task.train_x[chosen], task.train_y[chosen]
    batch = config["eval-batch-size"]
    batches = [(task.preprocess(x[i : i + batch]), y[i : i + batch]) for i in range(0, count, batch)]
    return FlainRepair(model_fn=lambda: model_for(task, config), aux_loader=batches)


def run_experiment(
    grid: Grid, config: Mapping[str, Any], on_round: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run one experiment on ``grid``; returns ``{"config": ..., "rounds": [per-round metrics]}``.

    With ``pretrain-rounds`` > 0 the rounds start from a benignly pretrained model
    (:mod:`simulation.pretrain`; round 0's row evaluates it) and the record gets a
    ``"pretrain"`` summary.

    Each round's row has ``round``, the server-side metrics (``acc_backdoor``;
    ``acc_main`` and ``loss`` on the rounds ``eval-every`` evaluates), ``seconds``
    (wall time since the previous evaluation), ``attackers_sampled`` and the strategy's
    metrics as ``train_*``.
    ``on_round`` gets each evaluation row (without ``train_*``) as it happens.
    """
    from .data import load_task
    from .training import make_evaluate_fn, model_for

    task = load_task(config)
    initial = ArrayRecord(model_for(task, config, pretrained_weights=True).state_dict())
    node_of = discover_partitions(grid, config["num-partitions"], config["round-timeout"])
    pretrained = None
    if config["pretrain-rounds"]:
        initial, pretrained = pretrain(grid, config, node_of, initial)
    sampler = RoundSampler(node_of, config)
    strategy = make_strategy(config, sampler)
    if isinstance(strategy, FLAIN):
        strategy.repair = flain_repair(task, config)
    evaluate = make_evaluate_fn(config)
    seconds: dict[int, float] = {}
    clock = [time.monotonic()]

    def timed_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        metrics = evaluate(server_round, arrays)
        now = time.monotonic()
        seconds[server_round] = now - clock[0]
        clock[0] = now
        if on_round is not None:
            on_round({"round": server_round, **dict(metrics), "seconds": seconds[server_round]})
        return metrics

    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=config["num-server-rounds"],
        timeout=config["round-timeout"],
        train_config=ConfigRecord({}),
        evaluate_fn=timed_evaluate,
    )
    rounds = []
    for server_round, metrics in sorted(result.evaluate_metrics_serverapp.items()):
        row: dict[str, Any] = {"round": server_round, **dict(metrics)}
        row["seconds"] = seconds.get(server_round, 0.0)
        row["attackers_sampled"] = sampler.num_attackers(server_round)
        train_metrics = result.train_metrics_clientapp.get(server_round)
        if train_metrics is not None:
            row.update({f"train_{k}": v for k, v in dict(train_metrics).items()})
        rounds.append(row)
    record: dict[str, Any] = {"config": dict(config), "rounds": rounds}
    if pretrained is not None:
        start = rounds[0]  # round 0 evaluates the pretrained model the strategy started from
        record["pretrain"] = {**pretrained, **{k: start[k] for k in ("acc_main", "acc_backdoor", "loss")}}
    return record


def make_server_app(
    overrides: Mapping[str, Any] | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> ServerApp:
    """A ``ServerApp`` whose run config is ``DEFAULTS | context.run_config | overrides``.

    ``on_result`` receives the per-round record when the run ends (run config
    ``results-file``, if set, gets it as JSON); ``on_round`` each evaluation row.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        config = resolve_config(context.run_config, overrides)
        log(INFO, "simulation config: %s", {k: config[k] for k in ("task", "defense", "attack", "backdoor")})
        record = run_experiment(grid, config, on_round)
        for row in record["rounds"]:
            shown = " ".join(f"{k} {row[k]:.4f}" for k in ("acc_main", "acc_backdoor", "loss") if k in row)
            log(INFO, "round %s: %s", row["round"], shown)
        if config["results-file"]:
            path = Path(config["results-file"])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=1, default=float))
            log(INFO, "wrote per-round metrics to %s", path)
        if on_result is not None:
            on_result(record)
        elif not config["results-file"]:
            log(WARNING, "no 'results-file' set: per-round metrics are only in the log")

    return server_app


app = make_server_app()
