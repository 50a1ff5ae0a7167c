"""Attacks that know the defense (issue: adaptive attackers against InvariantAggregation).

Both start from estimates of what benign clients send: the attacker trains
``adaptive-estimates`` copies of the global model on its own clean data (with
different batch orders) and treats those updates as samples of benign updates
(:func:`simulation.attackers.benign_estimates`; the modes themselves are objects
of :mod:`simulation.attackers`).

- ``alie`` ("A Little Is Enough", Baruch et al., NeurIPS 2019, turned into a
  backdoor attack): train on the poisoned set, then keep the backdoor update only
  on coordinates where the benign estimates agree on a sign (so the AND-mask
  lets them through) and that sign is the backdoor's; clip it there into
  ``mean +- adaptive-z * std`` of the benign estimates (so a trimmed mean does
  not cut it); send the benign mean everywhere else.
- ``neurotoxin`` (Zhang et al., ICML 2022): train on the poisoned set but never
  move the ``neurotoxin-top`` fraction of coordinates that benign training
  changes most (their values are reset after every optimizer step), so the
  backdoor lives in coordinates benign clients rarely overwrite. The paper takes
  the top coordinates from the last global update; here they come from the
  attacker's own benign estimate, which needs no state across rounds.
- ``mask-tipping`` (ours; the attack on the AND-mask our attribution measured): a
  white-box attacker that knows ``tau``, ``trim-ratio`` and how many colluders a
  round holds on average. From its benign estimates it predicts, per coordinate,
  the benign clients' net sign vote toward its backdoor update; it sends the
  backdoor's sign where the colluders' votes lift that vote to the mask's
  threshold (coordinates the benign clients lean toward, below ``tau``, and those
  they already pass), with values inside ``mean +- adaptive-z * std`` of the benign
  estimates so the trimmed mean keeps them, and the benign mean everywhere else.
- ``bloc-evasion`` (ours; the attack on ``mask_rule="bloc-exclusion"``, which sets
  aside clients whose update signs agree unusually well with another's): train on the
  poisoned set, keep that update only on the ``evasion-keep`` fraction of
  coordinates where it differs most from the benign estimates' mean, and send the
  benign mean elsewhere. Most of its signs are then an honest client's, so its
  agreement with its colluders falls toward the honest pairs'.
- ``split-evasion`` (ours; the attack on ``mask_rule="departure-exclusion"``, which
  compares the clients' largest departures from the coordinate-wise median): as
  ``bloc-evasion``, but the colluders share the coordinates out: the attacker of
  pool rank ``r`` keeps its poisoned update only on coordinates ``c`` with
  ``c mod evasion-parts == r mod evasion-parts``, so no two colluders of different
  parts depart on the same coordinate. Each coordinate then carries at most about one
  attacker's push, which is what the defense's argument says the trimmed mean removes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from flwr_invariant.aggregate import min_votes

__all__ = [
    "alie_update",
    "bloc_evasion_update",
    "expected_votes",
    "flat_update",
    "mask_tipping_update",
    "neurotoxin_hook",
    "rotating_share",
    "set_flat_update_",
    "split_evasion_update",
    "top_coordinates",
]


@torch.no_grad()
def flat_update(model: nn.Module, reference: Sequence[torch.Tensor]) -> torch.Tensor:
    """``parameters - reference`` flattened into one vector ``(P,)``."""
    return torch.cat([(p - r).reshape(-1) for p, r in zip(model.parameters(), reference, strict=True)])


@torch.no_grad()
def set_flat_update_(model: nn.Module, reference: Sequence[torch.Tensor], update: torch.Tensor) -> None:
    """Set the parameters to ``reference + update`` (``update`` as from :func:`flat_update`)."""
    offset = 0
    for param, ref in zip(model.parameters(), reference, strict=True):
        count = param.numel()
        param.copy_(ref + update[offset : offset + count].reshape(param.shape))
        offset += count


def alie_update(backdoor: torch.Tensor, benign: torch.Tensor, z: float, tau: float) -> torch.Tensor:
    """The update an ALIE-style backdoor attacker sends.

    ``backdoor``: ``(P,)`` its poisoned-training update; ``benign``: ``(K, P)``
    estimated benign updates. Coordinates where ``|mean sign(benign)| >= tau`` and
    the benign mean has the backdoor's sign get the backdoor value clipped into
    ``mean +- z * std``; every other coordinate gets the benign mean.
    """
    mean, std = benign.mean(dim=0), benign.std(dim=0, unbiased=False)
    consistent = benign.sign().mean(dim=0).abs() >= tau
    agree = consistent & (mean.sign() == backdoor.sign())
    inside = torch.minimum(torch.maximum(backdoor, mean - z * std), mean + z * std)
    return torch.where(agree, inside, mean)


def top_coordinates(benign_update: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean ``(P,)`` mask of the ``fraction`` of coordinates with the largest ``|update|``."""
    count = int(round(fraction * benign_update.numel()))
    mask = torch.zeros(benign_update.numel(), dtype=torch.bool)
    if count:
        mask[benign_update.abs().topk(count).indices] = True
    return mask


def neurotoxin_hook(
    model: nn.Module, reference: Sequence[torch.Tensor], frozen: torch.Tensor
) -> Callable[[int], None]:
    """``after_step`` callback that resets the ``frozen`` coordinates to the global model's values."""
    frozen = frozen.to(reference[0].device)

    @torch.no_grad()
    def after_step(step: int) -> None:
        update = flat_update(model, reference)
        update[frozen] = 0.0
        set_flat_update_(model, reference, update)

    return after_step


def expected_votes(
    mean: torch.Tensor, std: torch.Tensor, direction: torch.Tensor, num_benign: int
) -> torch.Tensor:
    """Expected net sign votes of ``num_benign`` benign clients along ``direction``, per coordinate.

    ``mean``, ``std``: ``(P,)`` of the estimated benign updates; each benign client's
    value is taken as normal with them, so it votes ``+1`` along ``direction`` with
    probability ``Phi(direction * mean / std)`` (``std = 0``: the sign of the mean).
    Returns ``(P,)`` in ``[-num_benign, num_benign]``.
    """
    standardised = direction * mean / std.clamp_min(torch.finfo(std.dtype).tiny)
    return num_benign * (2 * torch.special.ndtr(standardised) - 1)


def mask_tipping_update(
    backdoor: torch.Tensor,
    benign: torch.Tensor,
    *,
    tau: float,
    clients_per_round: int,
    colluders: int,
    z: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The update a mask-tipping attacker sends, and the coordinates it spends it on.

    ``backdoor``: ``(P,)`` its poisoned-training update; ``benign``: ``(K, P)`` estimated
    benign updates; ``colluders``: attackers it expects in a round of ``clients_per_round``.
    Target coordinates: the benign clients' expected net vote along ``sign(backdoor)``
    plus the colluders' votes reaches ``min_votes(clients_per_round, tau)``, and the
    benign range ``mean +- z * std`` reaches the backdoor's side of zero. There the
    update is the backdoor's sign with a magnitude clipped into that range; elsewhere
    the benign mean. Returns ``(update, target)``, ``(P,)`` float and bool.
    """
    mean, std = benign.mean(dim=0), benign.std(dim=0, unbiased=False)
    direction = torch.sign(backdoor)
    votes = expected_votes(mean, std, direction, clients_per_round - colluders)
    reach = direction * mean + z * std  # farthest a value may go toward the backdoor and look benign
    target = (direction != 0) & (votes + colluders >= min_votes(clients_per_round, tau)) & (reach > 0)
    floor = torch.clamp(direction * mean - z * std, min=0.0)
    # On target coordinates |backdoor| > 0 and reach > 0, so the magnitude is never 0 (a vote).
    magnitude = torch.minimum(torch.maximum(backdoor.abs(), floor), reach)
    return torch.where(target, direction * magnitude, mean), target


def bloc_evasion_update(
    backdoor: torch.Tensor, benign: torch.Tensor, keep: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The update a bloc-evasion attacker sends, and the coordinates where it keeps its backdoor.

    ``backdoor``: ``(P,)`` its poisoned-training update; ``benign``: ``(K, P)`` estimated
    benign updates. On the ``keep`` fraction of coordinates with the largest
    ``|backdoor - mean(benign)|`` the update is ``backdoor``; elsewhere the benign mean.
    Returns ``(update, kept)``, ``(P,)`` float and bool.
    """
    mean = benign.mean(dim=0)
    kept = top_coordinates(backdoor - mean, keep)
    return torch.where(kept, backdoor, mean), kept


def split_evasion_update(
    backdoor: torch.Tensor, benign: torch.Tensor, keep: float, part: int, parts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`bloc_evasion_update` restricted to this attacker's share of the coordinates.

    ``part`` in ``[0, parts)``: the attacker's share is the coordinates ``c`` with
    ``c mod parts == part``; among them it keeps ``backdoor`` on the ``keep`` fraction of all
    ``P`` coordinates (at most its whole share) with the largest ``|backdoor - mean(benign)|``,
    and sends the benign mean elsewhere. Returns ``(update, kept)``, ``(P,)`` float and bool.
    """
    if not 0 <= part < parts:
        raise ValueError(f"part must be in [0, parts={parts}), got {part}")
    mean = benign.mean(dim=0)
    share = torch.arange(backdoor.numel()) % parts == part
    kept = top_coordinates(torch.where(share, backdoor - mean, 0.0), keep) & share
    return torch.where(kept, backdoor, mean), kept


def rotating_share(rank: int, server_round: int, parts: int, rotation: int) -> tuple[int, int]:
    """``(part, parts * rotation)``: the :func:`split_evasion_update` share of the colluder of pool
    rank ``rank`` in ``server_round``, whose group of ``parts`` shares changes every round and
    repeats every ``rotation`` rounds."""
    return rank % parts + parts * (server_round % rotation), parts * rotation
