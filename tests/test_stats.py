"""Statistics in the tables: spread and intervals over seeds, and significance marks on constructed results
whose answers are known."""

import numpy as np
import pandas as pd
import pytest

from harness.stats import pack_correct, paired_bootstrap, paired_seed_test, summarize, unpack_correct
from harness.tables import paper_table


def test_summary_interval_is_students_t():
    s = summarize([0.80, 0.82, 0.84])
    assert s.n == 3 and s.mean == pytest.approx(0.82) and s.std == pytest.approx(0.02)
    half = 4.302653 * 0.02 / np.sqrt(3)  # t(0.975, 2) x std / sqrt(n)
    assert s.ci95 == pytest.approx((0.82 - half, 0.82 + half), rel=1e-5)
    assert summarize([0.5, 0.6]).ci95 is None and summarize([0.5]).std == 0.0


def test_paired_tests_on_known_outcomes():
    a, b = {0: 0.80, 1: 0.82, 2: 0.81}, {0: 0.60, 1: 0.61, 2: 0.62}
    assert paired_seed_test(a, b) < 0.01
    assert paired_seed_test(a, {0: 0.81, 1: 0.80, 2: 0.82}) > 0.5
    assert paired_seed_test({0: 0.8}, {0: 0.5}) is None  # one shared seed: no t-test
    rng = np.random.default_rng(0)
    good = rng.random(400) < 0.9
    bad = good & (rng.random(400) < 0.55)  # ~50%: wrong on many images the first gets right
    almost = good.copy()
    almost[:2] = ~almost[:2]
    assert paired_bootstrap(good, bad) < 0.001 and paired_bootstrap(good, almost) > 0.05  # 2 of 400 images: noise
    assert np.array_equal(unpack_correct(pack_correct(good)), good)


def rows(cells: dict, correct: dict | None = None) -> pd.DataFrame:
    out = []
    for (m, seed), acc in cells.items():
        row = {"method.k": m, "seed": seed, "status": "finished", "test/acc": acc}
        if correct:
            row["test/correct"] = pack_correct(correct[m])
        out.append(row)
    return pd.DataFrame(out)


def test_table_marks_the_best_ties_and_the_worse_over_seeds():
    df = rows({(1, 0): 0.80, (1, 1): 0.82, (1, 2): 0.81,   # best
               (2, 0): 0.81, (2, 1): 0.79, (2, 2): 0.82,   # indistinguishable from it
               (3, 0): 0.60, (3, 1): 0.61, (3, 2): 0.62})  # significantly worse
    table = paper_table(df, "method.k", None, "test/acc")
    assert table.loc["1", "test/acc"].endswith(" *") and "(n=3, CI " in table.loc["1", "test/acc"]
    assert table.loc["2", "test/acc"].endswith(" ≈")
    assert not table.loc["3", "test/acc"].endswith(("*", "≈", "?"))
    stats = table.attrs["stats"].set_index("row")
    assert stats.loc["3", "significantly_worse_than_best"] and not stats.loc["2", "significantly_worse_than_best"]
    assert stats.loc["3", "test"] == "paired t over seeds" and stats.loc["1", "mark"] == "*"


def test_table_uses_a_bootstrap_over_test_images_with_one_seed():
    rng = np.random.default_rng(1)
    best = rng.random(400) < 0.85
    tie = best.copy()
    tie[:3] = ~tie[:3]
    worse = best & (rng.random(400) < 0.7)
    df = rows({(1, 0): best.mean(), (2, 0): tie.mean(), (3, 0): worse.mean()}, {1: best, 2: tie, 3: worse})
    stats = paper_table(df, "method.k", None, "test/acc").attrs["stats"].set_index("row")
    assert list(stats["mark"]) == ["*", "≈", ""]
    assert stats.loc["3", "test"] == "bootstrap over test images" and stats.loc["3", "p_vs_best"] < 0.01
