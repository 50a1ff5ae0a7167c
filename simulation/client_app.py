"""Flower ``ClientApp`` (Message API) for the simulation tasks: benign and malicious clients.

One app for every client: its partition (``context.node_config["partition-id"]``)
and the run config decide whether it trains benignly or runs the configured
backdoor attack (see :mod:`simulation.attacks`). Replies carry the trained
weights as an ``ArrayRecord`` under ``"arrays"`` and a ``MetricRecord`` under
``"metrics"`` with ``num-examples``, ``train_loss``, ``attacker`` (0/1; a
simulation label, ignored by the strategies) and ``update_norm``; an attacker that
optimised its trigger (``f3ba``, ``a3fl``) adds it as the ConfigRecord ``"trigger"``
(see :class:`simulation.triggers.TriggerRelay`), and the relayed trigger comes in the
train config's ``"attack-trigger"``.

``app`` reads its settings from the run config (``flwr run``);
:func:`make_client_app` bakes in overrides (for tests that run the apps in-process).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from .config import resolve_config
from .data import load_partitions, load_task
from .models import get_device
from .training import evaluate as evaluate_model
from .training import local_update, model_for
from .triggers import RELAY_KEY, REPLY_RECORD, Trigger, reply_record

__all__ = ["app", "make_client_app", "partition_of"]


def partition_of(context: Context, config: Mapping[str, Any]) -> int:
    """This node's partition id; checks ``num-partitions`` against the run config.

    Raises ``ValueError`` naming the key when ``partition-id`` is missing or the
    node's ``num-partitions`` differs from the run config's.
    """
    node = context.node_config
    if "partition-id" not in node:
        raise ValueError("node config has no 'partition-id' (set it with --node-config 'partition-id=N')")
    nodes = int(node.get("num-partitions", config["num-partitions"]))
    if nodes != config["num-partitions"]:
        raise ValueError(
            f"node config 'num-partitions' ({nodes}) differs from run config 'num-partitions' "
            f"({config['num-partitions']}); start as many SuperNodes as partitions"
        )
    return int(node["partition-id"])


def make_client_app(overrides: Mapping[str, Any] | None = None, mods: Sequence[Mod] = ()) -> ClientApp:
    """A ``ClientApp`` whose run config is ``DEFAULTS | context.run_config | overrides``.

    ``mods``: Flower client mods wrapped around every handler.
    """
    client_app = ClientApp(mods=list(mods))

    def settings(context: Context) -> dict[str, Any]:
        return resolve_config(context.run_config, overrides)

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        config = settings(context)
        round_config = msg.content.get("config", {})
        relayed = round_config.get(RELAY_KEY)
        partition = partition_of(context, config)
        result = local_update(
            config,
            partition,
            int(round_config.get("server-round", 0)),
            msg.content["arrays"].to_torch_state_dict(),
            pretrain=bool(round_config.get("pretrain", False)),
            trigger=Trigger.from_bytes(bytes(relayed)) if relayed is not None else None,
        )
        metrics = MetricRecord(
            {
                "num-examples": result.num_examples,
                "train_loss": result.train_loss,
                "attacker": int(result.attacking),
                "update_norm": result.update_norm,
            }
        )
        content = RecordDict({"arrays": ArrayRecord(result.state_dict), "metrics": metrics})
        if result.trigger is not None:
            content[REPLY_RECORD] = reply_record(result.trigger, partition)
        return Message(content=content, reply_to=msg)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Accuracy and loss of the received model on this client's (clean) partition."""
        config = settings(context)
        task = load_task(config)
        rows = torch.from_numpy(load_partitions(config)[partition_of(context, config)])
        model = model_for(task, config)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        loss, acc = evaluate_model(
            model,
            task.train_x[rows],
            task.train_y[rows],
            task.preprocess,
            config["eval-batch-size"],
            get_device(config["device"]),
        )
        metrics = MetricRecord({"num-examples": len(rows), "eval_loss": loss, "eval_acc": acc})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        """Reply with this node's ``partition-id`` (the ServerApp maps partitions to nodes)."""
        config = settings(context)
        record = MetricRecord({"partition-id": partition_of(context, config)})
        return Message(content=RecordDict({"metrics": record}), reply_to=msg)

    return client_app


app = make_client_app()
