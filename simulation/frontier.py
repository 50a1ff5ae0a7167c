"""The defense frontier of long runs: final acc_main against the highest acc_backdoor of any round.

A defense that holds a backdoor out only for a while shows a low final-round acc_backdoor in no
table; the highest value it ever reached is what a user deploying it risks. For every task, one
point per ``(defense, tau, trim ratio, attack, rounds run)`` (mean over seeds; the bar spans the
seeds' highest values) from any number of results directories, and a Markdown table with the
worst seed, the first round over :data:`BAR` and the final acc_main.

    python -m simulation frontier docs/results/long_horizon_fmnist docs/results/screen --out DIR
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import defense_label
from .report import RunResult, as_float, defense_order, file_safe, load_runs

__all__ = ["BAR", "FrontierPoint", "attacked_backdoor", "frontier_points", "write_frontier"]

BAR = 0.10  # the bar: acc_backdoor at or below it in every round


@dataclass(frozen=True)
class FrontierPoint:
    """One ``(task, defense label, attack, rounds)`` cell over its seeds."""

    task: str
    label: str  # defense, plus ``tau=...``/``trim-ratio=...`` where an Invariant defense's differ
    attack: str
    seeds: int
    rounds: int
    final_main: float  # mean over seeds of the final round's acc_main
    peak_backdoor: np.ndarray  # per seed, the highest acc_backdoor of any round after round 0
    first_over_bar: int | None  # earliest round (any seed) with acc_backdoor > BAR

    @property
    def worst(self) -> float:
        return float(self.peak_backdoor.max())


def attacked_backdoor(run: RunResult) -> list[tuple[int, float]]:
    """``(round, acc_backdoor)`` of every attacked round (round 0, the starting model, left out)."""
    values = [(int(r["round"]), as_float(r.get("acc_backdoor"))) for r in run.records if int(r["round"]) > 0]
    return [(n, v) for n, v in values if not np.isnan(v)]


def frontier_points(runs: Iterable[RunResult]) -> list[FrontierPoint]:
    """Points of the completed ``runs``, sorted by task, attack and defense order."""
    cells: dict[tuple[str, str, str, int], list[RunResult]] = {}
    for run in runs:
        key = (str(run.config["task"]), defense_label(run.config), str(run.config["attack"]), run.final_round)
        cells.setdefault(key, []).append(run)
    points = []
    for (task, label, attack, rounds), members in cells.items():
        series = [attacked_backdoor(run) for run in members]
        over = [n for s in series for n, v in s if v > BAR]
        points.append(
            FrontierPoint(
                task=task,
                label=label,
                attack=attack,
                seeds=len(members),
                rounds=rounds,
                final_main=float(np.mean([run.final("acc_main") for run in members])),
                peak_backdoor=np.array([max((v for _, v in s), default=np.nan) for s in series]),
                first_over_bar=min(over) if over else None,
            )
        )
    order = {name: i for i, name in enumerate(defense_order({p.label.split(" ")[0] for p in points}))}
    return sorted(points, key=lambda p: (p.task, p.rounds, p.attack, order[p.label.split(" ")[0]], p.label))


def _table(points: Sequence[FrontierPoint]) -> list[str]:
    lines = [
        "| attack | defense | seeds | rounds | final acc_main | highest acc_backdoor (mean / worst seed) "
        f"| first round > {BAR:.2f} |",
        "|:--|:--|--:|--:|--:|--:|--:|",
    ]
    for p in points:
        first = "never" if p.first_over_bar is None else str(p.first_over_bar)
        lines.append(
            f"| {p.attack} | {p.label} | {p.seeds} | {p.rounds} | {p.final_main:.3f} "
            f"| {np.mean(p.peak_backdoor):.3f} / {p.worst:.3f} | {first} |"
        )
    return lines


def _plot(path: Path, task: str, rounds: int, points: Sequence[FrontierPoint]) -> None:
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=120)
    ax = fig.add_subplot()
    labels = list(dict.fromkeys(p.label for p in points))
    attacks = list(dict.fromkeys(p.attack for p in points))
    palette = colormaps["tab10" if len(labels) <= 10 else "tab20"].colors
    markers = "osD^vP*Xh"
    for p in points:
        colour = palette[labels.index(p.label) % len(palette)]  # one colour per defense label
        x = float(np.mean(p.peak_backdoor))
        ax.errorbar(
            x,
            p.final_main,
            xerr=[[x - p.peak_backdoor.min()], [p.peak_backdoor.max() - x]] if p.seeds > 1 else None,
            fmt=markers[attacks.index(p.attack) % len(markers)],
            color=colour,
            markersize=7,
            capsize=3,
        )
    for label in labels:
        ax.plot([], [], "-", linewidth=4, color=palette[labels.index(label) % len(palette)], label=label)
    for attack in attacks:
        ax.plot([], [], markers[attacks.index(attack) % len(markers)], color="grey", label=f"attack {attack}")
    ax.axvline(BAR, color="black", linestyle="--", linewidth=1)
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("highest acc_backdoor in any round (mean over seeds; bar: seeds' range)")
    ax.set_ylabel("final acc_main")
    ax.set_title(f"task {task}, {rounds} attacked rounds (dashed: acc_backdoor {BAR})")
    ax.grid(True, alpha=0.4)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")


def write_frontier(results_dirs: Sequence[Path], out_dir: Path, *, plots: bool = True) -> list[Path]:
    """Write ``frontier.md`` and (``plots``) ``frontier__<task>__<rounds>.png``; returns the paths."""
    runs = [run for d in results_dirs for run in load_runs(Path(d))[0]]
    points = frontier_points(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Frontier", "", f"From {', '.join(f'`{d}`' for d in results_dirs)}.", ""]
    written = [out_dir / "frontier.md"]
    for task, rounds in dict.fromkeys((p.task, p.rounds) for p in points):
        cell = [p for p in points if (p.task, p.rounds) == (task, rounds)]
        lines += [f"## task `{task}`, {rounds} rounds", "", *_table(cell), ""]
        if plots:
            path = out_dir / f"frontier__{file_safe(task)}__{rounds}.png"
            _plot(path, task, rounds, cell)
            written.append(path)
    written[0].write_text("\n".join(lines), encoding="utf-8")
    return written
