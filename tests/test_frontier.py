"""The frontier of long runs (simulation.frontier) on hand-made run directories."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from simulation.__main__ import main as cli
from simulation.frontier import frontier_points, write_frontier
from simulation.report import load_runs
from tests.test_report import PNG_SIGNATURE, _write_run


def _series(backdoor: list[float], final_main: float) -> list[dict]:
    """Round 0 .. len(backdoor); acc_main only on round 0 and the last (as eval-every leaves it)."""
    records = [{"round": 0, "acc_main": 0.5, "acc_backdoor": 0.9}]  # round 0 never counts
    records += [{"round": r, "acc_backdoor": v} for r, v in enumerate(backdoor, start=1)]
    records[-1]["acc_main"] = final_main
    return records


def _results(root: Path) -> Path:
    root.mkdir()
    runs = {
        ("invariant", 0.6, 0): ([0.05, 0.3, 0.2], 0.80),
        ("invariant", 0.6, 1): ([0.02, 0.08, 0.5], 0.82),
        ("invariant", 0.8, 0): ([0.01, 0.02, 0.03], 0.70),
        ("fedavg", 0.8, 0): ([0.9, 0.95, 0.97], 0.85),  # tau does not label FedAvg
        ("invariant-bloc-exclusion", 0.3, 0): ([0.0, 0.0, 0.0], 0.84),
    }
    for (defense, tau, seed), (backdoor, main) in runs.items():
        config = {"task": "fmnist", "attack": "blackbox", "defense": defense, "tau": tau, "seed": seed}
        if defense == "invariant-bloc-exclusion":
            config["trim-ratio"] = 0.2
        _write_run(root, f"{defense}_{tau}_{seed}", config, _series(backdoor, main))
    return root


def test_points_take_the_highest_round_and_the_first_crossing(tmp_path: Path) -> None:
    points = {p.label: p for p in frontier_points(load_runs(_results(tmp_path / "r"))[0])}
    assert sorted(points) == [
        "fedavg", "invariant", "invariant tau=0.8", "invariant-bloc-exclusion tau=0.3 trim-ratio=0.2"
    ]  # fmt: skip
    paper = points["invariant"]
    np.testing.assert_allclose(sorted(paper.peak_backdoor), [0.3, 0.5])  # not round 0's 0.9, not the final
    assert paper.worst == 0.5 and paper.seeds == 2 and paper.rounds == 3
    assert paper.final_main == np.mean([0.80, 0.82])
    assert paper.first_over_bar == 2
    assert points["invariant tau=0.8"].first_over_bar is None
    assert points["fedavg"].first_over_bar == 1


def test_write_frontier_and_cli(tmp_path: Path, capsys) -> None:
    results = _results(tmp_path / "r")
    written = write_frontier([results], tmp_path / "out")
    assert [p.name for p in written] == ["frontier.md", "frontier__fmnist__3.png"]
    assert written[1].read_bytes().startswith(PNG_SIGNATURE)
    table = written[0].read_text()
    assert "| blackbox | invariant | 2 | 3 | 0.810 | 0.400 / 0.500 | 2 |" in table
    assert "| blackbox | invariant tau=0.8 | 1 | 3 | 0.700 | 0.030 / 0.030 | never |" in table
    cli(["frontier", str(results), "--out", str(tmp_path / "cli")])
    assert "invariant tau=0.8" in capsys.readouterr().out
