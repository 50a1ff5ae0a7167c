"""A ``ClientApp`` for deployment tests: the project's app, except on nodes told to misbehave.

Node config ``misbehave`` (set per SuperNode with ``--node-config``) turns the
trained weights of every ``train`` reply into garbage:

* ``"nan"``: every array filled with NaN;
* ``"shape"``: every array one element longer along its first axis;
* ``"keys"``: the array names renamed.

Anything else (or no key) behaves exactly like ``simulation.client_app.app``.
Deployment runs every SuperNode on the same FAB, so the test ships this module
in a copy of the app whose ``clientapp`` points here.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from simulation.client_app import make_client_app

_honest = make_client_app()
app = ClientApp()


def _garbage(arrays: ArrayRecord, mode: str) -> ArrayRecord:
    numpy = {key: array.numpy() for key, array in arrays.items()}
    if mode == "nan":
        numpy = {key: np.full(value.shape, np.nan, dtype=np.float32) for key, value in numpy.items()}
    elif mode == "shape":
        numpy = {
            key: np.zeros((value.shape[0] + 1, *value.shape[1:]) if value.ndim else (2,), dtype=value.dtype)
            for key, value in numpy.items()
        }
    elif mode == "keys":
        numpy = {f"renamed-{key}": value for key, value in numpy.items()}
    return ArrayRecord({key: Array(value) for key, value in numpy.items()})


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train honestly, then spoil the weights if the node config says so."""
    reply = _honest(msg, context)
    mode = str(context.node_config.get("misbehave", ""))
    if mode not in ("nan", "shape", "keys") or reply.has_error():
        return reply
    content = RecordDict(
        {"arrays": _garbage(reply.content["arrays"], mode), "metrics": reply.content["metrics"]}
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """As the project's app."""
    return _honest(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """As the project's app (answers the partition query)."""
    return _honest(msg, context)
