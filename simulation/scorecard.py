"""A defense's scorecard against a long-horizon bar, one row per grid cell it has run.

The bar of the issue "Hold the edge-case backdoor out for 300 rounds": in every cell (task, attack,
seed), ``acc_backdoor`` at or below :data:`~simulation.frontier.BAR` in every round, and the final
``acc_main`` within :data:`WITHIN` of the baseline's (FedAvg's) final ``acc_main`` under the same
attack and seed. Each row pairs a completed run of the defense with the baseline's run of the same
task, attack, seed and number of rounds, and says which half it meets. Because the final round's
``acc_main`` is one evaluation, the row also gives the mean of the last :data:`LAST_EVALUATIONS`
evaluations of both runs and their gap. Because one round over the bar can be noise of the task,
the row also counts the rounds over it and averages ``acc_backdoor`` over the last
:data:`LAST_BACKDOOR_ROUNDS` rounds, beside the same two figures for the baseline's no-attack run
(``attack = "none"``) of the same task, seed and number of rounds: the level an attack-free federation
reaches on the same data. The defense's own no-attack run, when it has one, is listed as a control and
is not a cell of the bar.

    python -m simulation scorecard docs/results/long_horizon_fmnist \\
        --defense "invariant-record-departure-exclusion tau=0.3"
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import defense_label
from .frontier import BAR, attacked_backdoor
from .report import RunResult, as_float, load_runs

__all__ = [
    "LAST_BACKDOOR_ROUNDS",
    "LAST_EVALUATIONS",
    "WITHIN",
    "ScorecardRow",
    "scorecard_rows",
    "scorecard_table",
    "write_scorecard",
]

WITHIN = 0.01  # the bar: final acc_main at most 1 point below the baseline's
LAST_EVALUATIONS = 10  # evaluations of acc_main averaged besides the final one
LAST_BACKDOOR_ROUNDS = 60  # rounds of acc_backdoor (evaluated every round) averaged at the end of a run
CONTROL_ATTACK = "none"  # the attack name of the no-attack control


@dataclass(frozen=True)
class ScorecardRow:
    """One cell of the defense: its run and, when it has run, the baseline's."""

    task: str
    attack: str
    seed: int
    rounds: int
    peak_backdoor: float  # highest acc_backdoor of any round after round 0
    first_over_bar: int | None  # first round with acc_backdoor > BAR
    rounds_over_bar: int  # rounds with acc_backdoor > BAR
    recent_backdoor: float  # mean acc_backdoor over the last LAST_BACKDOOR_ROUNDS rounds
    final_main: float
    recent_main: float  # mean acc_main over the last LAST_EVALUATIONS evaluations
    baseline_final_main: float | None  # None: the baseline has no run of this cell
    baseline_recent_main: float | None
    control_rounds_over_bar: int | None  # None: the baseline has no no-attack run of this task and seed
    control_recent_backdoor: float | None

    @property
    def held(self) -> bool:
        return self.first_over_bar is None

    @property
    def gap(self) -> float | None:
        """Baseline's final acc_main minus the defense's (a fraction; positive: the defense is below)."""
        return None if self.baseline_final_main is None else self.baseline_final_main - self.final_main

    @property
    def recent_gap(self) -> float | None:
        return None if self.baseline_recent_main is None else self.baseline_recent_main - self.recent_main

    @property
    def is_control(self) -> bool:
        """The defense's own no-attack run: what the defense does with no attacker, not a cell of the bar."""
        return self.attack == CONTROL_ATTACK

    @property
    def verdict(self) -> str:
        if self.is_control:
            return "no attack (control)"
        if not self.held:
            return "leaked"
        if self.gap is None:
            return "held; no baseline run"
        # metrics are float32 fractions: 0.899 - 0.889 can come out a hair over 0.01
        return "meets the bar" if self.gap <= WITHIN + 1e-6 else "held; accuracy missed"


def _recent_main(run: RunResult) -> float:
    """Mean acc_main over the run's last :data:`LAST_EVALUATIONS` evaluations."""
    values = [as_float(r.get("acc_main")) for r in run.records]
    return float(np.mean([v for v in values if not np.isnan(v)][-LAST_EVALUATIONS:]))


def _recent_backdoor(backdoor: list[tuple[int, float]]) -> float:
    """Mean acc_backdoor over the last :data:`LAST_BACKDOOR_ROUNDS` of ``(round, acc_backdoor)`` pairs."""
    return float(np.mean([v for _, v in backdoor][-LAST_BACKDOOR_ROUNDS:]))


def _rounds_over_bar(backdoor: list[tuple[int, float]]) -> list[int]:
    return [n for n, v in backdoor if v > BAR]


def _row(run: RunResult, baseline: RunResult | None, control: RunResult | None) -> ScorecardRow:
    backdoor = attacked_backdoor(run)
    over = _rounds_over_bar(backdoor)
    control_backdoor = None if control is None else attacked_backdoor(control)
    return ScorecardRow(
        task=str(run.config["task"]),
        attack=str(run.config["attack"]),
        seed=int(run.config.get("seed", 0)),
        rounds=run.final_round,
        peak_backdoor=max((v for _, v in backdoor), default=float("nan")),
        first_over_bar=min(over) if over else None,
        rounds_over_bar=len(over),
        recent_backdoor=_recent_backdoor(backdoor),
        final_main=run.final("acc_main"),
        recent_main=_recent_main(run),
        baseline_final_main=None if baseline is None else baseline.final("acc_main"),
        baseline_recent_main=None if baseline is None else _recent_main(baseline),
        control_rounds_over_bar=None if control_backdoor is None else len(_rounds_over_bar(control_backdoor)),
        control_recent_backdoor=None if control_backdoor is None else _recent_backdoor(control_backdoor),
    )


def scorecard_rows(runs: Iterable[RunResult], defense: str, baseline: str = "fedavg") -> list[ScorecardRow]:
    """Rows for the completed ``runs`` labelled ``defense`` (as :func:`defense_label` writes it).

    Raises ``ValueError`` naming the labels present when no run has the label ``defense``.
    """
    runs = list(runs)

    def cell(run: RunResult) -> tuple[str, str, int, int]:
        return (
            str(run.config["task"]),
            str(run.config["attack"]),
            int(run.config.get("seed", 0)),
            run.final_round,
        )

    baselines = {cell(run): run for run in runs if defense_label(run.config) == baseline}
    mine = [run for run in runs if defense_label(run.config) == defense]
    if not mine:
        labels = sorted({defense_label(run.config) for run in runs})
        raise ValueError(f"no completed run of defense {defense!r}; the runs' defenses: {labels}")

    def control(run: RunResult) -> RunResult | None:
        task, _, seed, rounds = cell(run)
        return baselines.get((task, CONTROL_ATTACK, seed, rounds))

    rows = [_row(run, baselines.get(cell(run)), control(run)) for run in mine]
    return sorted(rows, key=lambda r: (r.task, r.attack, r.seed, r.rounds))


def _points(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.2f}"


def _or_not_run(value: float | None, spec: str) -> str:
    return "not run" if value is None else format(value, spec)


def scorecard_table(rows: Sequence[ScorecardRow], baseline: str = "fedavg") -> list[str]:
    """Markdown lines: one row per cell; gaps in points of acc_main (positive: below the baseline)."""
    lines = [
        f"| task | attack | seed | rounds | highest acc_backdoor | first round > {BAR:.2f} "
        f"| rounds > {BAR:.2f} | mean acc_backdoor, last {LAST_BACKDOOR_ROUNDS} rounds "
        f"| no-attack {baseline}: rounds > {BAR:.2f} "
        f"| no-attack {baseline}: mean, last {LAST_BACKDOOR_ROUNDS} "
        f"| final acc_main | {baseline} final | gap "
        f"| mean of last {LAST_EVALUATIONS} evaluations | {baseline} mean | gap | verdict |",
        "|:--|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|:--|",
    ]
    for r in rows:
        first = "never" if r.first_over_bar is None else str(r.first_over_bar)
        lines.append(
            f"| {r.task} | {r.attack} | {r.seed} | {r.rounds} | {r.peak_backdoor:.2f} | {first} "
            f"| {r.rounds_over_bar} | {r.recent_backdoor:.3f} "
            f"| {_or_not_run(r.control_rounds_over_bar, 'd')} "
            f"| {_or_not_run(r.control_recent_backdoor, '.3f')} "
            f"| {r.final_main:.3f} | {_or_not_run(r.baseline_final_main, '.3f')} | {_points(r.gap)} "
            f"| {r.recent_main:.3f} | {_or_not_run(r.baseline_recent_main, '.3f')} "
            f"| {_points(r.recent_gap)} | {r.verdict} |"
        )
    return lines


def write_scorecard(
    results_dirs: Sequence[Path], defense: str, baseline: str = "fedavg", out: Path | None = None
) -> str:
    """The scorecard of ``defense`` over ``results_dirs`` as Markdown; also written to ``out`` if given."""
    runs = [run for d in results_dirs for run in load_runs(Path(d))[0]]
    rows = scorecard_rows(runs, defense, baseline)
    judged = [r for r in rows if not r.is_control]
    met = sum(r.verdict == "meets the bar" for r in judged)
    text = "\n".join(
        [
            f"# Scorecard: {defense}",
            "",
            f"From {', '.join(f'`{d}`' for d in results_dirs)}. The bar: `acc_backdoor` at most {BAR:.2f} in "
            f"every round after round 0, and the final `acc_main` at most {100 * WITHIN:.0f} point below "
            f"{baseline}'s under the same attack and seed. Gaps are in points of `acc_main`, positive where "
            f"the defense is below {baseline}. The no-attack columns are {baseline}'s run of the same seed "
            f"with every client honest: how often the attack-free model is over the bar on its own. "
            f"A row with attack `{CONTROL_ATTACK}` is the defense's own run with every client honest: "
            f"a control, not a cell of the bar.",
            "",
            *scorecard_table(rows, baseline),
            "",
            f"{met} of {len(judged)} cells meet the bar.",
            "",
        ]
    )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    return text
