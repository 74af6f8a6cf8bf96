"""``tools/bench_quality.py``: the paired comparison of scores over several trained models."""

from __future__ import annotations

import numpy as np
from tools_loader import load_tool

bench = load_tool("bench_quality")


def _models(tests: list[float]) -> np.ndarray:
    """Rows [val, test, test_error, macs] for one score, test top-1 as given."""
    return np.array([[0.99, t, 0.5, 0.5] for t in tests])


def test_a_lead_is_the_mean_per_model_difference_with_its_t_interval():
    col = {"idap": _models([0.99, 0.98, 0.97, 0.99]), "l1": _models([0.98, 0.98, 0.95, 0.99])}
    header, rule, idap_row, l1_row = bench.paired_leads(col)
    # d = 100 * (idap - l1) = [1, 0, 2, 0]: mean 0.75, sd 0.9574, t(0.975, 3) = 3.1824
    half = 3.1824 * 0.9574 / 2
    assert l1_row.split(" | ")[4] == f"+0.75 ({0.75 - half:+.2f} to {0.75 + half:+.2f})"
    assert l1_row.endswith("| 2 / 2 / 0 |")
    assert idap_row.endswith("|  |  |")  # no lead over itself
    assert "95 % CI" in header and rule.count("|") == 7


def test_an_interval_that_contains_zero_shows_a_tie():
    col = {"idap": _models([0.99, 0.97, 0.98]), "wanda": _models([0.98, 0.98, 0.98])}
    row = bench.paired_leads(col)[-1]
    low, high = (float(x) for x in row.split(" | ")[4].split("(")[1].rstrip(")").split(" to "))
    assert low < 0 < high
    assert row.endswith("| 1 / 1 / 1 |")


def test_a_rows_lead_carries_the_interval_of_its_per_sample_differences():
    ref = {"test": 0.75, "test_samples": [1.0, 1.0, 0.0, 1.0]}
    row = {"test": 0.5, "test_samples": [1.0, 0.0, 0.0, 1.0]}
    # d = [0, 100, 0, 0]: mean 25, sd 50, half-width 3.1824 * 50 / 2
    assert bench._lead(ref, row) == f"+25.00 ({25 - 79.56:+.2f} to {25 + 79.56:+.2f})"
    assert bench._lead(ref, {"test": 0.5, "test_samples": None}) == "+25.00"  # an older row
