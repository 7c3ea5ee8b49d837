"""Statistics in the tables: spread and intervals over seeds, and significance marks on constructed results
whose answers are known: direction, the best chosen on shared seeds, the column's error held, exact McNemar
against scipy, the test-set hash, and the power note's minimum detectable effect checked by simulation."""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binom, binomtest

from harness.report.stats import (ALPHA, LONE, MCNEMAR, NO_SPREAD, ONE_RUN, T_POOLED, compare_column, first_level,
                                  holm_after_selection, mcnemar_exact, mcnemar_mde, mcnemar_power, summarize,
                                  t_test_mde)
from harness.core.records import pack_correct, split_hash, unpack_correct
from harness.report.tables import paper_table


def test_summary_interval_is_students_t():
    s = summarize([0.80, 0.82, 0.84])
    assert s.n == 3 and s.mean == pytest.approx(0.82) and s.std == pytest.approx(0.02)
    half = 4.302653 * 0.02 / np.sqrt(3)  # t(0.975, 2) x std / sqrt(n)
    assert s.ci95 == pytest.approx((0.82 - half, 0.82 + half), rel=1e-5)
    assert summarize([0.5, 0.6]).ci95 is None and summarize([0.5]).std == 0.0


def test_exact_mcnemar_is_scipys_one_sided_binomial_test():
    rng = np.random.default_rng(0)
    a = rng.random(300) < 0.8
    b = np.where(rng.random(300) < 0.3, ~a, a)
    n_ab, n_ba = int((a & ~b).sum()), int((~a & b).sum())
    assert mcnemar_exact(a, b) == pytest.approx(binomtest(n_ab, n_ab + n_ba, 0.5, alternative="greater").pvalue)
    assert mcnemar_exact(b, a) == pytest.approx(binomtest(n_ba, n_ab + n_ba, 0.5, alternative="greater").pvalue)
    assert mcnemar_exact(a, a) == 1.0  # nothing discordant
    with pytest.raises(ValueError, match="same test images"):
        mcnemar_exact(a, a[:-1])
    assert np.array_equal(unpack_correct(pack_correct(a)), a)


def test_holm_after_selection_is_the_two_sided_p_with_two_cells_and_monotone():
    assert holm_after_selection({"b": 0.01}, k=2) == {"b": pytest.approx(0.02)}
    adj = holm_after_selection({"b": 0.001, "c": 0.004, "d": 0.2}, k=4)
    # (k - 1) x p, then Holm over 4 hypotheses (the best's own included): x4, x3, x2, running maximum
    assert adj == {"b": pytest.approx(4 * 3 * 0.001), "c": pytest.approx(3 * 3 * 0.004), "d": 1.0}


def rows(values: dict, correct: dict | None = None, hashes: dict | None = None) -> pd.DataFrame:
    out = []
    for (m, seed), acc in values.items():
        row = {"method.k": m, "seed": seed, "status": "finished", "test/acc": acc}
        if correct:
            row["test/correct"] = pack_correct(correct[m])
            row["test/set_hash"] = (hashes or {}).get(m, "h0")
        out.append(row)
    return pd.DataFrame(out)


def test_the_best_is_chosen_on_the_shared_seeds_and_a_better_cell_is_never_marked_worse():
    # The case: cell 1 has 90/70/71 on seeds 0-2; cell 2 lost seed 0 and is better on seeds 1 and 2.
    df = rows({(1, 0): 0.90, (1, 1): 0.70, (1, 2): 0.71, (2, 1): 0.75, (2, 2): 0.765})
    stats = paper_table(df, "method.k", None, "test/acc").attrs["stats"].set_index("row")
    assert stats.loc["2", "mark"] == "*" and stats.loc["2", "mean_on_shared_seeds"] == pytest.approx(0.7575)
    assert stats.loc["1", "mean"] == pytest.approx(0.77)  # the cell still shows all its seeds
    assert stats.loc["1", "shared_seeds"] == "1,2" and not np.isnan(stats.loc["1", "p_raw"])
    # With one seed: one training run per cell says nothing about the settings, however far apart the two runs are
    rng = np.random.default_rng(3)
    good = rng.random(300) < 0.8
    weak = good & (rng.random(300) < 0.84)
    df = rows({(1, 0): weak.mean(), (2, 0): good.mean()}, {1: weak, 2: good})
    table = paper_table(df, "method.k", None, "test/acc")
    stats = table.attrs["stats"].set_index("row")
    assert list(stats["mark"]) == ["?", "*"] and stats.loc["1", "test"] == ONE_RUN
    assert not stats["significantly_worse_than_best"].any() and stats["p_raw"].isna().all()
    assert "one training run per cell" in table.attrs["power"] and "model_p_raw" not in stats
    # ... but the two trained models can be compared, under their own name and mark, where a table asks for it
    table = paper_table(df, "method.k", None, "test/acc", model_comparison=True)
    stats = table.attrs["stats"].set_index("row")
    assert stats.loc["1", "mark"] == "?" and stats.loc["1", "model_test"] == MCNEMAR
    assert 0 < stats.loc["1", "model_p_raw"] < stats.loc["1", "model_p_adjusted"] < ALPHA
    assert stats.loc["1", "model_less_accurate_than_best"] and not stats.loc["1", "significantly_worse_than_best"]
    assert table.loc["1", "test/acc"].endswith("? †") and table.loc["2", "test/acc"].endswith(" *")


def test_marks_follow_direction_over_seeds():
    df = rows({(1, 0): 0.80, (1, 1): 0.82, (1, 2): 0.81,   # best
               (2, 0): 0.81, (2, 1): 0.79, (2, 2): 0.82,   # indistinguishable from it
               (3, 0): 0.60, (3, 1): 0.61, (3, 2): 0.62})  # significantly worse
    table = paper_table(df, "method.k", None, "test/acc")
    assert table.loc["1", "test/acc"].endswith(" *") and "(n=3, CI " in table.loc["1", "test/acc"]
    assert table.loc["2", "test/acc"].endswith(" ≈")
    assert not table.loc["3", "test/acc"].endswith(("*", "≈", "?"))
    stats = table.attrs["stats"].set_index("row")
    assert stats.loc["3", "significantly_worse_than_best"] and not stats.loc["2", "significantly_worse_than_best"]
    assert stats.loc["3", "test"] == T_POOLED and stats.loc["3", "correction"].startswith("Holm")
    assert (stats["p_adjusted"].dropna() >= stats["p_raw"].dropna()).all()


def _false_worse_rate(k: int, n: int, reps: int, rng) -> float:
    hits = 0
    for _ in range(reps):
        y = 0.7 + rng.normal(0, 0.02, n) + rng.normal(0, 0.02, (k, n))  # seed effect + noise: every cell equal
        column = compare_column({i: dict(enumerate(y[i])) for i in range(k)})
        hits += any(c.mark == "" for c in column.cells.values())
    return hits / reps


@pytest.mark.parametrize("k,n", [(5, 3), (8, 3), (8, 5)])
def test_a_column_of_equal_cells_shows_a_false_worse_at_most_alpha_of_the_time(k, n):
    """Holm over the k - 1 tests alone lets this reach 13-18% (the best is the luckiest cell); with the choice of
    the best accounted for it stays under 5% (2-3% in 2,000 columns)."""
    rate = _false_worse_rate(k, n, 600, np.random.default_rng(k * 10 + n))
    assert rate <= ALPHA + 0.02  # 600 columns: 0.05 + 2.2 binomial se


def test_one_seed_marks_nothing_worse_and_the_model_comparison_holds_alpha_for_equal_models():
    rng = np.random.default_rng(7)
    worse = model_worse = 0
    for _ in range(300):
        correct = {i: rng.random(300) < 0.7 for i in range(6)}  # six independent models of equal accuracy
        outcomes = {i: {0: (c, "h")} for i, c in correct.items()}
        column = compare_column({i: {0: c.mean()} for i, c in correct.items()}, outcomes)
        worse += any(c.mark == "" or c.worse for c in column.cells.values())
        assert sorted(c.mark for c in column.cells.values()) == ["*"] + ["?"] * 5
        column = compare_column({i: {0: c.mean()} for i, c in correct.items()}, outcomes, models=True)
        model_worse += any(c.model_worse for c in column.cells.values())
    assert worse == 0 and model_worse / 300 <= ALPHA + 0.03


def _seed_effect_column(rng, k: int, n: int, images: int = 400, acc: float = 0.35, ratio: float = 2.0,
                        shift: dict | None = None) -> dict:
    """A column of k cells over n seeds whose spread between training runs is `ratio` x the image-level (binomial)
    spread of an accuracy on `images` test images, with a seed effect shared by the cells (the same data order),
    rounded to whole test images as real accuracies are."""
    image_sd = np.sqrt(acc * (1 - acc) / images)
    y = acc + rng.normal(0, image_sd, n) + rng.normal(0, ratio * image_sd, (k, n))
    for cell, delta in (shift or {}).items():
        y[cell] += delta
    y = np.round(np.clip(y, 0, 1) * images) / images
    return {i: dict(enumerate(y[i])) for i in range(k)}


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("k", [2, 5, 8])
def test_equal_settings_with_training_run_variance_carry_a_false_worse_at_most_alpha_of_the_time(k, n):
    """The issue's simulation: seed spread 2x the image-level one. McNemar on one seed marked 34-75% of such columns;
    the t-test over seeds holds alpha, and one seed marks nothing."""
    rng = np.random.default_rng(100 * k + n)
    hits = sum(any(c.worse for c in compare_column(_seed_effect_column(rng, k, n)).cells.values())
               for _ in range(400))
    assert hits / 400 <= ALPHA + 0.025  # 400 columns: 0.05 + 2.3 binomial se
    if n == 1:
        assert hits == 0


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("k", [2, 5])
def test_a_better_cell_is_marked_worse_at_most_half_alpha_and_never_from_one_seed(k, n):
    """A one-sided test at level alpha marks a truly better cell worse at most alpha / 2 of the time (as often as its
    luck can reverse the sign); McNemar on one seed did it 0.8-3.4% of the time. Measured (2,000 columns, the better
    cell 2 points up, about 0.4 of the spread between runs): 1.5% with 2 cells and 2 seeds, 0.05-0.4% otherwise; 5
    points up: 0-0.25%."""
    rng = np.random.default_rng(10 * k + n)
    hits = sum(compare_column(_seed_effect_column(rng, k, n, shift={k - 1: 0.02})).cells[k - 1].worse
               for _ in range(400))
    assert hits / 400 <= ALPHA / 2 + 0.02
    if n == 1:
        assert hits == 0


def test_a_lone_cell_has_nothing_to_compare():
    column = compare_column({"a": {0: 0.8, 1: 0.82}, "b": {}})
    assert column.cells == {"a": column.cells["a"]} and column.cells["a"].mark == "-"
    assert column.cells["a"].test == LONE
    table = paper_table(rows({(1, 0): 0.8}), "method.k", None, "test/acc")
    assert table.loc["1", "test/acc"] == "80.0 -"


def test_one_worse_cell_among_equal_ones_is_found_and_the_equal_ones_are_not():
    rng = np.random.default_rng(11)
    values = {}
    for m in range(1, 7):
        for s in range(3):
            values[(m, s)] = 0.8 + 0.01 * s + rng.normal(0, 0.005) - (0.1 if m == 6 else 0)
    stats = paper_table(rows(values), "method.k", None, "test/acc").attrs["stats"].set_index("row")
    assert stats.loc["6", "mark"] == "" and stats.loc["6", "significantly_worse_than_best"]
    assert sorted(stats["mark"].drop("6")) == ["*"] + ["≈"] * 4


def test_the_model_comparison_needs_the_same_test_set_by_its_hash():
    rng = np.random.default_rng(1)
    best = rng.random(400) < 0.85
    worse = best & (rng.random(400) < 0.7)
    df = rows({(1, 0): best.mean(), (2, 0): worse.mean()}, {1: best, 2: worse})
    stats = paper_table(df, "method.k", None, "test/acc", model_comparison=True).attrs["stats"]
    assert list(stats["model_less_accurate_than_best"]) == [False, True]
    other = rows({(1, 0): best.mean(), (2, 0): worse.mean()}, {1: best, 2: worse}, hashes={1: "h0", 2: "h1"})
    stats = paper_table(other, "method.k", None, "test/acc", model_comparison=True).attrs["stats"].set_index("row")
    assert np.isnan(stats.loc["2", "model_p_raw"]) and not stats.loc["2", "model_less_accurate_than_best"]
    unhashed = df.drop(columns="test/set_hash")
    stats = paper_table(unhashed, "method.k", None, "test/acc", model_comparison=True).attrs["stats"].set_index("row")
    assert np.isnan(stats.loc["2", "model_p_raw"])


def test_identical_differences_on_two_seeds_are_not_tested():
    df = rows({(1, 0): 0.80, (1, 1): 0.82, (2, 0): 0.78, (2, 1): 0.80})  # 2 points behind on both seeds, no spread
    stats = paper_table(df, "method.k", None, "test/acc").attrs["stats"].set_index("row")
    assert stats.loc["2", "mark"] == "?" and np.isnan(stats.loc["2", "p_raw"]) and stats.loc["2", "test"] == NO_SPREAD
    df = rows({(1, 0): 0.80, (1, 1): 0.82, (2, 0): 0.80, (2, 1): 0.82})
    stats = paper_table(df, "method.k", None, "test/acc").attrs["stats"].set_index("row")
    assert stats.loc["2", "mark"] == "≈" and stats.loc["2", "p_raw"] == 1.0


def test_the_exact_mcnemar_power_is_what_the_test_achieves():
    """The issue's case: on 600 images with 2% discordant, the exact test at Holm's first level of a 5-cell column needs
    9 discordant images all the best's; the normal approximation claimed 0.6 points at 80%."""
    rng = np.random.default_rng(5)
    for images, psi, k in [(400, 0.2, 2), (600, 0.02, 5), (300, 0.3, 8)]:
        level = first_level(k)
        delta = mcnemar_mde(psi, images, level)
        if delta is None:
            assert mcnemar_power(psi, psi, images, level) < 0.8
            continue
        discordant = rng.binomial(images, psi, 20000)
        b = rng.binomial(discordant, (psi + delta) / (2 * psi))  # the best's share of the discordant images
        power = np.mean(binom.sf(b - 1, discordant, 0.5) < level)
        assert power == pytest.approx(0.8, abs=0.015), (images, psi, k)
        assert mcnemar_power(delta, psi, images, level) == pytest.approx(0.8, abs=1e-3)
    assert mcnemar_mde(0.02, 600, first_level(5)) > 0.015  # nothing under 1.5 points is found 80% of the time


def test_the_t_test_power_note_is_what_the_test_achieves():
    # a 5-cell column with sd 1 point and 3 seeds; (k-1)(n-1) = 8 df, alpha / (5 x 4) at Holm's first step
    from scipy.stats import nct, t

    rng = np.random.default_rng(5)
    expected = t_test_mde(0.01 * np.sqrt(2 / 3), 8, ALPHA / 20)
    assert nct.sf(t.ppf(1 - ALPHA / 20, 8), 8, expected / (0.01 * np.sqrt(2 / 3))) == pytest.approx(0.8)
    found, estimates, runs = 0, [], 600
    for _ in range(runs):
        y = rng.normal(0, 0.01, (5, 3))
        y[4] -= expected
        column = compare_column({i: dict(enumerate(y[i])) for i in range(5)})
        estimates.append(column.mde)
        found += column.cells[4].mark == ""
    assert np.median(estimates) == pytest.approx(expected, rel=0.25)
    assert 0.72 <= found / runs <= 0.92  # 80%, a little more: the best is the luckiest of the other four


def test_power_note_in_the_table():
    rng = np.random.default_rng(1)
    best = rng.random(300) < 0.85
    worse = best & (rng.random(300) < 0.8)
    table = paper_table(rows({(1, 0): best.mean(), (2, 0): worse.mean()}, {1: best, 2: worse}), "method.k", None,
                        "test/acc")
    note = table.attrs["power"]
    assert note.startswith("Power: 2 cells per column, 1 seed: one training run per cell") and "seeds=" in note
    note = paper_table(rows({(1, 0): best.mean(), (2, 0): worse.mean()}, {1: best, 2: worse}), "method.k", None,
                       "test/acc", model_comparison=True).attrs["power"]
    assert "on 300 test images" in note and "between two trained models" in note
    df = rows({(m, s): 0.8 - 0.02 * m + 0.01 * ((m * 7 + s * 3) % 5) for m in (1, 2, 3) for s in range(3)})
    note = paper_table(df, "method.k", None, "test/acc").attrs["power"]
    assert note.startswith("Power: 3 cells per column, 3 shared seeds") and "points" in note
    assert "not shown different" in note
    assert paper_table(df, "method.k", None, "test/acc").attrs["stats"]["min_detectable_effect"].notna().all()


def test_test_set_hash_names_the_images_and_their_order():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (10, 3, 8, 8), dtype=np.uint8)
    labels = np.arange(10) % 3
    h = split_hash(labels, images)
    assert h == split_hash(labels.copy(), images.copy())
    assert h != split_hash(labels[::-1], images[::-1]) and h != split_hash((labels + 1) % 3, images)
    changed = images.copy()
    changed[4, 0, 0, 0] ^= 1
    assert h != split_hash(labels, changed)
