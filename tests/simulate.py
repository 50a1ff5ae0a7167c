"""Several experiments on one in-process Flower federation: the tests' fast harness.

``python -m simulation`` runs each experiment on a local SuperLink through ``flwr run``
(tested in ``test_grid.py`` and ``test_checkpoint.py``); starting one per experiment
costs seconds, so tests that run many short experiments share one federation of
Flower's in-process ``run_simulation`` instead (which logs Flower's deprecation notice). This
module is the one place that calls it, so a Flower release without it changes this file only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from simulation.client_app import make_client_app
from simulation.server_app import run_experiment

BACKEND = {
    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    "init_args": {"address": "local", "num_cpus": 2},
}


def run_experiments(
    clients: Mapping[str, Any],
    configs: Sequence[Mapping[str, Any]],
    on_round: Callable[[dict[str, Any]], None] | None = None,
    keep_errors: bool = False,
) -> list[Any]:
    """Run ``configs`` one after another on one federation of ``clients["num-partitions"]``
    SuperNodes whose ClientApp reads ``clients``; returns each run's record.

    A run that raises does not stop the others; its exception is raised afterwards, or,
    with ``keep_errors``, returned in its place (``on_round`` may raise to interrupt a run).
    """
    results: list[Any] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        for config in configs:
            try:
                results.append(run_experiment(grid, config, on_round))
            except Exception as error:  # noqa: BLE001 - handed to the test to assert on
                results.append(error)

    run_simulation(server_app, make_client_app(clients), clients["num-partitions"], backend_config=BACKEND)
    errors = [result for result in results if isinstance(result, Exception)]
    if errors and not keep_errors:
        raise errors[0]
    return results
