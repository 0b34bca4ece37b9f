"""The demo's final summary line: the test Spearman with its bootstrap interval and the w/ DD figure."""

from __future__ import annotations

from deepsports.cli.demo import _with_interval


def test_summary_prints_the_interval_of_both_protocols():
    metrics = {"test_spearman": 0.85512, "test_spearman_ci_low": 0.80123, "test_spearman_ci_high": 0.89571,
               "test_spearman_dd": 0.9, "test_spearman_dd_ci_low": 0.87, "test_spearman_dd_ci_high": 0.92}
    line = _with_interval(metrics)
    assert line.startswith("0.8551 [0.8012, 0.8957]")
    assert "with true difficulty" in line and "0.9000 [0.8700, 0.9200]" in line
    assert _with_interval({"test_spearman": 0.5}) == "0.5000"  # a run logged before intervals existed
    assert _with_interval({}) == "(not evaluated)"
