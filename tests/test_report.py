"""Paper-layout tables from stored results: mean ± std over seeds, failed and missing cells marked."""

import pandas as pd

from harness.report.tables import head_table, paper_table


def results():
    rows = []
    for stages in (1, 2):
        for jigsaw in (True, False):
            for seed, acc in ((0, 0.50), (1, 0.60)):
                rows.append({"method.stages": stages, "method.jigsaw": jigsaw, "seed": seed, "status": "finished",
                             "test/acc": acc + 0.1 * stages, "test/acc/concat": acc})
    df = pd.DataFrame(rows)
    df.loc[(df["method.stages"] == 2) & (df["method.jigsaw"]) & (df["seed"] == 1), "status"] = "failed"
    df.loc[(df["method.stages"] == 2) & (~df["method.jigsaw"]), "status"] = "failed"
    return df


def test_paper_layout_mean_std_and_failures():
    table = paper_table(results(), "method.stages", "method.jigsaw", "test/acc")
    assert list(table.index) == ["1", "2"] and list(table.columns) == ["jigsaw=False", "jigsaw=True"]
    assert table.loc["1", "jigsaw=True"].startswith("65.0 ± 7.1 (n=2)")  # mean of 60, 70; sample std 7.07
    assert table.loc["2", "jigsaw=True"].startswith("70.0 (1 failed)")
    assert table.loc["2", "jigsaw=False"] == "failed"


def test_missing_cells_and_single_axis():
    df = results()
    df = df[~((df["method.stages"] == 1) & (df["method.jigsaw"]))]
    table = paper_table(df, "method.stages", "method.jigsaw", "test/acc")
    assert table.loc["1", "jigsaw=True"] == "-"
    single = paper_table(df[df["seed"] == 0], "method.stages", None, "test/acc")
    assert single.loc["1", "test/acc"] == "60.0 ?"  # one seed and no per-image results: no test applies


def test_head_table_averages_finished_trials():
    heads = head_table(results(), ["method.stages", "method.jigsaw"])
    assert heads.loc[(1, True), "concat"] == 55.0
    assert heads.loc[(2, True), "concat"] == 50.0  # the failed seed is left out



def test_head_columns_follow_the_trial_with_the_most_heads():
    rows = [{"method.stages": 1, "status": "finished", "heads": "combined,concat,stage5",
             "test/acc/combined": 0.5, "test/acc/concat": 0.4, "test/acc/stage5": 0.3},
            {"method.stages": 3, "status": "finished", "heads": "combined,concat,stage3,stage4,stage5",
             "test/acc/combined": 0.6, "test/acc/concat": 0.5, "test/acc/stage3": 0.2, "test/acc/stage4": 0.3,
             "test/acc/stage5": 0.4}]
    heads = head_table(pd.DataFrame(rows), ["method.stages"])
    assert list(heads.columns) == ["combined", "concat", "stage3", "stage4", "stage5"]

def test_several_column_axes():
    rows = [{"method.attention_maps": m, "method.crop": c, "method.drop": d, "seed": 0, "status": "finished",
             "test/acc": 0.1 * m + 0.01 * c + 0.02 * d} for m in (1, 4) for c in (False, True) for d in (False, True)]
    table = paper_table(pd.DataFrame(rows), "method.attention_maps", ["method.crop", "method.drop"], "test/acc")
    assert list(table.columns) == ["crop=False, drop=False", "crop=False, drop=True", "crop=True, drop=False",
                                   "crop=True, drop=True"]
    assert table.loc["4", "crop=True, drop=True"] == "43.0 *"  # the best cell


def test_numeric_rows_sort_as_numbers():
    df = pd.DataFrame({"method.attention_maps": pd.array([1, 16, 32, 4], dtype="int64"), "seed": 0,
                       "status": "finished", "test/acc": 0.5})
    assert list(paper_table(df, "method.attention_maps", None, "test/acc").index) == ["1", "4", "16", "32"]


def test_metric_columns_and_references(tmp_path):
    from harness.report.tables import add_references
    df = pd.DataFrame([{"method.distillation": d, "seed": 0, "status": "finished", "test/acc/S3": 0.5 + i / 10,
                        "test/acc/S4": 0.6 + i / 10} for i, d in enumerate(["decision", "none"])])
    table = paper_table(df, "method.distillation", None, ["test/acc/S3", "test/acc/S4"])
    assert list(table.columns) == ["test/acc/S3", "test/acc/S4"]
    assert table.loc["none", "test/acc/S4"] == "70.0 *"
    refs = tmp_path / "references"
    refs.mkdir()
    (refs / "p.csv").write_text("paper,table,dataset,backbone,method,setting,metric,value,source\n"
                                "P,t,cub200,x,m,kd=none head=S4,top1,92.1,text\n")
    spec = {"file": "p.csv", "cells": [{"row": "none", "column": "test/acc/S4", "setting": "kd=none head=S4"}]}
    with_ref = add_references(table, spec, str(tmp_path / "study.yaml"))
    assert with_ref.loc["none", "test/acc/S4"] == "70.0 * (paper 92.1, -22.1)"
    assert with_ref.loc["decision", "test/acc/S4"] == "60.0 ?"


def test_compare_puts_two_runs_side_by_side(tiny_run, tmp_path):
    """`python -m harness.report --compare A B`: each table of A with the same table of B beside it, every
    column named by its run (profile and harness commit)."""
    import shutil
    import subprocess
    import sys

    import yaml

    from tests.conftest import ROOT

    a = tiny_run[0] / "runs" / "tiny" / "fast"
    b = tmp_path / "other"
    shutil.copytree(a, b, ignore=shutil.ignore_patterns("ray", "tensorboard", "mlruns", "wandb"))
    study = yaml.safe_load((b / "study.yaml").read_text())
    (b / "study.yaml").write_text(yaml.safe_dump({**study, "profile": "other"}))
    changed = pd.read_parquet(b / "results.parquet")
    changed["test/acc"] = [0.75, 0.5]
    changed["git_commit"] = "feedbee"
    changed.to_parquet(b / "results.parquet")
    out = subprocess.run([sys.executable, "-m", "harness.report", "--compare", str(a), str(b), "--out",
                          str(tmp_path / "cmp")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert md == out.stdout.split("written:")[0].rstrip("\n") + "\n"
    header = next(line for line in md.splitlines() if line.startswith("|   stages"))
    # '<run> | <column>' headers: the `|` is escaped, so the Markdown table keeps its columns
    assert "| fast (" in header and r"| other (feedbee) \| jigsaw=True" in header
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in md.splitlines() if line.startswith("|") and line.split("|")[1].strip() in ("1", "2")}
    original = pd.read_parquet(a / "results.parquet").set_index("method.stages")["test/acc"]
    for stages, new in zip(changed["method.stages"], changed["test/acc"]):
        assert rows[str(stages)][0].split()[0] == f"{100 * original[stages]:.1f}"
        assert rows[str(stages)][1].split()[0] == f"{100 * new:.1f}"
    assert "<table" in (tmp_path / "cmp" / "compare.html").read_text()
