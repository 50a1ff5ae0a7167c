"""Fixtures shared by the strategy tests."""

import logging

import pytest

try:  # flwr >= 1.3x: a Message made outside a running app needs a task identity
    from flwr.supercore.task_identity import TaskIdentity
except ImportError:  # older flwr: Messages need none
    TaskIdentity = None


@pytest.fixture
def task_identity(monkeypatch):
    """Messages outside a running app need a run id, as inside a ServerApp (newer Flower only)."""
    if TaskIdentity is not None:
        for name in ("_run_id", "_node_id", "_task_id"):
            monkeypatch.setattr(TaskIdentity, name, 1)


@pytest.fixture
def flwr_logs(caplog):
    logger = logging.getLogger("flwr")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)
