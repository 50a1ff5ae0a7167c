"""A defense's scorecard against the long-horizon bar (simulation.scorecard) on hand-made run directories."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulation.__main__ import main as cli
from simulation.report import load_runs
from simulation.scorecard import LAST_BACKDOOR_ROUNDS, LAST_EVALUATIONS, scorecard_rows, write_scorecard
from tests.test_report import _write_run

ROUNDS = 120  # acc_main evaluated every 10 rounds: 13 evaluations, more than LAST_EVALUATIONS


def _series(backdoor: dict[int, float], main: float, last_main: float) -> list[dict]:
    """acc_backdoor 0.01 but in ``backdoor``; acc_main ``main`` every 10 rounds, then ``last_main``."""
    records = [{"round": 0, "acc_backdoor": 0.5, "acc_main": 0.3}]  # round 0 (the start) never counts
    for r in range(1, ROUNDS + 1):
        record = {"round": r, "acc_backdoor": backdoor.get(r, 0.01)}
        if r % 10 == 0:
            record["acc_main"] = last_main if r == ROUNDS else main
        records.append(record)
    return records


def _results(root: Path) -> Path:
    root.mkdir()
    runs = {  # (defense, attack, seed): (backdoor rounds, acc_main, final acc_main)
        ("fedavg", "blackbox", 0): ({5: 0.9}, 0.90, 0.90),
        ("fedavg", "blackbox", 1): ({5: 0.9}, 0.90, 0.90),
        ("fedavg", "pgd", 0): ({}, 0.90, 0.90),
        ("fedavg", "none", 0): ({50: 0.2, 61: 0.2, 120: 0.2}, 0.91, 0.91),  # seed 0's no-attack control
        ("invariant", "blackbox", 0): ({}, 0.87, 0.895),  # held, 0.5 below at the end, 3 below on the mean
        ("invariant", "blackbox", 1): ({}, 0.88, 0.88),  # held, 2 points below
        ("invariant", "pgd", 0): ({7: 0.11, 9: 0.3, 100: 0.61}, 0.90, 0.90),  # leaked at round 7
        ("invariant", "mask-tipping", 0): ({}, 0.89, 0.89),  # FedAvg has no run of this cell
        ("invariant", "blackbox", 2): ({}, 0.90, 0.90),  # nor of this one (seed 2)
        ("invariant", "none", 0): ({30: 0.12}, 0.90, 0.90),  # its own no-attack control, not a cell
    }
    for (defense, attack, seed), (backdoor, main, last) in runs.items():
        config = {"task": "fmnist", "attack": attack, "defense": defense, "tau": 0.6, "seed": seed}
        _write_run(root, f"{defense}__{attack}__seed{seed}", config, _series(backdoor, main, last))
    return root


def test_rows_pair_each_cell_with_the_baseline_and_judge_both_halves(tmp_path: Path) -> None:
    rows = {
        (r.attack, r.seed): r for r in scorecard_rows(load_runs(_results(tmp_path / "r"))[0], "invariant")
    }
    assert sorted(rows) == [
        ("blackbox", 0),
        ("blackbox", 1),
        ("blackbox", 2),
        ("mask-tipping", 0),
        ("none", 0),
        ("pgd", 0),
    ]

    near_end = rows[("blackbox", 0)]
    assert near_end.verdict == "meets the bar" and near_end.held
    assert near_end.gap == pytest.approx(0.005)
    assert near_end.peak_backdoor == pytest.approx(0.01)  # round 0's 0.5 is the start, not the attack
    # the mean of the last 10 of its 13 evaluations: nine at 0.87 and the final 0.895
    assert near_end.recent_main == pytest.approx((9 * 0.87 + 0.895) / LAST_EVALUATIONS)
    assert near_end.recent_gap == pytest.approx(0.90 - (9 * 0.87 + 0.895) / LAST_EVALUATIONS)

    assert rows[("blackbox", 1)].verdict == "held; accuracy missed"
    assert rows[("blackbox", 1)].gap == pytest.approx(0.02)  # paired with FedAvg's seed 1, not seed 0

    leaked = rows[("pgd", 0)]
    assert (
        leaked.verdict == "leaked"
        and leaked.first_over_bar == 7
        and leaked.rounds_over_bar == 3
        and leaked.peak_backdoor == pytest.approx(0.61)
    )
    # rounds 61..120: round 100's 0.61 and 59 rounds at 0.01
    assert leaked.recent_backdoor == pytest.approx((0.61 + 59 * 0.01) / LAST_BACKDOOR_ROUNDS)

    # seed 0's cells carry FedAvg's no-attack run of seed 0, whatever their attack; seed 1 has none
    for cell in [("blackbox", 0), ("pgd", 0), ("mask-tipping", 0)]:
        assert rows[cell].control_rounds_over_bar == 3  # rounds 50, 61 and 120
        assert rows[cell].control_recent_backdoor == pytest.approx(
            (2 * 0.2 + 58 * 0.01) / LAST_BACKDOOR_ROUNDS
        )
    assert rows[("blackbox", 1)].control_rounds_over_bar is None
    assert rows[("blackbox", 1)].control_recent_backdoor is None

    for cell in [("mask-tipping", 0), ("blackbox", 2)]:
        assert rows[cell].verdict == "held; no baseline run" and rows[cell].gap is None

    # over the bar at round 30, but with no attacker there is nothing to hold out: a control, not a leak
    control = rows[("none", 0)]
    assert control.is_control and control.verdict == "no attack (control)"
    assert control.first_over_bar == 30 and control.gap == pytest.approx(0.01)  # FedAvg's no-attack run


def test_a_defense_with_no_run_is_refused_with_the_labels_present(tmp_path: Path) -> None:
    runs = load_runs(_results(tmp_path / "r"))[0]
    with pytest.raises(ValueError, match=r"'invariant tau=0.3'.*\['fedavg', 'invariant'\]"):
        scorecard_rows(runs, "invariant tau=0.3")


def test_written_table_and_cli(tmp_path: Path, capsys) -> None:
    results = _results(tmp_path / "r")
    text = write_scorecard([results], "invariant", out=tmp_path / "out" / "scorecard.md")
    assert (tmp_path / "out" / "scorecard.md").read_text() == text
    assert (
        "| fmnist | blackbox | 1 | 120 | 0.01 | never | 0 | 0.010 | not run | not run "
        "| 0.880 | 0.900 | +2.00 | 0.880 | 0.900 | +2.00 " in text
    )
    assert "| fmnist | pgd | 0 | 120 | 0.61 | 7 | 3 | 0.020 | 3 | 0.016 | 0.900 | 0.900 | +0.00 |" in text
    assert "| 0.890 | not run | - | 0.890 | not run | - | held; no baseline run |" in text
    assert "| fmnist | none | 0 | 120 | 0.12 | 30 | 1 |" in text and "| no attack (control) |" in text
    assert "1 of 5 cells meet the bar." in text  # the control is listed, not counted
    cli(["scorecard", str(results), "--defense", "invariant"])
    assert "1 of 5 cells meet the bar." in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no completed run of defense 'robust-lr'"):
        cli(["scorecard", str(results), "--defense", "robust-lr"])
