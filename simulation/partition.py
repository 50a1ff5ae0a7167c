"""Seeded client partitions (IID, Dirichlet label skew, or whole users) and the malicious pool.

``flwr_datasets`` partitioners (IidPartitioner, DirichletPartitioner) are not used:
they need the ``flwr-datasets``/``datasets`` packages, which are not dependencies of
this project, and work on Hugging Face datasets rather than the in-memory tensors here.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "attacker_partitions",
    "dirichlet_partition",
    "iid_partition",
    "is_attack_round",
    "is_attacking",
    "malicious_pool",
    "partition_indices",
    "user_partition",
]

_MAX_TRIES = 100


def iid_partition(num_examples: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Shuffle ``range(num_examples)`` with ``seed`` and cut it into near-equal parts."""
    if num_partitions > num_examples:
        raise ValueError(f"num-partitions ({num_partitions}) exceeds the number of examples ({num_examples})")
    order = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(part) for part in np.array_split(order, num_partitions)]


def dirichlet_partition(
    labels: np.ndarray, num_partitions: int, alpha: float, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Label-skewed split: class c's examples are divided by proportions ~ Dir(alpha).

    ``labels``: int array (N,). Returns ``num_partitions`` sorted index arrays that
    cover ``range(N)`` exactly once. Draws are repeated (same seeded generator)
    until every partition has at least ``min_size`` examples; ``ValueError`` after
    100 tries.
    """
    labels = np.asarray(labels)
    if num_partitions * min_size > len(labels):
        raise ValueError(f"num-partitions ({num_partitions}) is too large for {len(labels)} examples")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(_MAX_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for cls in classes:
            members = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for pid, chunk in enumerate(np.split(members, cuts)):
                parts[pid].append(chunk)
        result = [np.sort(np.concatenate(chunks)) for chunks in parts]
        if min(len(part) for part in result) >= min_size:
            return result
    raise ValueError(
        f"could not draw a Dirichlet(alpha={alpha}) split with >= {min_size} examples in each of "
        f"{num_partitions} partitions; raise 'dirichlet-alpha' or lower 'num-partitions'"
    )


def user_partition(users: np.ndarray, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Every user's examples in one partition, as LEAF keeps a user's tweets on one client.

    ``users``: int array (N,), the author of each example. Users are taken in a
    ``seed``-ed random order, each to the partition holding the fewest examples so
    far (the first lowest on ties), so partitions are about equal in size unless a
    user alone outweighs the mean. Returns ``num_partitions`` sorted index arrays
    that cover ``range(N)`` exactly once.
    """
    users = np.asarray(users)
    ids, inverse, counts = np.unique(users, return_inverse=True, return_counts=True)
    if num_partitions > len(ids):
        raise ValueError(f"num-partitions ({num_partitions}) exceeds the number of users ({len(ids)})")
    loads = [(0, p) for p in range(num_partitions)]  # a heap of (examples so far, partition)
    owner = np.empty(len(ids), dtype=np.int64)
    for user in np.random.default_rng(seed).permutation(len(ids)).tolist():
        load, partition = heapq.heappop(loads)
        owner[user] = partition
        heapq.heappush(loads, (load + int(counts[user]), partition))
    assigned = owner[inverse.ravel()]
    return [np.flatnonzero(assigned == p) for p in range(num_partitions)]


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    scheme: str,
    alpha: float,
    seed: int,
    users: np.ndarray | None = None,
) -> list[np.ndarray]:
    """``scheme`` "iid", "dirichlet" (alpha) or "user" (needs ``users``, the author of
    each example); reproducible from ``seed``."""
    if scheme == "iid":
        return iid_partition(len(labels), num_partitions, seed)
    if scheme == "dirichlet":
        return dirichlet_partition(labels, num_partitions, alpha, seed)
    if scheme == "user":
        if users is None:
            raise ValueError("run config 'partition' = 'user' needs examples with users (task sent140)")
        return user_partition(users, num_partitions, seed)
    raise ValueError(f"run config 'partition' must be 'iid', 'dirichlet' or 'user', got {scheme!r}")


def attacker_partitions(
    num_partitions: int, malicious_fraction: float, seed: int, schedule: str
) -> list[int]:
    """Sorted ids of the malicious partitions, chosen deterministically from ``seed``.

    ``schedule`` "pool": ``round(fraction * num_partitions)`` partitions (a fixed
    pool, sampled like everyone else); "every-k": exactly one partition.
    """
    if not 0.0 <= malicious_fraction <= 1.0:
        raise ValueError(f"run config 'malicious-fraction' must be in [0, 1], got {malicious_fraction!r}")
    rng = np.random.default_rng([seed, 0xBAD])
    if schedule == "every-k":
        count = 1
    elif schedule == "pool":
        count = round(malicious_fraction * num_partitions)
    else:
        raise ValueError(f"run config 'attack-schedule' must be 'pool' or 'every-k', got {schedule!r}")
    return sorted(int(p) for p in rng.choice(num_partitions, size=count, replace=False))


def malicious_pool(config: Mapping[str, Any]) -> list[int]:
    """:func:`attacker_partitions` of a resolved run config (its partitions, fraction, seed, schedule)."""
    return attacker_partitions(
        config["num-partitions"], config["malicious-fraction"], config["seed"], config["attack-schedule"]
    )


def is_attack_round(server_round: int, schedule: str, every: int, start_round: int = 1) -> bool:
    """Whether malicious partitions attack in ``server_round``: from ``start_round`` on
    (earlier rounds are a benign warm-up, as when attacking a pretrained model);
    with the every-k schedule only in rounds k, 2k, ..."""
    return server_round >= start_round and (schedule == "pool" or server_round % every == 0)


def is_attacking(
    partition_id: int,
    server_round: int,
    attackers: list[int],
    schedule: str,
    every: int,
    start_round: int = 1,
) -> bool:
    """Whether ``partition_id`` attacks in ``server_round`` (see :func:`is_attack_round`)."""
    return partition_id in attackers and is_attack_round(server_round, schedule, every, start_round)
