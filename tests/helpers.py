"""Flower records and rounds for strategy tests, without a running federation."""

import io

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy


class Proxy(ClientProxy):
    """Identity only: aggregate_fit reads nothing but ``cid`` from a proxy."""

    def get_properties(self, *args, **kwargs):
        raise NotImplementedError

    def get_parameters(self, *args, **kwargs):
        raise NotImplementedError

    def fit(self, *args, **kwargs):
        raise NotImplementedError

    def evaluate(self, *args, **kwargs):
        raise NotImplementedError

    def reconnect(self, *args, **kwargs):
        raise NotImplementedError


class NodeList:
    """The part of a ``Grid`` that ``FedAvg.configure_train`` uses."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return self.node_ids


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def legacy_round(strategy, global_weights, client_tensors, failures=()):
    """configure_fit then aggregate_fit; ``client_tensors``: per client, lists of .npy bytes."""
    manager = SimpleClientManager()
    proxies = [Proxy(f"client-{i}") for i in range(len(client_tensors))]
    for proxy in proxies:
        manager.register(proxy)
    strategy.configure_fit(1, ndarrays_to_parameters(global_weights), manager)
    results = [
        (proxy, FitRes(Status(Code.OK, ""), Parameters(tensors, "numpy.ndarray"), 10 + i, {"loss": float(i)}))
        for i, (proxy, tensors) in enumerate(zip(proxies, client_tensors, strict=True))
    ]
    parameters, metrics = strategy.aggregate_fit(1, results, list(failures))
    return (None if parameters is None else parameters_to_ndarrays(parameters)), metrics


def message_round(strategy, global_weights, client_contents, error_nodes=(), keys=None):
    """configure_train then aggregate_train; ``client_contents``: per client, a RecordDict.

    ``keys``: names of the global arrays (default "0", "1", ...).
    """
    node_ids = [100 + i for i in range(len(client_contents))]
    arrays = (
        ArrayRecord(dict(zip(keys, map(Array, global_weights), strict=True)))
        if keys
        else ArrayRecord(global_weights)
    )
    strategy.configure_train(1, arrays, ConfigRecord({}), NodeList(node_ids))
    replies = []
    for node_id, content in zip(node_ids, client_contents, strict=True):
        instruction = Message(RecordDict({}), dst_node_id=node_id, message_type=MessageType.TRAIN)
        replies.append(Message(content, reply_to=instruction))
    for node_id in error_nodes:
        instruction = Message(RecordDict({}), dst_node_id=node_id, message_type=MessageType.TRAIN)
        replies.append(Message(Error(code=1, reason="client crashed"), reply_to=instruction))
    arrays, metrics = strategy.aggregate_train(1, replies)
    return (None if arrays is None else [arrays[key].numpy() for key in (keys or arrays)]), metrics


def reply_content(arrays: list, num_examples: int = 10, keys=None) -> RecordDict:
    keys = keys or [str(i) for i in range(len(arrays))]
    record = ArrayRecord(
        {key: a if isinstance(a, Array) else Array(a) for key, a in zip(keys, arrays, strict=True)}
    )
    return RecordDict(
        {"arrays": record, "metrics": MetricRecord({"num-examples": num_examples, "loss": 1.0})}
    )
