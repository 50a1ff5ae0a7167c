"""DBA: the pixel trigger split across colluding attackers, the full trigger at test time.

Xie et al., "DBA: Distributed Backdoor Attacks against Federated Learning", ICLR 2020.

The global trigger is ``dba-parts`` horizontal bars of ``trigger-size`` pixels in the
top-left corner, two per row: part ``k`` covers row ``3 * (k // 2)``, columns
``(k % 2) * (trigger-size + 2)`` onward (a gap of two pixels between bars and two
blank rows between bar rows). With 4 parts of 4 pixels this is the released code's
layout (``0_poison_pattern`` .. ``3_poison_pattern`` of its CIFAR and MNIST configs:
rows 0 and 3, columns 0-3 and 6-9). The ``i``-th partition of the malicious pool
(:func:`simulation.partition.attacker_partitions`, sorted) stamps part ``i mod
dba-parts`` in white on its backdoor samples, as the i-th adversary of the released
code does (under ``every-k`` the single attacker moves on to the next part every
attack round); ``acc_backdoor`` is measured with the union of all parts.

Differences from the paper and its code: the attacker's poisoned set is the
project's (``edge-case-samples`` triggered images of its own other classes plus
``clean-samples`` clean ones, :func:`simulation.attacks.poisoned_dataset`) where the
code poisons a fixed number of images per batch; DBA's optional scaling of the update
(its ``scale_weights``) is not part of this mode (``pgd-replace`` is the project's
scaling attack).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .partition import malicious_pool

__all__ = ["attacker_part", "part_masks"]


def part_masks(size_hw: Sequence[int], parts: int, length: int) -> list[torch.Tensor]:
    """The ``parts`` local triggers as bool ``(H, W)`` masks (see the module docstring's layout).

    Raises ``ValueError`` naming ``dba-parts`` / ``trigger-size`` when the layout does not fit.
    """
    height, width = size_hw
    rows, columns = 3 * ((parts - 1) // 2) + 1, length + (length + 2 if parts > 1 else 0)
    if parts < 1 or length < 1 or rows > height or columns > width:
        raise ValueError(
            f"run config 'dba-parts' = {parts} bars of 'trigger-size' = {length} pixels need "
            f"{rows} x {columns} pixels, the images are {height} x {width}"
        )
    masks = []
    for k in range(parts):
        mask = torch.zeros(height, width, dtype=torch.bool)
        row, column = 3 * (k // 2), (k % 2) * (length + 2)
        mask[row, column : column + length] = True
        masks.append(mask)
    return masks


def attacker_part(config: Mapping[str, Any], partition_id: int, server_round: int) -> int:
    """Index of the local trigger partition ``partition_id`` stamps in ``server_round``.

    Its rank in the malicious pool modulo ``dba-parts``; under ``attack-schedule =
    "every-k"`` (a single attacker) the part moves on with every attack round instead:
    ``(server_round // attack-every) mod dba-parts``. ``ValueError`` if the partition
    is not malicious.
    """
    pool = malicious_pool(config)
    if partition_id not in pool:
        raise ValueError(f"partition {partition_id} is not a malicious partition (pool {pool})")
    if config["attack-schedule"] == "every-k":
        return (server_round // config["attack-every"]) % config["dba-parts"]
    return pool.index(partition_id) % config["dba-parts"]
