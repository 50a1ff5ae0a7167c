"""Which part of InvariantAggregation lets a round's backdoor step through: the AND-mask or the trimmed mean?

One round from a grid's starting model (its pretrained model when ``pretrain-rounds`` is set), with
exactly ``A`` of the ``clients-per-round`` sampled partitions malicious. Every malicious partition is
trained twice: as the attacker and benignly (its counterfactual update, same shuffling seed). From the
attacked round's and the counterfactual clean round's pseudo-gradients the server step is formed four
ways:

============  ======================  ======================
step          AND-mask of             trimmed mean of
============  ======================  ======================
``clean``     the clean round         the clean round
``mask``      the attacked round      the clean round
``values``    the clean round         the attacked round
``attacked``  the attacked round      the attacked round (the server's real step)
============  ======================  ======================

Each step's model is measured by its mean backdoor margin on the edge-case test inputs (target logit
minus the largest other logit; it moves where one round's ``acc_backdoor`` barely does),
``acc_backdoor`` and ``acc_main`` (BatchNorm running statistics, which carry no sign votes, stay at
the starting model's). The mask columns say which share of the attacked round's kept
coordinates the clean round would have masked (``unmasked``), and the reverse (``masked``).

    FLWR_INVARIANT_DATA_ROOT=DATA python -m simulation.attribution configs/fmnist_pretrained.toml \\
        --seed 0 --attackers 0 2 4 6 8 --draws 3
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flwr_invariant.aggregate import and_mask, trimmed_mean
from flwr_invariant.mask_rules import collusion_weights, sign_agreement

from .attacks import backdoor_test_inputs
from .config import resolve_config
from .data import load_task
from .grid import load_grid
from .partition import malicious_pool
from .pretrain import cache_file, load_cached
from .training import evaluate, local_update, model_for, predict

__all__ = [
    "STEPS",
    "RoundAttribution",
    "attribute_round",
    "combined_steps",
    "main",
    "pair_agreement",
    "sample_round",
    "start_state",
    "summary",
]

# step: (the round whose AND-mask it uses, the round whose trimmed mean it uses)
STEP_SOURCES = {
    "clean": ("clean", "clean"),
    "mask": ("attacked", "clean"),
    "values": ("clean", "attacked"),
    "attacked": ("attacked", "attacked"),
}
STEPS = tuple(STEP_SOURCES)
BATCHNORM_STATISTICS = ("running_mean", "running_var")


@dataclass
class RoundAttribution:
    """One attributed round: mask statistics and, per step in :data:`STEPS`, the new model's scores."""

    attackers: int
    draw: int
    mask_clean: float  # kept fraction of the float coordinates, clean round
    mask_attacked: float  # kept fraction, attacked round
    unmasked: float  # share of the attacked round's kept coordinates the clean round masks
    masked: float  # share of the clean round's kept coordinates the attacked round masks
    margin: dict[str, float]  # mean backdoor margin (logits) after each step; "start" before the round
    acc_backdoor: dict[str, float]
    acc_main: dict[str, float]
    agreement: dict[str, float]  # pairwise sign agreement in the attacked round (:func:`pair_agreement`)


def sample_round(config: Mapping[str, Any], attackers: int, draw: int) -> tuple[list[int], list[int]]:
    """``(benign, malicious)`` partition ids of a round with exactly ``attackers`` malicious clients.

    Seeded by ``(seed, attackers, draw)``; ``ValueError`` when the population has too few of either.
    """
    malicious = malicious_pool(config)
    benign = sorted(set(range(config["num-partitions"])) - set(malicious))
    count = config["clients-per-round"]
    if not 0 <= attackers <= min(count, len(malicious)) or count - attackers > len(benign):
        raise ValueError(
            f"cannot sample {attackers} attackers among {count} clients from {len(malicious)} malicious "
            f"and {len(benign)} benign partitions"
        )
    rng = np.random.default_rng([config["seed"], attackers, draw, 0xA77])
    chosen_bad = sorted(int(p) for p in rng.choice(malicious, attackers, replace=False))
    chosen_good = sorted(int(p) for p in rng.choice(benign, count - attackers, replace=False))
    return chosen_good, chosen_bad


def combined_steps(
    clean: np.ndarray, attacked: np.ndarray, tau: float, trim_ratio: float
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The four server steps of :data:`STEPS` from two rounds' pseudo-gradients, and mask statistics.

    ``clean``, ``attacked``: ``(N, P)`` pseudo-gradients ``w - w_i`` of the same N clients, the
    malicious ones trained benignly and as attackers. Returns ``{step: (P,) aggregate}`` (the new
    weights are ``w - aggregate`` at server learning rate 1) and ``mask_clean``, ``mask_attacked``,
    ``unmasked``, ``masked``.
    """
    masks = {"clean": and_mask(clean, tau), "attacked": and_mask(attacked, tau)}
    means = {"clean": trimmed_mean(clean, trim_ratio), "attacked": trimmed_mean(attacked, trim_ratio)}
    steps = {step: np.where(masks[mask], means[values], 0.0) for step, (mask, values) in STEP_SOURCES.items()}
    kept_clean, kept_attacked = masks["clean"].sum(), masks["attacked"].sum()
    stats = {
        "mask_clean": float(masks["clean"].mean()),
        "mask_attacked": float(masks["attacked"].mean()),
        "unmasked": float((masks["attacked"] & ~masks["clean"]).sum() / max(kept_attacked, 1)),
        "masked": float((masks["clean"] & ~masks["attacked"]).sum() / max(kept_clean, 1)),
    }
    return steps, stats


def aggregated_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The entries Invariant masks and trims: floating ones other than BatchNorm running statistics."""
    return [
        key
        for key, tensor in state.items()
        if tensor.is_floating_point() and not key.endswith(BATCHNORM_STATISTICS)
    ]


def _flat(state: Mapping[str, torch.Tensor], keys: Sequence[str]) -> torch.Tensor:
    return torch.cat([state[key].reshape(-1) for key in keys])


def _pseudo_gradients(
    flat_start: torch.Tensor, states: Sequence[Mapping[str, torch.Tensor]], keys: Sequence[str]
) -> np.ndarray:
    """``(N, P)``: each client's ``start - trained`` over the entries ``keys``, flattened."""
    return torch.stack([flat_start - _flat(state, keys) for state in states]).numpy()


def pair_agreement(pseudo_gradients: np.ndarray, num_attackers: int) -> dict[str, float]:
    """Pairwise sign agreement (mean of ``sign(g_i) * sign(g_j)``) by kind of pair, and collusion weights.

    ``pseudo_gradients``: ``(N, P)``, the last ``num_attackers`` rows the attackers'. Returns the mean
    over attacker pairs, the mean and max over benign pairs, and the mean ``"collusion"`` vote weight
    of the attackers and of the benign clients (:func:`flwr_invariant.mask_rules.collusion_weights`).
    """
    agreement, count = sign_agreement([pseudo_gradients])
    weights = collusion_weights(agreement, count)
    num_clients = agreement.shape[0]
    attacker = np.arange(num_clients) >= num_clients - num_attackers
    pairs = ~np.eye(num_clients, dtype=bool)
    attacker_pairs = agreement[pairs & attacker[:, None] & attacker[None, :]]
    benign_pairs = agreement[pairs & ~attacker[:, None] & ~attacker[None, :]]
    return {
        "attacker_pairs": float(attacker_pairs.mean()) if attacker_pairs.size else float("nan"),
        "benign_pairs": float(benign_pairs.mean()),
        "benign_pairs_max": float(benign_pairs.max()),
        "attacker_weight": float(weights[attacker].mean()) if num_attackers else float("nan"),
        "benign_weight": float(weights[~attacker].mean()),
    }


def backdoor_margin(logits: torch.Tensor, target: int) -> float:
    """Mean over inputs of ``logit[target] - max(other logits)``; positive = classified as target."""
    others = logits.clone()
    others[:, target] = -torch.inf
    return float((logits[:, target] - others.max(dim=1).values).mean())


def attribute_round(
    config: Mapping[str, Any], start: Mapping[str, torch.Tensor], attackers: int, draw: int
) -> RoundAttribution:
    """Train one round from ``start`` with ``attackers`` malicious clients and score the four steps."""
    benign_ids, malicious_ids = sample_round(config, attackers, draw)
    server_round = draw + 1
    benign_config = {**config, "attack": "none"}
    shared = [local_update(config, pid, server_round, start).state_dict for pid in benign_ids]
    attacked = [local_update(config, pid, server_round, start) for pid in malicious_ids]
    if not all(result.attacking for result in attacked):
        raise ValueError(
            "a malicious partition did not attack: check attack, attack-schedule, attack-start-round"
        )
    counterfactual = [
        local_update(benign_config, pid, server_round, start).state_dict for pid in malicious_ids
    ]
    keys = aggregated_keys(start)
    flat_start = _flat(start, keys)
    attacked_round = _pseudo_gradients(flat_start, shared + [result.state_dict for result in attacked], keys)
    steps, stats = combined_steps(
        _pseudo_gradients(flat_start, shared + counterfactual, keys),
        attacked_round,
        config["tau"],
        config["trim-ratio"],
    )

    task = load_task(config)
    edge_inputs = backdoor_test_inputs(task, config)
    model = model_for(task, config)
    margin, acc_backdoor, acc_main = {}, {}, {}
    for step, aggregate in [("start", None), *steps.items()]:
        state = dict(start)
        if aggregate is not None:
            flat = flat_start - torch.from_numpy(aggregate).to(flat_start.dtype)
            state.update(
                {
                    key: part.view_as(start[key])
                    for key, part in zip(keys, _split(flat, start, keys), strict=True)
                }
            )
        model.load_state_dict(state)
        logits, labels = predict(model, edge_inputs, task.preprocess)
        margin[step] = backdoor_margin(logits, config["target-label"])
        acc_backdoor[step] = float((labels == config["target-label"]).float().mean())
        acc_main[step] = evaluate(model, task.test_x, task.test_y, task.preprocess)[1]
    return RoundAttribution(
        attackers,
        draw,
        **stats,
        margin=margin,
        acc_backdoor=acc_backdoor,
        acc_main=acc_main,
        agreement=pair_agreement(attacked_round, attackers),
    )


def _split(flat: torch.Tensor, like: Mapping[str, torch.Tensor], keys: Sequence[str]) -> list[torch.Tensor]:
    return list(torch.split(flat, [like[key].numel() for key in keys]))


def start_state(config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The grid's starting model: its cached pretrained model, or the seed's fresh model."""
    task = load_task(config)
    # ImageNet weights only where they start the run; a cached model replaces every weight.
    template = model_for(task, config, pretrained_weights=not config["pretrain-rounds"]).state_dict()
    if not config["pretrain-rounds"]:
        return template
    path = cache_file(config)
    if path is None or not path.exists():
        raise FileNotFoundError(
            f"no pretrained model at {path}: run the grid first (it trains and caches the starting model)"
        )
    return load_cached(path, template)


def _table(rows: Sequence[RoundAttribution]) -> str:
    lines = [
        "| attackers | draw | mask kept clean / attacked | unmasked by attackers | masked by attackers "
        "| margin: start | clean | mask | values | attacked | acc_backdoor clean / attacked "
        "| sign agreement: attacker pairs | benign pairs (max) | collusion weight: attackers / benign |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        margins = " | ".join(f"{row.margin[step]:+.3f}" for step in ("start", *STEPS))
        lines.append(
            f"| {row.attackers} | {row.draw} | {row.mask_clean:.4f} / {row.mask_attacked:.4f} "
            f"| {row.unmasked:.3f} | {row.masked:.3f} | {margins} "
            f"| {row.acc_backdoor['clean']:.2f} / {row.acc_backdoor['attacked']:.2f} "
            f"| {row.agreement['attacker_pairs']:.3f} "
            f"| {row.agreement['benign_pairs']:.3f} ({row.agreement['benign_pairs_max']:.3f}) "
            f"| {row.agreement['attacker_weight']:.2f} / {row.agreement['benign_weight']:.2f} |"
        )
    return "\n".join(lines)


def summary(rows: Sequence[RoundAttribution]) -> str:
    """Markdown: per attacker count, means over draws of the mask shares and of each step's margin change
    against the clean step (what the attackers added through the mask, the values, and both)."""
    lines = [
        "| attackers | rounds | unmasked by attackers | masked by attackers "
        "| margin change vs clean: mask | values | attacked |",
        "|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for count in sorted({row.attackers for row in rows}):
        group = [row for row in rows if row.attackers == count]
        changes = [np.mean([row.margin[step] - row.margin["clean"] for row in group]) for step in STEPS[1:]]
        lines.append(
            f"| {count} | {len(group)} | {np.mean([row.unmasked for row in group]):.2f} "
            f"| {np.mean([row.masked for row in group]):.2f} | "
            + " | ".join(f"{change:+.2f}" for change in changes)
            + " |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point (see the module docstring)."""
    from tqdm import tqdm

    from .compare import parse_sets

    parser = argparse.ArgumentParser(
        prog="python -m simulation.attribution", description=__doc__.splitlines()[0]
    )
    parser.add_argument("grid", help="grid file whose [base] (and pretrained model) the round starts from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attackers", type=int, nargs="+", default=[0, 2, 4, 6, 8])
    parser.add_argument("--draws", type=int, default=3, help="sampled rounds per attacker count")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="run-config overrides")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    try:
        spec = load_grid(args.grid)
        attacks = [attack for attack in spec.attacks if attack != "none"]
        if not attacks:
            raise ValueError(f"{args.grid} has no attack to attribute")
        overrides = next(
            (o for _, o in spec.runs() if o["seed"] == args.seed and o["attack"] == attacks[0]), None
        )
        if overrides is None:
            raise ValueError(f"seed {args.seed} is not among the grid's seeds {spec.seeds}")
        config = resolve_config({**overrides, "defense": "invariant", **parse_sets(args.set)})
        for count in args.attackers:
            sample_round(config, count, 0)  # an impossible count fails before any training
        start = start_state(config)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    jobs = [(count, draw) for count in args.attackers for draw in range(args.draws)]
    rows = [attribute_round(config, start, count, draw) for count, draw in tqdm(jobs, unit="round")]
    print(_table(rows), summary(rows), sep="\n\n")
    if args.out:
        Path(args.out).write_text(json.dumps([asdict(row) for row in rows], indent=1))


if __name__ == "__main__":
    main()
