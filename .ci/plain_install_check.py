"""Run by .ci/run in the plain install: no heavy package came with it, and both strategy classes
aggregate a round from the installed package."""

import importlib.util

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

import baselines
import flwr_invariant
import flwr_invariant.serverapp

brought = [m for m in ("torch", "torchvision", "ray", "sklearn", "matplotlib") if importlib.util.find_spec(m)]
assert not brought, f"the plain install brought {brought}"
print("plain install: no torch, torchvision, Ray, scikit-learn or matplotlib;", flwr_invariant.__file__)

start = [np.zeros(3, dtype=np.float32)]
returned = [np.ones(3, dtype=np.float32)]


class Proxy(ClientProxy):
    """Identity only: the strategy reads nothing but ``cid``."""

    get_properties = get_parameters = fit = evaluate = reconnect = None


Proxy.__abstractmethods__ = frozenset()
manager = SimpleClientManager()
manager.register(proxy := Proxy("client-0"))
legacy = flwr_invariant.InvariantAggregation(min_fit_clients=1, min_available_clients=1)
legacy.configure_fit(1, ndarrays_to_parameters(start), manager)
fit = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(returned), 10, {})
parameters, metrics = legacy.aggregate_fit(1, [(proxy, fit)], [])
assert parameters_to_ndarrays(parameters)[0].tolist() == [1.0, 1.0, 1.0], metrics

message_api = flwr_invariant.serverapp.InvariantAggregation(min_train_nodes=1, min_available_nodes=1)


class Nodes:
    def get_node_ids(self):
        return [7]


try:  # newer flwr needs a task identity for a Message made outside a running app
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = 1
except ImportError:
    pass
message_api.configure_train(1, ArrayRecord(start), ConfigRecord({}), Nodes())
content = RecordDict({"arrays": ArrayRecord(returned), "metrics": MetricRecord({"num-examples": 10})})
instruction = Message(RecordDict({}), dst_node_id=7, message_type=MessageType.TRAIN)
arrays, metrics = message_api.aggregate_train(1, [Message(content, reply_to=instruction)])
assert arrays is not None and metrics["num_aggregated"] == 1, metrics
assert "robust-lr" in baselines.DEFENSES
print("both strategy classes aggregated a round")
