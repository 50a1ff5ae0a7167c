"""Flower ``ServerApp`` (Message API) for the backdoor experiments.

Reads the run config (:mod:`simulation.config`), builds the defense from
:data:`baselines.DEFENSES` with seeded client sampling (:mod:`simulation.sampling`),
runs its rounds as Flower's ``strategy.start(...)`` does (:func:`run_rounds`) with the
server-side ``evaluate_fn`` and records per-round metrics (``acc_main``, ``acc_backdoor``,
``loss``, number of attackers sampled, and the defense's train metrics).

With ``checkpoint-dir`` it writes a round checkpoint (:mod:`simulation.checkpoint`) and,
started again, continues from it: in simulation and on a restarted SuperLink alike.

Before round 1 the app sends one ``query`` message to every node to learn its
``partition-id``; the sampler then works on partitions, not on node ids.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info

from baselines.crfl import CRFL
from baselines.deepsight import DeepSight
from baselines.flain import FLAIN
from baselines.flain_repair import FlainRepair
from baselines.fltrust import FLTrust
from baselines.server_side import OutputProbe, RootTrainer

from .checkpoint import (
    Checkpoint,
    CheckpointError,
    check_model,
    checkpoint_lock,
    read_checkpoint,
    restore_strategy_state,
    strategy_state,
    write_checkpoint,
)
from .config import resolve_config
from .pretrain import pretrain
from .sampling import RoundSampler, make_strategy
from .triggers import OPTIMISED_TRIGGER_ATTACKS, Trigger, TriggerRelay

__all__ = ["RoundHistory", "app", "discover_partitions", "make_server_app", "run_experiment", "run_rounds"]

#: Seconds a ServerApp waits for another one to release its checkpoint directory (the
#: ServerApp of a killed SuperLink may take a few seconds to notice and exit).
LOCK_WAIT = 120.0


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

    x, y = training_sample(task, config["flain-aux-size"], config["seed"], 0xF1A1)
    count, batch = len(y), config["eval-batch-size"]
    batches = [(task.preprocess(x[i : i + batch]), y[i : i + batch]) for i in range(0, count, batch)]
    return FlainRepair(model_fn=lambda: model_for(task, config), aux_loader=batches)


def training_sample(task: Any, size: int, seed: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` examples of the training pool (all if fewer), drawn with ``(seed, stream)``;
    never the test set that ``acc_main`` is measured on."""
    rng = np.random.default_rng([seed, stream])
    count = min(size, len(task.train_y))
    chosen = torch.from_numpy(np.sort(rng.choice(len(task.train_y), count, replace=False)))
    return task.train_x[chosen], task.train_y[chosen]


def fltrust_root_trainer(task: Any, config: Mapping[str, Any]) -> RootTrainer:
    """FLTrust's server update: ``fltrust-root-size`` seeded training examples, trained on
    with the clients' local-training settings."""
    from .models import get_device
    from .training import model_for, train_as_configured

    x, y = training_sample(task, config["fltrust-root-size"], config["seed"], 0xF7)
    device = get_device(config["device"])

    def train_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> float:
        return train_as_configured(model, x, y, task, config, device, seed)

    return RootTrainer(
        model_fn=lambda: model_for(task, config), x=x, y=y, train_fn=train_fn, seed=config["seed"]
    )


def deepsight_probe(task: Any, config: Mapping[str, Any], num_seeds: int = 3) -> OutputProbe:
    """DeepSight's random inputs: ``deepsight-probe-size`` per seed, uniform over the input
    space (uint8 pixels, token ids below the vocabulary size, standard normal features)."""
    from .models import get_device
    from .training import model_for

    shape = (config["deepsight-probe-size"], *task.train_x.shape[1:])
    inputs = []
    for s in range(num_seeds):
        generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([config["seed"], 0xD5, s]).generate_state(1)[0])
        )
        if task.is_image:
            inputs.append(torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8))
        elif task.is_text:
            inputs.append(
                torch.randint(0, task.vocab_size, shape, generator=generator, dtype=task.train_x.dtype)
            )
        else:
            inputs.append(torch.randn(shape, generator=generator, dtype=task.train_x.dtype))
    return OutputProbe(
        model_fn=lambda: model_for(task, config),
        inputs=inputs,
        preprocess=task.preprocess,
        batch_size=config["eval-batch-size"],
        device=str(get_device(config["device"])),
    )


def attach_server_side(strategy: FedAvg, task: Any, config: Mapping[str, Any]) -> None:
    """Give the defenses that work on server-held data or models what they need."""
    if isinstance(strategy, FLAIN):
        strategy.repair = flain_repair(task, config)
    if isinstance(strategy, FLTrust):
        strategy.root_update = fltrust_root_trainer(task, config)
    if isinstance(strategy, DeepSight):
        strategy.probe = deepsight_probe(task, config)


@dataclass
class RoundHistory:
    """Per-round metrics of a run so far, keyed by round (what a checkpoint keeps of them)."""

    evaluate: dict[int, dict[str, Any]] = field(default_factory=dict)  # server-side evaluation
    train: dict[int, dict[str, Any]] = field(default_factory=dict)  # the strategy's train metrics
    seconds: dict[int, float] = field(default_factory=dict)  # wall time since the previous evaluation
    attackers: dict[int, int] = field(default_factory=dict)  # malicious partitions sampled

    def to_json(self) -> dict[str, dict[str, Any]]:
        """JSON-able form (round numbers become strings)."""
        return {name: {str(r): v for r, v in getattr(self, name).items()} for name in _HISTORY_FIELDS}

    @classmethod
    def from_json(cls, document: Mapping[str, Mapping[str, Any]]) -> RoundHistory:
        """Inverse of :meth:`to_json`."""
        return cls(**{name: {int(r): v for r, v in document[name].items()} for name in _HISTORY_FIELDS})

    def rows(self) -> list[dict[str, Any]]:
        """One row per evaluated round: ``round``, evaluation metrics, ``seconds``,
        ``attackers_sampled`` and the train metrics as ``train_*``."""
        rows = []
        for server_round, metrics in sorted(self.evaluate.items()):
            row: dict[str, Any] = {"round": server_round, **metrics}
            row["seconds"] = self.seconds.get(server_round, 0.0)
            row["attackers_sampled"] = self.attackers.get(server_round, 0)
            train_metrics = self.train.get(server_round)
            if train_metrics is not None:
                row.update({f"train_{k}": v for k, v in train_metrics.items()})
            rows.append(row)
        return rows


_HISTORY_FIELDS = ("evaluate", "train", "seconds", "attackers")


def run_rounds(
    strategy: FedAvg,
    grid: Grid,
    arrays: ArrayRecord,
    first_round: int,
    config: Mapping[str, Any],
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord],
    history: RoundHistory,
    after_round: Callable[[int, ArrayRecord], None],
    relay: TriggerRelay | None = None,
) -> ArrayRecord:
    """Rounds ``first_round`` .. ``num-server-rounds`` of ``strategy``; returns the final arrays.

    The steps and their order are those of Flower's ``Strategy.start`` (round 0
    only evaluates the starting model), so a run gives the same numbers; unlike it,
    this loop can start after round 0, records the evaluation and train metrics in
    ``history`` and calls ``after_round(round, arrays)`` once each round is evaluated.
    ``relay`` passes the attackers' optimised trigger on to the next round's clients
    (``f3ba``, ``a3fl``; its latest trigger is what ``evaluate_fn`` should measure with).
    """
    num_rounds, timeout = config["num-server-rounds"], config["round-timeout"]
    train_config, evaluate_config = ConfigRecord({}), ConfigRecord()
    log(INFO, "Starting %s strategy:", type(strategy).__name__)
    log_strategy_start_info(num_rounds, arrays, train_config, evaluate_config)
    strategy.summary()
    log(INFO, "")
    if first_round == 0:
        history.evaluate[0] = dict(evaluate_fn(0, arrays))
        log(INFO, "Initial global evaluation results: %s", history.evaluate[0])
        after_round(0, arrays)
    for server_round in range(max(first_round, 1), num_rounds + 1):
        log(INFO, "")
        log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
        if relay is not None:
            relay.attach(train_config)
        messages = strategy.configure_train(server_round, arrays, train_config, grid)
        replies = list(grid.send_and_receive(messages=messages, timeout=timeout))
        if relay is not None:
            relay.collect(replies)
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        if train_metrics is not None:
            log(INFO, "\t└──> Aggregated MetricRecord: %s", train_metrics)
            history.train[server_round] = dict(train_metrics)
        messages = strategy.configure_evaluate(server_round, arrays, evaluate_config, grid)
        replies = grid.send_and_receive(messages=messages, timeout=timeout)
        strategy.aggregate_evaluate(server_round, replies)  # none: evaluation happens on the server
        log(INFO, "Global evaluation")
        history.evaluate[server_round] = dict(evaluate_fn(server_round, arrays))
        log(INFO, "\t└──> MetricRecord: %s", history.evaluate[server_round])
        after_round(server_round, arrays)
    return arrays


def run_experiment(
    grid: Grid, config: Mapping[str, Any], on_round: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run one experiment on ``grid``; returns ``{"config": ..., "rounds": [per-round metrics]}``.

    With ``pretrain-rounds`` > 0 the rounds start from a benignly pretrained model
    (:mod:`simulation.pretrain`; round 0's row evaluates it) and the record gets a
    ``"pretrain"`` summary.

    With ``checkpoint-dir`` set, the run resumes from the checkpoint there (if any;
    the record then has ``resumed_from_round``) and writes one after round 0, every
    ``checkpoint-every`` rounds and after the last (:mod:`simulation.checkpoint`). A
    checkpoint of another run config or model is refused with ``CheckpointError``.

    Each round's row has ``round``, the server-side metrics (``acc_backdoor``;
    ``acc_main`` and ``loss`` on the rounds ``eval-every`` evaluates), ``seconds``
    (wall time since the previous evaluation), ``attackers_sampled`` and the strategy's
    metrics as ``train_*``.
    ``on_round`` gets each evaluation row (without ``train_*``) as it happens. Under
    ``f3ba`` / ``a3fl`` the record's ``attack_trigger`` is the attackers' last trigger (hex
    of :meth:`simulation.triggers.Trigger.to_bytes`); under ``crfl`` its
    ``crfl_certificate`` is the final model's certificate (:mod:`simulation.crfl_certify`).
    """
    directory = Path(config["checkpoint-dir"]).expanduser() if config["checkpoint-dir"] else None
    with checkpoint_lock(directory, wait=LOCK_WAIT):
        return _run_experiment(grid, config, directory, on_round)


def _run_experiment(
    grid: Grid,
    config: Mapping[str, Any],
    directory: Path | None,
    on_round: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    from .data import load_task
    from .training import make_evaluate_fn, model_for

    saved = read_checkpoint(directory, config) if directory is not None else None
    task = load_task(config)
    initial = ArrayRecord(model_for(task, config, pretrained_weights=True).state_dict())
    if saved is not None:
        check_model(saved, initial)
    node_of = discover_partitions(grid, config["num-partitions"], config["round-timeout"])
    sampler = RoundSampler(node_of, config)
    strategy = make_strategy(config, sampler)
    keeps_initial = isinstance(strategy, FLAIN)  # its repair needs the round-0 model
    attach_server_side(strategy, task, config)
    pretrained = None
    if saved is None:
        if config["pretrain-rounds"]:
            initial, pretrained = pretrain(grid, config, node_of, initial)
        arrays, history, first_round = initial, RoundHistory(), 0
    else:
        restore_strategy_state(strategy, saved, node_of)
        if keeps_initial:
            if saved.initial is None:
                raise CheckpointError(f"checkpoint {str(saved.path)!r} lacks the round-0 model FLAIN needs")
            initial = _array_record(saved.initial)
        try:
            history = RoundHistory.from_json(saved.history)
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"checkpoint {str(saved.path)!r}: unreadable history ({error!r})") from None
        arrays = _array_record(saved.model)
        pretrained, first_round = saved.pretrain, saved.server_round + 1
        log(
            INFO,
            "resuming from %s: %d of %d rounds done",
            saved.path,
            first_round - 1,
            config["num-server-rounds"],
        )
    relay = TriggerRelay(_relayed_trigger(saved, config))
    evaluate = make_evaluate_fn(config, lambda: relay.current)
    clock = [time.monotonic()]

    def timed_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        metrics = evaluate(server_round, arrays)
        now = time.monotonic()
        history.seconds[server_round] = now - clock[0]
        history.attackers[server_round] = sampler.num_attackers(server_round)
        clock[0] = now
        if on_round is not None:
            on_round({"round": server_round, **dict(metrics), "seconds": history.seconds[server_round]})
        return metrics

    def save(server_round: int, arrays: ArrayRecord) -> None:
        last = server_round == config["num-server-rounds"]
        if directory is None or (server_round % config["checkpoint-every"] and not last):
            return
        state_arrays, state_meta = strategy_state(strategy, sampler.partition_of)
        checkpoint = Checkpoint(
            server_round=server_round,
            model=_numpy(arrays),
            history=history.to_json(),
            initial=_numpy(initial) if keeps_initial else None,
            strategy_arrays=state_arrays,
            strategy_meta=state_meta,
            pretrain=pretrained,
            attack_trigger=None if relay.current is None else relay.current.to_bytes().hex(),
        )
        path = write_checkpoint(directory, config, checkpoint)
        log(INFO, "round %d: checkpoint written to %s", server_round, path)

    arrays = run_rounds(strategy, grid, arrays, first_round, config, timed_evaluate, history, save, relay)
    if isinstance(strategy, FLAIN):
        result = Result(
            arrays=arrays,
            evaluate_metrics_serverapp={r: MetricRecord(m) for r, m in history.evaluate.items()},
        )
        result = strategy.finish(result, initial, config["num-server-rounds"], timed_evaluate)
        history.evaluate = {r: dict(m) for r, m in result.evaluate_metrics_serverapp.items()}
    rounds = history.rows()
    record: dict[str, Any] = {"config": dict(config), "rounds": rounds}
    if isinstance(strategy, CRFL) and config["crfl-certify-copies"]:
        from .crfl_certify import certify_run

        record["crfl_certificate"] = certify_run(
            task, config, strategy, arrays.to_torch_state_dict(), history.attackers
        )
        log(INFO, "CRFL certificate: %s", record["crfl_certificate"])
    if pretrained is not None:
        start = rounds[0]  # round 0 evaluates the pretrained model the strategy started from
        record["pretrain"] = {**pretrained, **{k: start[k] for k in ("acc_main", "acc_backdoor", "loss")}}
    if saved is not None:
        record["resumed_from_round"] = saved.server_round
    if relay.current is not None:
        record["attack_trigger"] = relay.current.to_bytes().hex()  # Trigger.from_bytes(bytes.fromhex(...))
    return record


def _relayed_trigger(saved: Checkpoint | None, config: Mapping[str, Any]) -> Trigger | None:
    """The trigger a resumed ``f3ba`` / ``a3fl`` run relays next (``None``: the starting one)."""
    if saved is None:
        return None
    if saved.attack_trigger is not None:
        return Trigger.from_bytes(bytes.fromhex(saved.attack_trigger))
    if saved.server_round > 0 and config["attack"] in OPTIMISED_TRIGGER_ATTACKS:
        log(WARNING, "checkpoint %s keeps no relayed trigger: it restarts from the start", saved.path)
    return None


def _numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in arrays.items()}


def _array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(np.asarray(array)) for key, array in arrays.items()})


def make_server_app(
    overrides: Mapping[str, Any] | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> ServerApp:
    """A ``ServerApp`` whose run config is ``DEFAULTS | context.run_config | overrides``.

    ``on_result`` receives the per-round record when the run ends (run config
    ``results-file``, if set, gets it as JSON); ``on_round`` each evaluation row
    (run config ``rounds-file``, if set, gets each as a JSON line as it happens).
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        config = resolve_config(context.run_config, overrides)
        log(INFO, "simulation config: %s", {k: config[k] for k in ("task", "defense", "attack", "backdoor")})
        record = run_experiment(grid, config, _round_sink(config["rounds-file"], on_round))
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


def _round_sink(
    path: str, on_round: Callable[[dict[str, Any]], None] | None
) -> Callable[[dict[str, Any]], None] | None:
    """``on_round``, also appending each row to the JSON-lines file ``path`` (if set)."""
    if not path:
        return on_round
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)

    def sink(row: dict[str, Any]) -> None:
        with target.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(row, default=float) + "\n")
        if on_round is not None:
            on_round(row)

    return sink


app = make_server_app()
