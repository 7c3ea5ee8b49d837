"""Paper-layout tables from stored results: mean ± std over seeds, failed and missing cells marked."""

import pandas as pd

from harness.tables import head_table, paper_table


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
    from harness.tables import add_references
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
