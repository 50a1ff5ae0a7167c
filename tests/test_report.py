"""Tests for simulation.report: Markdown/CSV tables and PNG plots from a fake results directory."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from simulation.report import defense_order, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROUNDS = 3

# (defense, seed) -> final-round (acc_main, acc_backdoor) for task linear / attack blackbox.
FINAL = {
    ("fedavg", 0): (0.80, 0.90),
    ("fedavg", 1): (0.70, 0.70),
    ("invariant", 0): (0.85, 0.10),
    ("invariant", 1): (0.75, 0.20),
}


def _write_run(root: Path, name: str, run: dict, records: list[dict], completed: bool = True) -> None:
    run_dir = root / name
    run_dir.mkdir()
    meta = {"run": run, "completed": completed, "versions": {}, "grid": "test", "started": "", "finished": ""}
    (run_dir / "config.json").write_text(json.dumps(meta))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _records(final_main: float, final_backdoor: float, rounds: int = ROUNDS) -> list[dict]:
    """Round 0 .. rounds; linear ramp from 0.1 to the final values, plus extras the report must ignore."""
    out = []
    for r in range(rounds + 1):
        frac = r / rounds
        out.append(
            {
                "round": r,
                "acc_main": 0.1 + frac * (final_main - 0.1),
                "acc_backdoor": 0.1 + frac * (final_backdoor - 0.1),
                "loss": 1.0 - 0.1 * r,
                "seconds": 0.5,
                "attackers_sampled": 1,
            }
        )
    out[-1]["acc_main"], out[-1]["acc_backdoor"] = final_main, final_backdoor  # exact, no ramp rounding
    return out


def _run_config(task: str, attack: str, defense: str, seed: int) -> dict:
    return {"task": task, "attack": attack, "defense": defense, "seed": seed, "num-server-rounds": ROUNDS}


@pytest.fixture
def results(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    root.mkdir()
    for (defense, seed), (main, backdoor) in FINAL.items():
        _write_run(
            root,
            f"{defense}__blackbox__seed{seed}",
            _run_config("linear", "blackbox", defense, seed),
            _records(main, backdoor),
        )
    # Incomplete run with absurd numbers: must not leak into the averages.
    _write_run(
        root,
        "fedavg__blackbox__seed2",
        _run_config("linear", "blackbox", "fedavg", 2),
        _records(0.0, 0.0),
        completed=False,
    )
    garbage = root / "garbage__run"
    garbage.mkdir()
    (garbage / "config.json").write_text("{not json")
    # Second (task, attack) pair, one seed, a defense sorted between fedavg and invariant.
    _write_run(root, "krum__pixel__seed0", _run_config("fmnist", "pixel", "krum", 0), _records(0.5, 0.25))
    _write_run(root, "fedavg__pixel__seed0", _run_config("fmnist", "pixel", "fedavg", 0), _records(0.6, 0.95))
    return root


def _table_rows(markdown: str, heading: str) -> dict[str, list[str]]:
    """``{defense: cells}`` of the table under the section whose heading contains ``heading``."""
    section = markdown.split(heading, 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| defense"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_markdown_table_values(results: Path) -> None:
    files = write_report(results)
    assert files.markdown == results / "report.md"
    text = files.markdown.read_text(encoding="utf-8")
    assert str(results) in text
    rows = _table_rows(text, "task `linear`, attack `blackbox`")
    assert list(rows) == ["fedavg", "invariant"]
    # fedavg: main (0.8, 0.7) -> 0.75 ± 0.05; backdoor (0.9, 0.7) -> 0.8 ± 0.1 (population std).
    assert rows["fedavg"] == ["0.750 ± 0.050", "0.800 ± 0.100", "2", "3"]
    assert rows["invariant"] == ["0.800 ± 0.050", "0.150 ± 0.050", "2", "3"]


def test_an_invariant_defense_at_another_tau_is_its_own_row(results: Path) -> None:
    config = {**_run_config("linear", "blackbox", "invariant", 0), "tau": 0.3}
    _write_run(results, "invariant_tau_0.3__blackbox__seed0", config, _records(0.85, 0.05))
    rows = _table_rows(write_report(results).markdown.read_text(encoding="utf-8"), "attack `blackbox`")
    assert list(rows) == ["fedavg", "invariant tau=0.3", "invariant"]
    assert rows["invariant tau=0.3"][:2] == ["0.850 ± 0.000", "0.050 ± 0.000"]
    assert rows["invariant"][:2] == ["0.800 ± 0.050", "0.150 ± 0.050"]  # the tau=0.6 runs alone


def test_a_task_under_several_attacks_gets_a_defense_by_attack_overview(results: Path) -> None:
    text = write_report(results).markdown.read_text(encoding="utf-8")
    assert "every defense against every attack" not in text  # one attack per task so far
    _write_run(results, "fedavg__pgd__seed0", _run_config("linear", "pgd", "fedavg", 0), _records(0.7, 0.6))
    text = write_report(results).markdown.read_text(encoding="utf-8")
    rows = _table_rows(text, "task `linear`: every defense against every attack")
    assert rows == {
        "fedavg": ["0.750 / 0.800", "0.700 / 0.600"],  # blackbox: the mean over seeds 0 and 1
        "invariant": ["0.800 / 0.150", "-"],  # never run under pgd
    }
    assert "task `fmnist`: every defense" not in text


def test_the_overview_heat_map_labels_every_cell(results: Path) -> None:
    from simulation.report import _group, _overview_figure, _overviews, load_runs

    _write_run(results, "fedavg__pgd__seed0", _run_config("linear", "pgd", "fedavg", 0), _records(0.7, 0.6))
    files = write_report(results)
    assert results / "overview__linear.png" in files.plots
    assert not (results / "overview__fmnist.png").exists()  # fmnist ran under one attack only
    assert (results / "overview__linear.png").read_bytes()[:8] == PNG_SIGNATURE

    (overview,) = _overviews(_group(load_runs(results)[0]))
    backdoor_panel, main_panel = _overview_figure(overview).axes[:2]
    assert [t.get_text() for t in backdoor_panel.get_yticklabels()] == ["fedavg", "invariant"]
    assert [t.get_text() for t in backdoor_panel.get_xticklabels()] == ["blackbox", "pgd"]
    # cells row by row: fedavg (blackbox, pgd), invariant (blackbox, not run)
    assert [t.get_text() for t in backdoor_panel.texts] == ["0.80", "0.60", "0.15", "-"]
    assert [t.get_text() for t in main_panel.texts] == ["0.75", "0.70", "0.80", "-"]


def test_curve_legend_fits_and_styles_differ_with_many_defenses(tmp_path: Path) -> None:
    from simulation.report import _curve_figure, _group, load_runs

    defenses = [f"defense-{index:02d}" for index in range(26)]  # more than tab20's colours
    for defense in defenses:
        _write_run(
            tmp_path,
            f"{defense}__blackbox__seed0",
            _run_config("linear", "blackbox", defense, 0),
            _records(0.5, 0.5),
        )
    (groups,) = _group(load_runs(tmp_path)[0]).values()
    fig = _curve_figure("acc_backdoor", "linear", "blackbox", groups)
    fig.canvas.draw()
    (ax,) = fig.axes
    legend = ax.get_legend()
    assert len(legend.get_texts()) == 26
    box = legend.get_window_extent()
    assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1
    styles = {(line.get_color(), line.get_linestyle()) for line in ax.get_lines()}
    assert len(styles) == 26


def test_second_pair_has_own_section_and_order(results: Path) -> None:
    files = write_report(results)
    text = files.markdown.read_text(encoding="utf-8")
    rows = _table_rows(text, "task `fmnist`, attack `pixel`")
    assert list(rows) == ["fedavg", "krum"]
    assert rows["krum"] == ["0.500 ± 0.000", "0.250 ± 0.000", "1", "3"]
    assert rows["fedavg"] == ["0.600 ± 0.000", "0.950 ± 0.000", "1", "3"]
    names = sorted(p.name for p in files.plots)
    pairs = (("linear", "blackbox"), ("fmnist", "pixel"))
    assert names == sorted(f"{m}__{t}__{a}.png" for m in ("acc_main", "acc_backdoor") for t, a in pairs)


def test_csv_rows(results: Path) -> None:
    files = write_report(results)
    with files.csv.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == [
            "task",
            "attack",
            "defense",
            "seeds",
            "rounds",
            "acc_main_mean",
            "acc_main_std",
            "acc_backdoor_mean",
            "acc_backdoor_std",
        ]
        rows = {(r["task"], r["attack"], r["defense"]): r for r in reader}
    assert set(rows) == {
        ("linear", "blackbox", "fedavg"),
        ("linear", "blackbox", "invariant"),
        ("fmnist", "pixel", "fedavg"),
        ("fmnist", "pixel", "krum"),
    }
    for defense, _seed in FINAL:
        row = rows[("linear", "blackbox", defense)]
        mains = np.array([FINAL[(defense, s)][0] for s in (0, 1)])
        backdoors = np.array([FINAL[(defense, s)][1] for s in (0, 1)])
        assert int(row["seeds"]) == 2 and int(row["rounds"]) == ROUNDS
        assert float(row["acc_main_mean"]) == pytest.approx(mains.mean(), abs=1e-6)
        assert float(row["acc_main_std"]) == pytest.approx(mains.std(), abs=1e-6)
        assert float(row["acc_backdoor_mean"]) == pytest.approx(backdoors.mean(), abs=1e-6)
        assert float(row["acc_backdoor_std"]) == pytest.approx(backdoors.std(), abs=1e-6)
    assert float(rows[("fmnist", "pixel", "krum")]["acc_main_std"]) == 0.0


def test_plots_are_valid_pngs(results: Path, tmp_path: Path) -> None:
    import matplotlib.image

    out = tmp_path / "out"
    files = write_report(results, out)
    assert files.markdown.parent == out and files.csv.parent == out
    assert len(files.plots) == 4
    for path in files.plots:
        assert path.parent == out
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 100 and image.shape[1] > 100
        assert float(np.ptp(image[..., :3])) > 0  # not a blank canvas
    assert not (results / "report.md").exists()


def test_skipped_runs_reported(results: Path, flwr_logs) -> None:
    files = write_report(results)
    assert sorted(files.skipped) == ["fedavg__blackbox__seed2", "garbage__run"]
    text = files.markdown.read_text(encoding="utf-8")
    assert "Skipped 2 run(s)" in text
    assert "`fedavg__blackbox__seed2`: not completed" in text
    assert "`garbage__run`: unreadable config.json" in text
    assert "skipping run garbage__run" in flwr_logs.text


def test_bad_run_dirs_do_not_crash(tmp_path: Path) -> None:
    root = tmp_path / "results"
    root.mkdir()
    (root / "empty_dir").mkdir()
    _write_run(root, "no_metrics", _run_config("linear", "none", "fedavg", 0), [])
    _write_run(root, "not_dict", {}, [])
    (root / "not_dict" / "config.json").write_text("[1, 2]")
    _write_run(root, "ok", _run_config("linear", "none", "fedavg", 0), _records(0.9, 0.1))
    (root / "ok_bad_line").mkdir()
    (root / "ok_bad_line" / "config.json").write_text(
        json.dumps({"run": _run_config("linear", "none", "fedavg", 1), "completed": True})
    )
    (root / "ok_bad_line" / "metrics.jsonl").write_text('{"round": 0, "acc_main": 0.1}\n{"round": 1, "acc_')
    files = write_report(root, plots=False)
    assert sorted(files.skipped) == ["empty_dir", "no_metrics", "not_dict", "ok_bad_line"]
    assert files.plots == []
    rows = _table_rows(files.markdown.read_text(encoding="utf-8"), "task `linear`, attack `none`")
    assert rows == {"fedavg": ["0.900 ± 0.000", "0.100 ± 0.000", "1", "3"]}


def test_empty_results_dir(tmp_path: Path) -> None:
    files = write_report(tmp_path, plots=True)
    assert "No completed runs" in files.markdown.read_text(encoding="utf-8")
    assert files.plots == [] and files.skipped == []
    with files.csv.open(newline="") as handle:
        assert len(list(csv.reader(handle))) == 1  # header only
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "missing")


def test_defense_order() -> None:
    assert defense_order(["invariant", "trimmed-mean", "fedavg", "krum", "krum"]) == [
        "fedavg",
        "krum",
        "trimmed-mean",
        "invariant",
    ]
    assert defense_order(["median", "invariant"]) == ["median", "invariant"]


def test_only_settings_that_change_results_are_flagged_as_differing(tmp_path: Path) -> None:
    """Runs of one cell may keep their pretrained model in different caches; other keys must match."""
    for seed, cache, rounds in ((0, "a/pretrained", ROUNDS), (1, "b/pretrained", ROUNDS)):
        run = {**_run_config("linear", "blackbox", "invariant", seed), "pretrain-cache": cache}
        _write_run(
            tmp_path,
            f"invariant__blackbox__seed{seed}",
            {**run, "pretrain-rounds": rounds},
            _records(0.8, 0.1),
        )
    assert "differ" not in write_report(tmp_path).markdown.read_text()
    _write_run(
        tmp_path,
        "invariant__blackbox__seed2",
        {**_run_config("linear", "blackbox", "invariant", 2), "pretrain-rounds": ROUNDS + 1},
        _records(0.8, 0.1),
    )
    assert "configs differ in: pretrain-rounds." in write_report(tmp_path).markdown.read_text()


def test_backdoor_change_by_attackers_sampled(tmp_path: Path) -> None:
    """Per-round acc_backdoor changes and mask fractions, grouped by attackers sampled, over seeds."""
    # (attackers sampled, acc_backdoor, mask fraction) for rounds 1..4; round 0 starts at 0.10.
    seeds = {
        0: [(2, 0.12, 0.02), (4, 0.20, 0.04), (2, 0.21, 0.02), (0, 0.20, 0.01)],
        1: [(4, 0.16, 0.06), (4, 0.20, 0.02), (0, 0.20, 0.01), (2, 0.25, 0.02)],
    }
    for seed, rounds in seeds.items():
        records = [{"round": 0, "acc_main": 0.8, "acc_backdoor": 0.10, "attackers_sampled": 0}]
        for number, (attackers, backdoor, mask) in enumerate(rounds, start=1):
            records.append(
                {
                    "round": number,
                    "acc_main": 0.8,
                    "acc_backdoor": backdoor,
                    "attackers_sampled": attackers,
                    "train_mask_fraction": mask,
                }
            )
        _write_run(
            tmp_path,
            f"invariant__blackbox__seed{seed}",
            _run_config("linear", "blackbox", "invariant", seed),
            records,
        )
        fedavg = [{k: v for k, v in r.items() if k != "train_mask_fraction"} for r in records]
        _write_run(
            tmp_path,
            f"fedavg__blackbox__seed{seed}",
            _run_config("linear", "blackbox", "fedavg", seed),
            fedavg,
        )
    _write_run(
        tmp_path, "invariant__none__seed0", _run_config("linear", "none", "invariant", 0), _records(0.9, 0.0)
    )
    text = write_report(tmp_path, plots=False).markdown.read_text(encoding="utf-8")

    # attackers 0: -0.01, 0.00; 2: +0.02, +0.01, +0.05; 4: +0.08, +0.06, +0.04.
    gain = _table_rows(text, "### acc_backdoor change per round")
    expected = ["-0.005 (2)", "+0.027 (3)", "+0.060 (3)"]
    assert gain == {"fedavg": expected, "invariant": expected}
    assert "| defense | 0 | 2 | 4 |" in text.split("### acc_backdoor change per round", 1)[1]
    mask = _table_rows(text, "### AND-mask fraction")
    assert mask == {"invariant": ["0.010 (2)", "0.020 (3)", "0.040 (3)"]}  # fedavg reports no mask
    # No attack, no attacker tables for that pair.
    assert text.count("### acc_backdoor change per round") == 1
