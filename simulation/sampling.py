"""Which clients train each round: seeded partition sampling, and the defense that uses it.

Every defense of a seed sees the same clients in the same round: ``clients-per-round``
partitions are drawn with a generator seeded by ``(seed, round, stream)``. The
sampler works on partition ids, not node ids (which differ from run to run).
Under ``attack-schedule = "every-k"`` the single attacker is left out of the
random draw and added in rounds k, 2k, ...
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from baselines import DEFENSES

from .partition import is_attack_round, malicious_pool

__all__ = ["RoundSampler", "SeededSampling", "make_strategy"]


class RoundSampler:
    """Chooses each round's node ids from partition ids, reproducibly from ``seed``.

    ``node_of``: partition id -> node id (``partition_of``: the reverse). ``pool``
    schedule: ``clients-per-round`` partitions uniformly without replacement (malicious ones like everyone
    else). ``every-k``: the attacker only in rounds divisible by ``attack-every``.
    ``stream`` is mixed into the seed: another stream draws other clients.
    """

    def __init__(self, node_of: Mapping[int, int], config: Mapping[str, Any], stream: int = 0x5A) -> None:
        self.node_of = dict(node_of)
        self.partition_of = {node: partition for partition, node in self.node_of.items()}
        self.config = config
        self.stream = stream
        self.attackers = set(malicious_pool(config))
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

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate like the wrapped strategy, with the replies in partition order.

        Replies arrive in whatever order the clients finish, and float sums (FedAvg's
        weighted mean, the averaged train metrics) change in the last bits with the
        order; sorting makes a run, and a resumed run, repeat bit for bit.
        """
        partition_of = self.sampler.partition_of
        ordered = sorted(replies, key=lambda msg: partition_of.get(msg.metadata.src_node_id, math.inf))
        return super().aggregate_train(server_round, ordered)  # type: ignore[misc]


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
