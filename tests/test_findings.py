"""A study's `findings:` (harness.report.findings): the paper's claims evaluated on constructed results whose answers
are known: direction, significance with the spread between seeds, groups of cells, "no advantage", one seed, Holm."""

import numpy as np
import pandas as pd
import pytest

from harness.report.findings import AGREES, CONTRADICTS, NOT_RUN, NOT_SHOWN, evaluate, markdown
from harness.study.findings import Finding

AXES = ["method.stages", "method.jigsaw"]


def rows(values: dict) -> pd.DataFrame:
    """{(stages, jigsaw): [acc per seed]} -> results rows."""
    return pd.DataFrame([{"method.stages": s, "method.jigsaw": j, "seed": seed, "status": "finished", "test/acc": a}
                         for (s, j), accs in values.items() for seed, a in enumerate(accs)])


def finding(stages, relation="better", **extra) -> dict:
    return {"claim": f"jigsaw at S = {stages}", "better": {"method.stages": stages, "method.jigsaw": True},
            "worse": {"method.stages": stages, "method.jigsaw": False}, "relation": relation, **extra}


def test_verdicts_follow_the_effect_and_its_spread_between_seeds():
    results = rows({(1, True): [0.80, 0.82, 0.81], (1, False): [0.70, 0.71, 0.70],     # clearly better
                    (2, True): [0.60, 0.61, 0.60], (2, False): [0.70, 0.72, 0.71],     # clearly worse
                    (3, True): [0.70, 0.80, 0.60], (3, False): [0.72, 0.65, 0.74]})    # noise
    table = evaluate(results, [finding(1), finding(2), finding(3, paper={"better": 87.0, "worse": 85.5})], AXES)
    assert list(table["verdict"]) == [AGREES, CONTRADICTS, NOT_SHOWN]
    assert table.loc[0, "effect"] == pytest.approx(10.667, abs=1e-3) and table.loc[0, "seeds"] == 3
    assert table.loc[0, "ci_low"] > 0 and table.loc[1, "ci_high"] < 0
    assert table.loc[2, "paper_effect"] == pytest.approx(1.5)
    assert (table["p_adjusted"] >= table["p_raw"]).all()
    assert list(table["direction"]) == [True, False, False]  # S = 3: 70.0 vs 70.3
    text = markdown(table)
    assert "1 agrees, 1 contradicts, 1 not shown" in text and "+1.5" in text and "jigsaw at S = 3" in text


def test_one_seed_gives_a_direction_and_no_verdict():
    table = evaluate(rows({(1, True): [0.9], (1, False): [0.5]}), [finding(1)], AXES)
    assert table.loc[0, "verdict"] == NOT_SHOWN and table.loc[0, "direction"]
    assert "one training run" in table.loc[0, "test"] and pd.isna(table.loc[0, "p_adjusted"])
    assert "not shown (same direction)" in markdown(table)


def test_no_advantage_agrees_within_its_margin_and_an_advantage_contradicts_it():
    equal = rows({(4, True): [0.700, 0.712, 0.705, 0.709], (4, False): [0.702, 0.710, 0.707, 0.708]})
    ahead = rows({(4, True): [0.80, 0.82, 0.81, 0.80], (4, False): [0.70, 0.71, 0.72, 0.70]})
    assert evaluate(equal, [finding(4, "not_better")], AXES).loc[0, "verdict"] == AGREES
    assert evaluate(ahead, [finding(4, "not_better")], AXES).loc[0, "verdict"] == CONTRADICTS
    wide = evaluate(equal, [finding(4, "not_better", margin=0.01)], AXES)  # within 0.01 points: not shown
    assert wide.loc[0, "verdict"] == NOT_SHOWN


def test_a_group_is_the_mean_of_its_cells_on_each_seed():
    results = rows({(1, False): [0.5, 0.52], (3, True): [0.8, 0.83], (3, False): [0.6, 0.64]})
    f = {"claim": "S = 3 beats S = 1", "better": {"method.stages": 3, "method.jigsaw": [True, False]},
         "worse": {"method.stages": 1}}
    table = evaluate(results, [f], AXES)
    assert table.loc[0, "better_mean"] == pytest.approx(100 * np.mean([0.8, 0.83, 0.6, 0.64]))
    assert table.loc[0, "effect"] == pytest.approx(100 * (np.mean([0.8, 0.83, 0.6, 0.64]) - 0.51))


def test_a_side_that_did_not_run_is_said():
    table = evaluate(rows({(1, True): [0.8, 0.81]}), [finding(1), {**finding(1), "better": {"method.nothing": 1}}],
                     AXES)
    assert list(table["verdict"]) == [NOT_RUN, NOT_RUN]


def test_holm_over_the_findings_holds_the_error_with_equal_settings():
    rng = np.random.default_rng(0)
    wrong = 0
    for _ in range(200):
        values = {(s, j): list(0.7 + rng.normal(0, 0.02, 3)) for s in (1, 2, 3, 4) for j in (True, False)}
        table = evaluate(rows(values), [finding(s) for s in (1, 2, 3)] + [finding(4, "not_better", margin=0.001)],
                         AXES)
        wrong += (table["verdict"].isin([AGREES, CONTRADICTS]) & (table["relation"] == "better")).any()
    assert wrong / 200 <= 0.05 + 0.03


def test_findings_are_validated_strictly():
    with pytest.raises(ValueError):
        Finding.model_validate({"claim": "x", "better": {"a": 1}, "worse": {"a": 2}, "relation": "worse"})
    with pytest.raises(ValueError):
        Finding.model_validate({"claim": "x", "better": {}, "worse": {"a": 2}})
    with pytest.raises(ValueError):
        Finding.model_validate({"claim": "x", "better": {"a": 1}, "worse": {"a": 2}, "typo": 1})


def test_the_report_shows_the_findings_in_table_md_the_page_and_findings_csv(tmp_path):
    """A stored run (no training) of the tiny study with findings: the report's section says what the run shows."""
    import yaml

    from harness.report.build import build_reports
    from harness.results.store import ResultStore
    from harness.study.load import load_study
    from tests.conftest import TINY_STUDY

    study = yaml.safe_load(TINY_STUDY)
    study["seeds"] = [0, 1, 2]
    study["findings"] = [finding(1, source="PMG 4.3", paper={"effect": 1.2}),
                         {"claim": "<b>deeper is better</b>", "better": {"method.stages": 2},
                          "worse": {"method.stages": 1}}]
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(study))
    resolved = load_study(path)
    run_dir = tmp_path / "runs" / "tiny" / "default"
    store = ResultStore(run_dir)
    for spec in resolved.trials:
        m = spec.config["method"]
        noise = 0.002 * ((7 * spec.config["seed"] * (1 + m.get("jigsaw", True)) + 3 * m["stages"]) % 5)  # cell x seed
        acc = 0.5 + 0.1 * (m["stages"] == 1 and m.get("jigsaw", True)) + noise
        store.write_record(spec, "finished", {"test/acc": acc, "train/loss": 1.0, "wall_time_s": 1.0})
    store.write_tables(resolved.trials)
    (run_dir / "study.yaml").write_text(yaml.safe_dump(resolved.study.model_dump(mode="json", exclude={"profiles"})))
    out = build_reports(run_dir, tmp_path / "reports")
    md = (out / "table.md").read_text()
    assert "## The paper's findings" in md and "| jigsaw at S = 1 | PMG 4.3 | +1.2 | +" in md
    assert "agrees" in md and "\\<b\\>deeper is better\\</b\\>" in md  # no raw HTML from a study file
    page = (out / "index.html").read_text()
    assert 'id="findings"' in page and "<b>deeper" not in page and "&lt;b&gt;deeper is better&lt;/b&gt;" in page
    csv = pd.read_csv(out / "findings.csv")
    assert list(csv["verdict"]) == [AGREES, CONTRADICTS]  # stages 2 trails stages 1 (its jigsaw cell is 10 lower)


def test_a_finding_that_names_what_the_grid_lacks_is_a_study_error(tmp_path):
    from harness.study.errors import StudyError
    from harness.study.load import load_study

    base = "name: s\nmethod: {name: pmg}\ngrid: {method.stages: [1, 2], method.jigsaw: [true, false]}\n"
    cases = {"{method.stages: 3}": "never takes 3", "{method.depth: 1}": "'method.depth' is not a grid axis"}
    for side, message in cases.items():
        path = tmp_path / "s.yaml"
        path.write_text(base + f"findings:\n  - {{claim: x, better: {side}, worse: {{method.stages: 1}}}}\n")
        with pytest.raises(StudyError, match=message):
            load_study(path)
    path.write_text(base + "findings:\n  - {claim: x, grid: nope, better: {method.stages: 2}, "
                           "worse: {method.stages: 1}}\n")
    with pytest.raises(StudyError, match="no grid 'nope'"):
        load_study(path)


@pytest.mark.parametrize("study", ["pmg", "wsdan", "mksmt", "aam", "racnn", "gain"])
def test_every_paper_study_declares_its_papers_findings(study):
    from pathlib import Path

    from harness.study.load import load_study

    root = Path(__file__).resolve().parents[1]
    resolved = load_study(root / "studies" / f"{study}_ablation.yaml")
    assert len(resolved.study.findings) >= 3
    assert all(f.source for f in resolved.study.findings)
