"""Summarise a directory of experiment runs as a Markdown/CSV table (like the paper's Table 1) and PNG plots.

Each run lives in ``RESULTS_DIR/<run-name>/`` with ``config.json`` (``{"run": {...}, "completed": ...}``) and
``metrics.jsonl`` (one JSON object per round, round 0 being the initial model). Runs are grouped by
``(task, attack, defense)``, a defense at a non-default ``tau`` or trim ratio being its own row
(``simulation.config.defense_label``); the table shows the final round's ``acc_main``/``acc_backdoor``
as ``mean ± std`` over seeds (population std, ``ddof=0``). Under an attack, a second table per pair shows how
much ``acc_backdoor`` moved per round against how many malicious clients that round sampled (and, for
defenses that report it, the fraction of coordinates the AND-mask kept): a defense that only slows a
backdoor down shows a steady positive drift that grows with the attackers. Incomplete or unreadable
runs are skipped and listed.

Example::

    from simulation.report import write_report
    files = write_report(Path("results"))  # results/report.md, report.csv, *.png
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.common.logger import log

from .config import CACHE_DIR_NAME, defense_label

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "METRICS",
    "ReportFiles",
    "RunResult",
    "as_float",
    "defense_order",
    "file_safe",
    "load_runs",
    "write_report",
]

METRICS: tuple[str, ...] = ("acc_main", "acc_backdoor")
CSV_COLUMNS: tuple[str, ...] = (
    "task",
    "attack",
    "defense",
    "seeds",
    "rounds",
    "acc_main_mean",
    "acc_main_std",
    "acc_backdoor_mean",
    "acc_backdoor_std",
)
# Run-config keys that may legitimately differ between the runs of one table cell.
_PER_RUN_KEYS = frozenset(
    {
        "seed",
        "results-file",
        "data-root",
        "device",
        "download",
        "pretrain-cache",
        "checkpoint-dir",
        "checkpoint-every",
    }
)
_FIRST, _LAST = "fedavg", "invariant"


@dataclass(frozen=True)
class ReportFiles:
    """Paths written by :func:`write_report` and the names of the skipped run directories."""

    markdown: Path
    csv: Path
    plots: list[Path]
    skipped: list[str]


@dataclass
class RunResult:
    """One completed run: its config and its per-round metric records (sorted by round)."""

    name: str
    config: dict[str, Any]
    records: list[dict[str, Any]]

    @property
    def key(self) -> tuple[str, str, str]:
        """``(task, attack, defense label)``: runs of one defense at another ``tau`` are another row."""
        return str(self.config["task"]), str(self.config["attack"]), defense_label(self.config)

    @property
    def final_round(self) -> int:
        return int(self.records[-1]["round"])

    def final(self, metric: str) -> float:
        """The final round's value of ``metric`` (NaN when absent)."""
        return as_float(self.records[-1].get(metric))


@dataclass
class _Group:
    """The runs of one ``(task, attack, defense)`` cell."""

    task: str
    attack: str
    defense: str
    runs: list[RunResult] = field(default_factory=list)

    def stats(self, metric: str) -> tuple[float, float]:
        """Mean and population std over runs of the final round's ``metric``."""
        values = np.array([run.final(metric) for run in self.runs], dtype=float)
        return float(np.mean(values)), float(np.std(values))

    def rounds(self) -> str:
        """Final round number, or ``"lo-hi"`` when the runs stopped at different rounds."""
        finals = sorted({run.final_round for run in self.runs})
        return str(finals[0]) if len(finals) == 1 else f"{finals[0]}-{finals[-1]}"

    def seeds(self) -> list[Any]:
        return [run.config.get("seed") for run in self.runs]

    def differing_keys(self) -> list[str]:
        """Run-config keys (besides per-run ones like ``seed``) whose values differ between the runs."""
        keys = set().union(*(run.config for run in self.runs)) - _PER_RUN_KEYS

        def variants(key: str) -> int:
            return len({json.dumps(run.config.get(key), sort_keys=True) for run in self.runs})

        return sorted(key for key in keys if variants(key) > 1)

    def by_attackers(self, metric: str, *, change: bool = False) -> dict[int, list[float]]:
        """``{attackers sampled: values of metric in the rounds (all runs) that sampled that many}``.

        ``change``: the round's change of ``metric`` from the round before instead of its value.
        Round 0 (the starting model, nothing trained) and rounds without ``attackers_sampled`` are left out.
        """
        values: dict[int, list[float]] = {}
        for run in self.runs:
            before: dict[str, Any] | None = None
            for record in run.records:
                attackers, number = record.get("attackers_sampled"), int(record["round"])
                value = as_float(record.get(metric))
                if change:
                    follows = before is not None and int(before["round"]) == number - 1
                    value = value - as_float(before.get(metric)) if follows else float("nan")
                before = record
                if number > 0 and attackers is not None and not np.isnan(value):
                    values.setdefault(int(attackers), []).append(value)
        return values

    def curve(self, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rounds, mean and population std of ``metric`` per round over the runs that reached that round."""
        per_round: dict[int, list[float]] = {}
        for run in self.runs:
            for record in run.records:
                value = as_float(record.get(metric))
                if not np.isnan(value):  # acc_main is absent on rounds that eval-every skips
                    per_round.setdefault(int(record["round"]), []).append(value)
        rounds = np.array(sorted(per_round), dtype=int)
        values = [np.array(per_round[r], dtype=float) for r in rounds]
        return rounds, np.array([v.mean() for v in values]), np.array([v.std() for v in values])


def as_float(value: Any) -> float:
    """``float(value)``, NaN for a missing or non-numeric value (a record without that metric)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def defense_order(defenses: Iterable[str]) -> list[str]:
    """``fedavg`` first, ``invariant`` last, the others alphabetical in between."""
    unique = set(defenses)
    middle = sorted(unique - {_FIRST, _LAST})
    return [d for d in (_FIRST,) if d in unique] + middle + [d for d in (_LAST,) if d in unique]


def _load_run(run_dir: Path) -> RunResult:
    """Read one run directory; raises ``ValueError`` (with the reason) when it cannot be used."""
    config_path, metrics_path = run_dir / "config.json", run_dir / "metrics.jsonl"
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ValueError("no config.json") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"unreadable config.json ({err})") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("run"), dict):
        raise ValueError('config.json has no "run" object')
    if meta.get("completed") is not True:
        raise ValueError("not completed")
    config = meta["run"]
    missing = [k for k in ("task", "attack", "defense") if k not in config]
    if missing:
        raise ValueError(f"run config lacks {', '.join(missing)}")
    try:
        lines = metrics_path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as err:
        raise ValueError("no metrics.jsonl") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"unreadable metrics.jsonl ({err})") from err
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            int(record["round"])
        except (json.JSONDecodeError, TypeError, KeyError, ValueError) as err:
            raise ValueError(f"metrics.jsonl line {number} is not a record with a round ({err})") from err
        records.append(record)
    if not records:
        raise ValueError("metrics.jsonl has no records")
    records.sort(key=lambda r: int(r["round"]))
    return RunResult(name=run_dir.name, config=config, records=records)


def load_runs(results_dir: Path, exclude: Sequence[Path] = ()) -> tuple[list[RunResult], dict[str, str]]:
    """Completed runs under ``results_dir`` (sorted by name) and ``{skipped run name: reason}``.

    A grid's pretrain cache (``pretrained/``) is not a run and is left out silently.
    """
    excluded = {p.resolve() for p in exclude}
    runs: list[RunResult] = []
    skipped: dict[str, str] = {}
    for run_dir in sorted(p for p in Path(results_dir).iterdir() if p.is_dir()):
        if run_dir.name.startswith(".") or run_dir.name == CACHE_DIR_NAME or run_dir.resolve() in excluded:
            continue
        try:
            runs.append(_load_run(run_dir))
        except ValueError as err:
            skipped[run_dir.name] = str(err)
            log(WARNING, "report: skipping run %s: %s", run_dir.name, err)
    return runs, skipped


def _group(runs: Iterable[RunResult]) -> dict[tuple[str, str], list[_Group]]:
    """``{(task, attack): [groups in defense order]}``, pairs sorted."""
    cells: dict[tuple[str, str, str], _Group] = {}
    for run in runs:
        task, attack, defense = run.key
        cells.setdefault(run.key, _Group(task, attack, defense)).runs.append(run)
    pairs: dict[tuple[str, str], list[_Group]] = {}
    for task, attack in sorted({(t, a) for t, a, _ in cells}):
        defenses = defense_order(d for t, a, d in cells if (t, a) == (task, attack))
        pairs[(task, attack)] = [cells[(task, attack, d)] for d in defenses]
    return pairs


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}"


def _by_attackers_table(groups: Sequence[_Group], metric: str, *, change: bool) -> list[str]:
    """Markdown rows: a defense per row, a column per number of attackers sampled, ``mean (rounds)`` cells."""
    tables = {group.defense: group.by_attackers(metric, change=change) for group in groups}
    tables = {defense: table for defense, table in tables.items() if table}
    counts = sorted(set().union(*tables.values())) if tables else []
    if not counts:
        return []
    sign = "+" if change else ""
    lines = [
        "| defense | " + " | ".join(str(count) for count in counts) + " |",
        "|:--|" + "--:|" * len(counts),
    ]
    for defense, table in tables.items():
        cells = [f"{np.mean(table[c]):{sign}.3f} ({len(table[c])})" if c in table else "" for c in counts]
        lines.append(f"| {defense} | " + " | ".join(cells) + " |")
    return lines + [""]


def _attacker_sections(groups: Sequence[_Group]) -> list[str]:
    """The per-attacker-count tables of one (task, attack) pair; empty without ``attackers_sampled``."""
    gain = _by_attackers_table(groups, "acc_backdoor", change=True)
    if not gain:
        return []
    lines = [
        "### acc_backdoor change per round, by attackers sampled",
        "",
        "Mean change of `acc_backdoor` from the round before over the rounds (all seeds) that sampled "
        "that many malicious clients (columns); the number of such rounds in brackets.",
        "",
        *gain,
    ]
    mask = _by_attackers_table(groups, "train_mask_fraction", change=False)
    if mask:
        lines += [
            "### AND-mask fraction, by attackers sampled",
            "",
            "Mean fraction of coordinates the AND-mask kept in the rounds that sampled that many "
            "malicious clients.",
            "",
            *mask,
        ]
    return lines


@dataclass(frozen=True)
class _Overview:
    """One task's grid of final results: ``cells[(defense, attack)]``, missing where not run."""

    task: str
    defenses: list[str]
    attacks: list[str]
    cells: dict[tuple[str, str], _Group]

    def final(self, metric: str) -> np.ndarray:
        """``(len(defenses), len(attacks))``: final ``metric``, mean over seeds; NaN where not run."""
        return np.array(
            [
                [self.cells[d, a].stats(metric)[0] if (d, a) in self.cells else np.nan for a in self.attacks]
                for d in self.defenses
            ]
        )


def _overviews(pairs: dict[tuple[str, str], list[_Group]]) -> list[_Overview]:
    """An :class:`_Overview` per task run under two or more attacks."""
    overviews = []
    for task in dict.fromkeys(task for task, _ in pairs):
        attacks = [attack for t, attack in pairs if t == task]
        if len(attacks) < 2:
            continue
        cells = {
            (group.defense, attack): group
            for (t, attack), groups in pairs.items()
            if t == task
            for group in groups
        }
        overviews.append(_Overview(task, defense_order(d for d, _ in cells), attacks, cells))
    return overviews


def _overview(pairs: dict[tuple[str, str], list[_Group]]) -> list[str]:
    """Markdown: per task with several attacks, a defense per row and an attack per column, each cell
    ``acc_main / acc_backdoor`` (final round, mean over seeds); ``-`` where that run is missing."""
    lines: list[str] = []
    for overview in _overviews(pairs):
        main, backdoor = overview.final("acc_main"), overview.final("acc_backdoor")
        lines += [
            f"## task `{overview.task}`: every defense against every attack",
            "",
            "Final-round `acc_main / acc_backdoor`, mean over seeds.",
            "",
            "| defense | " + " | ".join(f"`{attack}`" for attack in overview.attacks) + " |",
            "|:--|" + "--:|" * len(overview.attacks),
        ]
        for row, defense in enumerate(overview.defenses):
            cells = [
                f"{main[row, column]:.3f} / {backdoor[row, column]:.3f}"
                if (defense, attack) in overview.cells
                else "-"
                for column, attack in enumerate(overview.attacks)
            ]
            lines.append(f"| {defense} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _markdown(results_dir: Path, pairs: dict[tuple[str, str], list[_Group]], skipped: dict[str, str]) -> str:
    lines = [
        "# Results",
        "",
        f"Runs in `{results_dir}`: final-round accuracy, mean ± std over seeds (population std).",
        "",
    ]
    if not pairs:
        lines += ["No completed runs found.", ""]
    lines += _overview(pairs)
    for (task, attack), groups in pairs.items():
        lines += [
            f"## task `{task}`, attack `{attack}`",
            "",
            f"Task `{task}` under attack `{attack}`, from `{results_dir}`.",
            "",
            "| defense | acc_main | acc_backdoor | seeds | rounds |",
            "|:--|--:|--:|--:|--:|",
        ]
        notes = []
        for group in groups:
            main, backdoor = _fmt(*group.stats("acc_main")), _fmt(*group.stats("acc_backdoor"))
            lines.append(f"| {group.defense} | {main} | {backdoor} | {len(group.runs)} | {group.rounds()} |")
            seeds = group.seeds()
            if len(set(map(str, seeds))) < len(seeds):
                notes.append(f"`{group.defense}` has repeated seeds ({', '.join(map(str, seeds))}).")
            differing = group.differing_keys()
            if differing:
                notes.append(f"`{group.defense}` mixes runs whose configs differ in: {', '.join(differing)}.")
        lines.append("")
        if notes:
            lines += [f"Note: {note}" for note in notes] + [""]
        if attack != "none":
            lines += _attacker_sections(groups)
    if skipped:
        lines += [f"Skipped {len(skipped)} run(s):", ""]
        lines += [f"- `{name}`: {reason}" for name, reason in skipped.items()]
        lines.append("")
    return "\n".join(lines)


def _write_csv(path: Path, pairs: dict[tuple[str, str], list[_Group]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for groups in pairs.values():
            for group in groups:
                row: list[Any] = [group.task, group.attack, group.defense, len(group.runs), group.rounds()]
                for metric in METRICS:
                    row += [f"{value:.6f}" for value in group.stats(metric)]
                writer.writerow(row)


def file_safe(name: str) -> str:
    """A file-name-safe version of a task/attack name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "_"


_LINESTYLES = ("-", "--", ":", "-.")


def _curve_figure(metric: str, task: str, attack: str, groups: Sequence[_Group]) -> Figure:
    """One line per defense (mean over seeds), a ± std band when more than one seed.

    Past the palette's 20 colours, lines differ by dash pattern; the figure grows with the legend.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    from matplotlib.ticker import MaxNLocator

    outside_legend = len(groups) > 4
    height = max(4.5, 0.8 + 0.22 * len(groups)) if outside_legend else 4.5  # ~0.22 in a small-font entry
    fig = Figure(figsize=(9 if outside_legend else 7, height), dpi=120)
    ax = fig.add_subplot()
    palette = colormaps["tab20" if len(groups) > 10 else "tab10"].colors
    for index, group in enumerate(groups):
        rounds, mean, std = group.curve(metric)
        seeds = len(group.runs)
        highlighted = group.defense in ("fedavg", "invariant")
        (line,) = ax.plot(
            rounds,
            mean,
            marker="o" if len(rounds) <= 30 else None,
            markersize=3,
            color=palette[index % len(palette)],
            linestyle=_LINESTYLES[(index // len(palette)) % len(_LINESTYLES)],
            linewidth=2.5 if highlighted else 1.2,
            alpha=1.0 if highlighted else 0.75,
            label=f"{group.defense} ({seeds} seed{'s' if seeds != 1 else ''})",
        )
        if seeds > 1:
            ax.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(metric)
    ax.set_ylim(0.0, 1.0)
    ax.set_title(f"{metric}: task {task}, attack {attack}")
    ax.grid(True, alpha=0.4)
    if outside_legend:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    else:
        ax.legend(loc="best")
    fig.tight_layout()
    return fig


def _overview_figure(overview: _Overview) -> Figure:
    """Two heat maps, defense per row and attack per column: final ``acc_backdoor`` (colours over
    [0, 1]) and ``acc_main`` (colours over its own range, where the differences are a few points);
    each cell labelled with its value (mean over seeds), ``-`` where not run."""
    from matplotlib.figure import Figure

    rows, columns = len(overview.defenses), len(overview.attacks)
    fig = Figure(figsize=(3.2 + 1.6 * columns, 1.4 + 0.3 * rows), dpi=120)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, metric in zip(axes, ("acc_backdoor", "acc_main"), strict=True):
        values = overview.final(metric)
        if metric == "acc_backdoor":
            colormap, low, high, title = "RdYlGn_r", 0.0, 1.0, "final acc_backdoor (lower is better)"
        else:
            colormap, title = "viridis", "final acc_main"
            low, high = (np.nanmin(values), np.nanmax(values)) if np.isfinite(values).any() else (0.0, 1.0)
            low, high = (low, high) if high > low else (low - 0.01, high + 0.01)
        image = ax.imshow(np.ma.masked_invalid(values), cmap=colormap, vmin=low, vmax=high, aspect="auto")
        for (row, column), value in np.ndenumerate(values):
            shade = (value - low) / (high - low)  # dark ends of both colour maps take white text
            dark = not np.isnan(value) and (shade < 0.5 if metric == "acc_main" else not 0.25 < shade < 0.75)
            label = "-" if np.isnan(value) else f"{value:.2f}"
            ax.text(
                column,
                row,
                label,
                ha="center",
                va="center",
                fontsize="small",
                color="white" if dark else "black",
            )
        ax.set_xticks(range(columns), overview.attacks)
        ax.set_yticks(range(rows), overview.defenses)
        ax.set_title(title, fontsize="medium")
        fig.colorbar(image, ax=ax, fraction=0.08, pad=0.02)
    fig.suptitle(f"task {overview.task}: every defense against every attack")
    fig.tight_layout()
    return fig


def write_report(results_dir: Path, out_dir: Path | None = None, *, plots: bool = True) -> ReportFiles:
    """Write ``report.md``, ``report.csv`` and (``plots``) ``<metric>__<task>__<attack>.png`` to ``out_dir``,
    and ``overview__<task>.png`` for a task run under two or more attacks.

    ``out_dir`` defaults to ``results_dir`` and is created if needed. Incomplete or unreadable runs are
    skipped with a warning and listed in the report and in ``ReportFiles.skipped``.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results directory {results_dir} does not exist")
    out_dir = results_dir if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, skipped = load_runs(results_dir, exclude=[out_dir])
    if not runs:
        log(WARNING, "report: no completed runs in %s", results_dir)
    pairs = _group(runs)

    markdown_path, csv_path = out_dir / "report.md", out_dir / "report.csv"
    markdown_path.write_text(_markdown(results_dir, pairs, skipped), encoding="utf-8")
    _write_csv(csv_path, pairs)
    plot_paths: list[Path] = []
    if plots:
        for (task, attack), groups in pairs.items():
            for metric in METRICS:
                path = out_dir / f"{metric}__{file_safe(task)}__{file_safe(attack)}.png"
                _curve_figure(metric, task, attack, groups).savefig(path, format="png")
                plot_paths.append(path)
        for overview in _overviews(pairs):
            path = out_dir / f"overview__{file_safe(overview.task)}.png"
            _overview_figure(overview).savefig(path, format="png")
            plot_paths.append(path)
    return ReportFiles(markdown=markdown_path, csv=csv_path, plots=plot_paths, skipped=list(skipped))
