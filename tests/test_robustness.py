"""Fast subset of ``benchmarks/robustness.py``: both strategy APIs against seeded hostile inputs."""

from __future__ import annotations

import pytest

import flwr_invariant.screening
from benchmarks.robustness import (
    FAILURE,
    HOSTILE_KINDS,
    MESSAGE_ONLY_KINDS,
    VALID_KINDS,
    Report,
    make_case,
    run,
    run_case,
    zero_sum_count_cases,
)


def test_hostile_stream_never_raises_and_counts_exactly_the_hostile_clients() -> None:
    report = run(cases=200, seed=0)
    print(f"robustness: {report.cases} cases, {report.checks} checks, {len(report.failures)} failures")
    expected = {*VALID_KINDS, *HOSTILE_KINDS, *MESSAGE_ONLY_KINDS, FAILURE}
    assert set(report.kinds) == expected  # every kind was tried
    assert report.cases >= 200 and report.checks > 20 * report.cases
    assert not report.failures, "\n".join(report.failures[:10])


@pytest.mark.parametrize(
    "kinds",
    [
        [],
        [FAILURE, FAILURE],
        ["honest"],
        ["nan"],
        ["overflow", "honest"],
        ["garbage_bytes", "lying_header", "truncated", "empty_bytes"],
        ["huge_finite"] * 5,
        ["object_dtype", "str_dtype", "complex_dtype", "honest", "honest"],
        ["wrong_keys", "no_metrics", "weight_not_number", "two_array_records", "honest"],
    ],
    ids=lambda kinds: "+".join(kinds) or "no-client",
)
def test_corner_cases(kinds: list[str]) -> None:
    report = Report()
    for seed in range(5):
        run_case(make_case(seed, kinds=kinds), report)
    assert not report.failures, "\n".join(report.failures)


def test_the_checks_catch_a_strategy_that_lets_nan_through(monkeypatch) -> None:
    """The harness can fail: with the NaN/Inf/overflow screen disabled, it reports the NaN clients."""
    monkeypatch.setattr(flwr_invariant.screening, "_value_problem", lambda array, headroom: None)
    report = Report()
    run_case(make_case(0, kinds=["honest", "honest", "nan"]), report)
    assert any("expected (2, 1, 0)" in failure for failure in report.failures), report.failures


@pytest.mark.parametrize("case", zero_sum_count_cases(), ids=["all-zero", "cancelling"])
def test_sample_counts_summing_to_zero_are_excluded_not_fatal(case) -> None:
    """A client may claim ``num-examples`` 0 or minus the others' sum; its reply is excluded."""
    report = Report()
    run_case(case, report)
    assert report.cases == 1 and not report.failures, report.failures
