"""The simulation ClientApp, plus what Ray gave each virtual client in its train metrics.

A Flower mod adds ``ray-cpu``, ``ray-gpu`` (the actor's assigned resources) and
``ray-gcs-port`` (the port of the Ray cluster it runs in) to every train reply;
the strategy averages them into the round's ``train_*`` metrics.
"""

import ray
from flwr.app import Context, Message, MessageType

from simulation.client_app import make_client_app


def report_ray_resources(msg: Message, context: Context, call_next) -> Message:
    reply = call_next(msg, context)
    if msg.metadata.message_type == MessageType.TRAIN and not reply.has_error():
        runtime = ray.get_runtime_context()
        assigned = runtime.get_assigned_resources()
        metrics = reply.content["metrics"]
        metrics["ray-cpu"] = float(assigned.get("CPU", 0.0))
        metrics["ray-gpu"] = float(assigned.get("GPU", 0.0))
        metrics["ray-gcs-port"] = int(runtime.gcs_address.rsplit(":", 1)[1])
    return reply


app = make_client_app(mods=[report_ray_resources])
