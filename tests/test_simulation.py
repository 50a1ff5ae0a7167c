"""Real Flower simulations (``run_simulation``, Ray backend) with both strategy APIs.

Clients fit a linear regression ``y = X @ W_TRUE`` with a few gradient steps on
their own data; client 0 always returns NaN, which must be excluded every round
without stopping the run or spoiling the model.
"""

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters
from flwr.server import ServerAppComponents, ServerConfig
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

import flwr_invariant.serverapp as message_api
from flwr_invariant import InvariantAggregation

W_TRUE = np.array([1.5, -2.0, 0.5, 3.0], dtype=np.float32)
NUM_CLIENTS = 6
NUM_ROUNDS = 4
BACKEND = {
    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    "init_args": {"address": "local", "num_cpus": 2},
}


def local_fit(weights: list[np.ndarray], partition_id: int) -> list[np.ndarray]:
    """Ten gradient steps on 64 seeded samples; partition 0 is broken and sends NaN."""
    if partition_id == 0:
        return [np.full_like(w, np.nan) for w in weights]
    rng = np.random.default_rng(partition_id)
    features = rng.standard_normal((64, W_TRUE.size)).astype(np.float32)
    targets = features @ W_TRUE
    w, b = weights[0].copy(), weights[1].copy()
    for _ in range(10):
        error = features @ w + b - targets
        w -= 0.1 * features.T @ error / len(targets)
        b -= 0.1 * error.mean(keepdims=True)
    return [w, b]


def distance_to_truth(weights: list[np.ndarray]) -> float:
    return float(np.linalg.norm(weights[0] - W_TRUE) + abs(weights[1][0]))


INITIAL = [np.zeros(W_TRUE.size, dtype=np.float32), np.zeros(1, dtype=np.float32)]


def test_legacy_strategy_in_a_real_simulation():
    distances: list[float] = []

    class Client(NumPyClient):
        def __init__(self, partition_id: int) -> None:
            self.partition_id = partition_id

        def fit(self, parameters, config):
            return local_fit(parameters, self.partition_id), 64, {}

    def evaluate(server_round, weights, config):
        distances.append(distance_to_truth(weights))
        return distances[-1], {}

    def server_fn(context: Context) -> ServerAppComponents:
        strategy = InvariantAggregation(
            tau=0.6,
            trim_ratio=0.2,
            min_fit_clients=NUM_CLIENTS,
            min_available_clients=NUM_CLIENTS,
            fraction_evaluate=0.0,
            evaluate_fn=evaluate,
            initial_parameters=ndarrays_to_parameters(INITIAL),
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=NUM_ROUNDS))

    client_app = ClientApp(
        client_fn=lambda context: Client(int(context.node_config["partition-id"])).to_client()
    )
    run_simulation(ServerApp(server_fn=server_fn), client_app, NUM_CLIENTS, backend_config=BACKEND)

    assert len(distances) == NUM_ROUNDS + 1  # initial evaluation + one per round
    assert all(np.isfinite(distances))
    assert distances[-1] < 0.5 * distances[0]


def test_message_api_strategy_in_a_real_simulation():
    results = []
    client_app = ClientApp()

    @client_app.train()
    def train(message: Message, context: Context) -> Message:
        weights = message.content["arrays"].to_numpy_ndarrays()
        fitted = local_fit(weights, int(context.node_config["partition-id"]))
        content = RecordDict({"arrays": ArrayRecord(fitted), "metrics": MetricRecord({"num-examples": 64})})
        return Message(content=content, reply_to=message)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = message_api.InvariantAggregation(
            tau=0.6,
            trim_ratio=0.2,
            min_train_nodes=NUM_CLIENTS,
            min_available_nodes=NUM_CLIENTS,
            fraction_evaluate=0.0,
        )
        results.append(
            strategy.start(
                grid=grid,
                initial_arrays=ArrayRecord(INITIAL),
                num_rounds=NUM_ROUNDS,
                evaluate_fn=lambda rnd, arrays: MetricRecord(
                    {"distance": distance_to_truth(arrays.to_numpy_ndarrays())}
                ),
            )
        )

    run_simulation(server_app, client_app, NUM_CLIENTS, backend_config=BACKEND)

    (result,) = results
    train_metrics = result.train_metrics_clientapp
    assert sorted(train_metrics) == list(range(1, NUM_ROUNDS + 1))
    for metrics in train_metrics.values():
        assert metrics["num_excluded"] == 1 and metrics["num_aggregated"] == NUM_CLIENTS - 1
        assert 0.0 < metrics["mask_fraction"] <= 1.0
    distances = [result.evaluate_metrics_serverapp[r]["distance"] for r in range(NUM_ROUNDS + 1)]
    assert all(np.isfinite(distances))
    assert distances[-1] < 0.5 * distances[0]
