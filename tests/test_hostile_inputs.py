"""Hostile and careless input (issue 19): every case exits 2 with its message and no traceback, prints no control
character, and writes nothing outside the run and report roots. Then the outputs: no element injected into a page,
escaped LaTeX and Markdown, no result dropped, verified caches, fsync, the run lock on the storage, and Ray's
surface (loopback, authentication, connect timeout, credentials).

The table-driven cases call harness.run.main in this process (no Ray starts: each is refused before it would);
a case that raised would fail here with its traceback, so "returns 2" is also "no traceback".
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from harness.run import main
from tests.conftest import TINY_STUDY

ROOT = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load(TINY_STUDY)


def study_text(**changes) -> str:
    """The tiny study with top-level keys replaced (a value of None drops the key)."""
    data = {**TINY, **changes}
    return yaml.safe_dump({k: v for k, v in data.items() if v is not None}, sort_keys=False)


def with_train(**train) -> str:
    return study_text(train={**TINY["train"], **train})


def alias_bomb(levels: int = 9) -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [{', '.join(['*' + prev] * 9)}]")
    return "name: bomb\nmethod: {name: pmg}\n" + "\n".join(lines) + "\n"


# (case, study file text (str or bytes), extra arguments, what the message must say)
CASES = [
    ("profile climbing out of the runs folder", TINY_STUDY + "  ../../../X:\n    train: {epochs: 1}\n",
     ["--profile", "../../../X"], r"--profile: '\.\./\.\./\.\./X' is not a safe name"),
    ("the same profile in the file, not selected", TINY_STUDY + "  ../../../X:\n    train: {epochs: 1}\n", [],
     r"s\.yaml:\d+: profile name '\.\./\.\./\.\./X' is not a safe name"),
    ("absolute profile name, dry run", TINY_STUDY + "  /tmp/abs:\n    train: {epochs: 1}\n",
     ["--profile", "/tmp/abs", "--dry-run"], r"'/tmp/abs' is not a safe name"),
    ("unsafe profile not even selected", TINY_STUDY + "  ..:\n    train: {epochs: 1}\n", [],
     r"profile name '\.\.' is not a safe name"),
    ("--profile with a separator", TINY_STUDY, ["--profile", "a/b"], r"--profile: 'a/b' is not a safe name"),
    ("study named ..", study_text(name=".."), [], r"s\.yaml:\d+: study name '\.\.' is not a safe name"),
    ("study named .", study_text(name="."), [], r"study name '\.' is not a safe name"),
    ("study name with a separator", study_text(name="a/b"), [], r"study name 'a/b' is not a safe name"),
    ("study name with escape codes", study_text(name="\x1b[31mred"), [], r"study name .* is not a safe name"),
    ("study name of 101 characters", study_text(name="n" * 101), [], r"is not a safe name"),
    ("study name set to .. by --set", TINY_STUDY, ["--set", "name=.."], r"study name '\.\.' is not a safe name"),
    ("table named ../../T", study_text(table=None, tables={"../../T": {"rows": "method.stages"}}), [],
     r"s\.yaml:\d+: table name '\.\./\.\./T' is not a safe name"),
    ("table with an absolute name", study_text(table=None, tables={"/tmp/T": {"rows": "method.stages"}}), [],
     r"table name '/tmp/T' is not a safe name"),
    ("metric naming a path", study_text(table={"rows": "method.stages", "metric": "a\x00b"}), [],
     r"table\.metric"),
    ("YAML alias bomb", alias_bomb(), [], r"more than 200,000 values once its aliases"),
    ("5,000 levels of nesting", "name: deep\nmethod: {name: pmg}\nprotocol: " + "[" * 5000 + "]" * 5000 + "\n", [],
     r"nested more than 64 levels deep"),
    ("not UTF-8", b"name: s\nmethod: {name: pmg}\ndescription: caf\xe9\n", [], r"s\.yaml:3: not UTF-8 \(byte 0xe9"),
    ("a study file over 1 MiB", "name: s\nmethod: {name: pmg}\n# " + "x" * (1 << 20) + "\n", [],
     r"a study file is at most 1,048,576 bytes"),
    ("an alias to itself", "name: s\nmethod: {name: pmg}\nprotocol: &p {x: *p}\n", [],
     r"s\.yaml:3: an alias refers to the mapping or list it is in"),
    ("an integer of 5,000 digits", "name: s\nmethod: {name: pmg}\nseeds: [" + "9" * 5000 + "]\n", [],
     r"a value cannot be read"),
    ("a 5,000-digit --set value", TINY_STUDY, ["--set", "train.epochs=" + "9" * 5000], r"--set"),
    ("an error of the whole method section", study_text(method={**TINY["method"], "jigsaw_n": [0, -1]}), [],
     r"s\.yaml:\d+: method: jigsaw_n values must be >= 1"),
    ("an empty metric list", study_text(table={"rows": "method.stages", "metric": []}), [], r"table\.metric"),
    ("a crop larger than the stored image", with_train(image_size=64, resize=32), [],
     r"image_size 64 is larger than resize 32"),
    ("a Python object in YAML", "name: s\nmethod: !!python/object/apply:os.system [echo hi]\n", [],
     r"not valid YAML"),
    ("10^6 trials, dry run", study_text(grid={f"method.{k}": [0.1 * i for i in range(1, 11)]
                                              for k in ("alpha", "beta")} |
                                        {"train.lr": [0.01 * i for i in range(1, 11)],
                                         "train.momentum": [0.05 * i for i in range(10)],
                                         "train.weight_decay": [1e-4 * i for i in range(10)],
                                         "train.epochs": list(range(1, 11))}, table=None),
     ["--dry-run"], r"the grid expands to 1,000,000 trials .* more than the limit of 10,000"),
    ("lr inf", with_train(lr=float("inf")), [], r"train\.lr"),
    ("weight_decay inf", with_train(weight_decay=float("inf")), [], r"train\.weight_decay"),
    ("end_lr inf", with_train(end_lr=float("inf")), [], r"train\.end_lr"),
    ("grad_clip inf", with_train(grad_clip=float("inf")), [], r"train\.grad_clip"),
    ("timeout_s inf", with_train(timeout_s=float("inf")), [], r"train\.timeout_s"),
    ("resources.cpu inf", study_text(resources={"cpu": float("inf")}), [], r"resources\.cpu"),
    ("NaN colour jitter", with_train(colour_jitter=[float("nan"), 0, 0, 0]), [], r"train\.colour_jitter"),
    ("random_scale [-1, inf]", with_train(random_scale=[-1, float("inf")]), [], r"train\.random_scale"),
    ("random_scale out of order", with_train(random_scale=[1.5, 0.5]), [], r"0 < low <= high"),
    ("image_size 100000", with_train(image_size=100000, resize=None), [], r"train\.image_size.*less than or equal"),
    ("epochs 10^20", with_train(epochs=10**20), [], r"train\.epochs"),
    ("epochs: true", with_train(epochs=True), [], r"train\.epochs: give a number, not true/false"),
    ("epochs: 2.5", with_train(epochs=2.5), [], r"train\.epochs: give a whole number"),
    ("a bool written as 1", study_text(method={**TINY["method"], "early_exit": 1}), [],
     r"method\.early_exit: give true or false"),
    ("a bool written as yes", study_text(method={**TINY["method"], "early_exit": "yes"}), [],
     r"method\.early_exit: give true or false"),
    ("negative seed", study_text(seeds=[-1]), [], r"seeds\.0: Input should be greater than or equal to 0"),
    ("NaN in a method parameter", study_text(method={**TINY["method"], "alpha": float("nan")}), [],
     r"method\.alpha"),
    ("NaN in a dataset parameter", study_text(dataset={**TINY["dataset"], "occlusion": float("nan")}), [],
     r"dataset\.occlusion"),
    ("inf in the backbone", study_text(backbone={"name": "resnet18", "drop_path_rate": float("inf")}), [],
     r"backbone\.drop_path_rate"),
    ("inf where no schema types it", study_text(backbone={"name": "resnet18", "kwargs": {"x": float("inf")}}), [],
     r"backbone\.kwargs\.x: infinity and NaN are not allowed"),
    ("inf by --set", TINY_STUDY, ["--set", "train.lr=.inf"], r"train\.lr"),
    ("an unbuildable backbone", study_text(backbone={"name": "resnet18", "kwargs": {"foo": 1}}), [],
     r"backbone 'resnet18': timm cannot build it"),
    ("a missing reference file", study_text(table={"rows": "method.stages", "reference":
                                                   {"file": "nope.csv", "cells": []}}), [],
     r"reference file .*nope\.csv: cannot read it"),
    ("a dotted key 100 parts deep", TINY_STUDY, ["--set", "a" + ".a" * 100 + "=1"], r"at most 16 parts"),
    ("an alias bomb in --set", TINY_STUDY, ["--set", "protocol=" + alias_bomb()], r"--set .*more than 200,000"),
    ("lr 'inf' as a string", TINY_STUDY, ["--set", "train.lr=inf"], r"train\.lr: Input should be a finite number"),
    ("a seed beyond 32 bits", study_text(seeds=[2**40]), [], r"seeds\.0: Input should be less than or equal"),
    ("a study that is a folder", None, ["--dry-run"], r"study file not found"),
    ("--max-retries -1", TINY_STUDY, ["--max-retries", "-1"], r"--max-retries: '-1': give a whole number >= 0"),
    ("--num-cpus 0", TINY_STUDY, ["--num-cpus", "0"], r"--num-cpus: '0': give a whole number >= 1"),
    ("--max-trials 0", TINY_STUDY, ["--max-trials", "0"], r"--max-trials"),
    ("--connect-timeout nan", TINY_STUDY, ["--connect-timeout", "nan"], r"--connect-timeout"),
    ("--num-cpus 10^12", TINY_STUDY, ["--num-cpus", str(10**12)], r"--num-cpus: .*<= 100000"),
    ("--address with a port out of range", TINY_STUDY, ["--address", "127.0.0.1:99999"],
     r"--address 127\.0\.0\.1:99999: expected HOST:PORT"),
    ("--address that is not one", TINY_STUDY, ["--address", "no such thing"], r"cannot run: --address no such thing"),
    ("--storage nobody can write", TINY_STUDY, ["--storage", "/proc/fgvc-storage"], r"cannot run: "),
    ("--storage of an unknown scheme", TINY_STUDY, ["--storage", "nosuch://bucket/x"], r"cannot run: "),
]


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def run_cli(tmp_path: Path, text: str | bytes | None, args: list[str], monkeypatch, capsys):
    """harness.run.main on a study file, from a working folder of its own, with the run and report roots deep
    inside tmp_path (so a path that climbs out of them still lands where the test sees it)."""
    work, roots = tmp_path / "work", tmp_path / "a" / "b" / "roots"
    work.mkdir()
    study = work / "s.yaml"
    if text is None:
        study.mkdir()
    elif isinstance(text, bytes):
        study.write_bytes(text)
    else:
        study.write_text(text)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # a run looks at ~/.ray/auth_token: never the real one
    before = files_under(tmp_path)
    try:
        rc = main([str(study), "--runs-dir", str(roots / "runs"), "--reports-dir", str(roots / "reports"), *args])
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    out, err = capsys.readouterr()
    written = files_under(tmp_path) - before
    outside = [p for p in written if roots not in p.parents]
    return rc, out + err, outside


@pytest.mark.parametrize("text,args,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_exits_2_with_its_message_and_writes_nothing_outside(tmp_path, monkeypatch, capsys, text,
                                                                           args, message):
    t0 = time.perf_counter()
    rc, output, outside = run_cli(tmp_path, text, args, monkeypatch, capsys)
    assert rc == 2, output[-3000:]
    assert re.search(message, output), output[-3000:]
    assert "Traceback" not in output
    assert "\x1b" not in output  # nothing in a message drives the terminal
    assert not outside, outside
    assert time.perf_counter() - t0 < 30  # refused at once (the 10^6 grid is counted, not expanded)


def test_the_runs_folder_being_a_file_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "a" / "b" / "roots").mkdir(parents=True)
    (tmp_path / "a" / "b" / "roots" / "runs").write_text("not a folder")
    rc, output, outside = run_cli(tmp_path, TINY_STUDY, [], monkeypatch, capsys)
    assert rc == 2 and "cannot run:" in output and "Traceback" not in output and not outside


def test_the_reports_folder_being_a_file_is_refused_before_training(tmp_path, monkeypatch, capsys):
    (tmp_path / "a" / "b" / "roots").mkdir(parents=True)
    (tmp_path / "a" / "b" / "roots" / "reports").write_text("not a folder")
    rc, output, outside = run_cli(tmp_path, TINY_STUDY, [], monkeypatch, capsys)
    assert rc == 2 and "cannot run:" in output and "Traceback" not in output and not outside


def test_a_large_dry_run_says_its_count_first(tmp_path, monkeypatch, capsys):
    grid = {"method.alpha": [0.1 * i for i in range(1, 11)], "train.lr": [0.01 * i for i in range(1, 21)]}
    rc, output, _ = run_cli(tmp_path, study_text(grid=grid, table=None), ["--dry-run"], monkeypatch, capsys)
    assert rc == 0
    assert output.splitlines()[0] == "200 trials in the grid (cells x seeds); validating each..."


def test_dry_run_prints_no_control_characters_and_keeps_markdown_columns(tmp_path, monkeypatch, capsys):
    text = study_text(protocol={"source": "x", "lr": "0.1 | \x1b]0;owned\x07\x1b[2J 0.01", "epochs": 2})
    rc, output, _ = run_cli(tmp_path, text, ["--dry-run"], monkeypatch, capsys)
    assert rc == 0
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f]", output)
    row = next(line for line in output.splitlines() if line.startswith("| lr |"))
    assert len(re.split(r"(?<!\\)\|", row)) == 7 and r"0.1 \| " in row  # five columns: the value's | is escaped


def test_the_safe_name_rule_and_the_path_guard():
    from harness.paths import UnsafePath, inside, name_problem

    for good in ("pmg_ablation", "paper", "v1.2-final", "a" * 100):
        assert name_problem(good) is None
    for bad in ("..", ".", "", "a/b", "/abs", "a\\b", "a b", "caf\u00e9", "x\x00", "a" * 101, None, 3):
        assert name_problem(bad), bad
    assert inside("runs", "s", "p") == Path("runs/s/p")
    for escape in (("..", "x"), ("s", "../../x"), ("/etc",)):
        with pytest.raises(UnsafePath):
            inside("runs", *escape)


def test_terminal_latex_markdown_and_uri_escaping():
    from harness.escape import latex, latex_label, markdown_cell, printable, redact_uri

    assert printable("a\x1b[2Jb\rc\x9bd\u202ee\tf\ng") == "a[2Jbcde\tf\ng"
    assert latex(r"pmg_ablation \write18{rm -rf ~} 5% & $x^2$ #1") == (
        r"pmg\_ablation \textbackslash{}write18\{rm -rf \textasciitilde{}\} 5\% \& \$x\textasciicircum{}2\$ \#1")
    assert latex_label("tab:a_b{}\\") == "tab:a_b---"
    assert markdown_cell("a|b\nc") == r"a\|b c" and markdown_cell(3) == 3
    redacted = redact_uri("s3://AKIAKEY:SeCrEt@bucket/fgvc?region=eu-west-1&secret_key=SeCrEt2&session_token=tok")
    assert "SeCrEt" not in redacted and "AKIAKEY" not in redacted and "=tok" not in redacted
    assert redacted.startswith("s3://***@bucket/fgvc?") and "region=eu-west-1" in redacted
    assert redact_uri("/mnt/nfs/fgvc") == "/mnt/nfs/fgvc"


def test_run_json_stores_the_storage_uri_without_credentials(tmp_path):
    from argparse import Namespace

    from harness.orchestrate import RunSummary
    from harness.run import write_run_metadata

    args = Namespace(address=None, storage="s3://KEY:SECRET@bucket/x?access_key=K2&secret_key=S2")
    write_run_metadata(tmp_path, args, RunSummary(), "now", 1.0)
    stored = (tmp_path / "run.json").read_text()
    assert "SECRET" not in stored and "S2" not in stored and "K2" not in stored and "bucket/x" in stored


# ----------------------------------------------------------------------------- pages, LaTeX and Markdown

class _Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def elements(html: str) -> list[tuple[str, dict]]:
    parser = _Elements()
    parser.feed(html)
    return parser.tags


INJECTED = '<script>alert(1)</script><img src=x onerror=alert(2)>'


def assert_nothing_injected(html: str, own_scripts: int) -> None:
    tags = elements(html)
    assert sum(tag == "script" for tag, _ in tags) == own_scripts
    assert not [a for _, attrs in tags for a in attrs if a.startswith("on")]
    assert all(attrs.get("src", "").startswith("data:image/png;base64,") for tag, attrs in tags if tag == "img")
    assert "alert(1)" not in html.replace("&lt;script&gt;alert(1)", "")  # present only as escaped text


def fake_run(run_dir: Path, study: Path, overrides: list[str], acc: float = 0.5) -> list:
    """A run folder as harness.run leaves it, without training: finished records of the study's trials."""
    from harness.results import ResultStore
    from harness.study import load_study

    resolved = load_study(study, overrides=overrides)
    store = ResultStore(run_dir)
    for spec in resolved.trials:
        store.write_record(spec, "finished", {"test/acc": acc, "train/loss": 1.0, "wall_time_s": 1.0})
    store.write_tables(resolved.trials)
    dump = resolved.study.model_dump(mode="json", exclude={"profiles"})
    (run_dir / "study.yaml").write_text(yaml.safe_dump(dump, sort_keys=False))
    return resolved.trials


def hostile_labels_study(tmp_path: Path) -> Path:
    study = tmp_path / "h.yaml"
    study.write_text(yaml.safe_dump({
        "name": "pmg_ablation", "description": INJECTED,
        "method": {"name": "baseline"}, "dataset": TINY["dataset"], "train": TINY["train"],
        "grid": {"method": [{"name": "baseline", "label": INJECTED}, {"name": "baseline", "label": "a|b",
                                                                      "backbone_lr_scale": 0.5},
                            {"name": "baseline", "label": r"\write18{rm -rf ~}", "backbone_lr_scale": 0.25}]},
        "table": {"rows": "method"},
        "protocol": {"source": INJECTED, "lr": "0.1 | 0.01", "epochs": {"value": 2, "note": INJECTED}}}))
    return study


def test_pages_latex_and_markdown_carry_no_injected_markup(tmp_path):
    from harness.report import build_reports, compare_runs

    study = hostile_labels_study(tmp_path)
    run_a, run_b = tmp_path / "runs" / "a", tmp_path / "runs" / INJECTED.replace("/", "|")
    fake_run(run_a, study, [])
    fake_run(run_b, study, [], acc=0.6)
    results = pd.read_parquet(run_b / "results.parquet")
    results["git_commit"] = INJECTED
    results.to_parquet(run_b / "results.parquet")

    out = build_reports(run_a, tmp_path / "reports")
    assert_nothing_injected((out / "index.html").read_text(), own_scripts=1)
    tex = (out / "table.tex").read_text()
    assert r"\caption{pmg\_ablation (default profile) (top-1 \%)}" in tex
    assert r"\write18" not in tex.replace(r"\textbackslash write18", "").replace(r"\textbackslash{}write18", "")
    md = (out / "table.md").read_text()
    assert r"a\|b" in md
    row = next(line for line in md.splitlines() if line.startswith(r"| a\|b"))
    assert len(re.split(r"(?<!\\)\|", row)) == 4  # index and one column: the label's | does not split it

    cmp = compare_runs([run_a, run_b], tmp_path / "cmp")
    assert_nothing_injected((cmp / "compare.html").read_text(), own_scripts=0)
    assert "&lt;script&gt;" in (cmp / "compare.html").read_text()


def test_a_corrupt_maps_file_costs_its_maps_not_the_report(tmp_path, capsys):
    from harness.html_report import maps_of_trial
    from harness.report import main as report_main

    bad = tmp_path / "maps.npz"
    bad.write_bytes(b"PK\x03\x04 not a zip at all")
    assert maps_of_trial(bad, "x") is None
    assert "unreadable maps" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "study.yaml").write_text("name: s\nprofile: default\n")
    (run / "results.parquet").write_bytes(b"PAR1 garbage")
    assert report_main([str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot read its results" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- results are never dropped

def test_a_narrower_grid_keeps_every_finished_result(tiny_study, tmp_path):
    from harness.report import build_reports
    from harness.results import ResultStore

    wide = fake_run(tmp_path / "run", tiny_study, [])
    narrow = fake_run(tmp_path / "run", tiny_study, ["grid.method.stages=[1]"])  # a later, narrower rerun
    assert len(wide) == 4 and len(narrow) == 2
    stored = pd.read_parquet(tmp_path / "run" / "results.parquet")
    assert set(stored["trial_id"]) == {t.trial_id for t in wide}
    assert stored["in_grid"].sum() == 2 and (stored["status"] == "finished").all()
    assert list(stored["trial_id"][:2]) == [t.trial_id for t in narrow]  # the current grid first
    # A fresh store (a new process) keeps them too, and the report says how many it leaves out.
    ResultStore(tmp_path / "run").write_tables(narrow)
    assert len(pd.read_parquet(tmp_path / "run" / "results.parquet")) == 4
    out = build_reports(tmp_path / "run", tmp_path / "report")
    assert "2 more finished trials of this study and profile" in (out / "table.md").read_text()
    assert "outside the grid" in (out / "index.html").read_text()
    assert json.loads((out / "summary.json").read_text())["trials"] == 2


def test_a_failed_record_never_replaces_a_finished_one(tiny_study, tmp_path):
    from harness.results import ResultStore
    from harness.study import load_study

    spec = load_study(tiny_study).trials[0]
    store = ResultStore(tmp_path)
    store.write_record(spec, "finished", {"test/acc": 0.7})
    kept = store.write_record(spec, "failed", {}, "trial process died: after its final report")
    assert kept["status"] == "finished"
    assert json.loads((tmp_path / "trials" / spec.trial_id / "result.json").read_text())["status"] == "finished"
    assert ResultStore(tmp_path).record(spec.trial_id)["test/acc"] == 0.7


def test_the_driver_callback_keeps_a_finished_trial_whose_process_then_dies(tiny_study, tmp_path):
    from types import SimpleNamespace

    from harness.orchestrate import RunSummary
    from harness.orchestrate._callback import StoreCallback
    from harness.results import ResultStore
    from harness.study import load_study

    specs = load_study(tiny_study).trials[:1]
    store, summary, said = ResultStore(tmp_path), RunSummary(total=1), []
    callback = StoreCallback(store, {s.trial_id: s for s in specs}, specs, summary, said.append,
                             checkpoints=SimpleNamespace(delete=lambda t: None))
    trial = SimpleNamespace(config={"trial": {"trial_id": specs[0].trial_id}}, error_file=None)
    callback.on_trial_result(0, [], trial, {"kind": "final", "status": "finished", "test/acc": 0.6, "history": "[]"})
    callback.on_trial_error(0, [], trial)
    assert store.record(specs[0].trial_id)["status"] == "finished"
    assert summary.finished == {specs[0].trial_id} and not summary.failed


def test_an_axis_of_mixed_types_is_stored_not_refused(tiny_study, tmp_path):
    from dataclasses import replace

    from harness.results import ResultStore
    from harness.study import load_study

    specs = load_study(tiny_study).trials[:2]
    specs = [replace(specs[0], axes={"backbone.pretrained": False}),
             replace(specs[1], axes={"backbone.pretrained": "/weights/r18.pth"})]
    store = ResultStore(tmp_path)
    for spec in specs:
        store.write_record(spec, "finished", {"test/acc": 0.5})
    stored = store.write_tables(specs)
    assert len(pd.read_parquet(tmp_path / "results.parquet")) == len(stored) == 2


# ----------------------------------------------------------------------------- node cache, atomic writes

@pytest.mark.parametrize("damage", ["truncated images", "empty labels", "deleted meta.json", "flipped byte",
                                    "meta.json without checksums"])
def test_a_broken_cache_entry_is_named_and_rebuilt(tmp_path, monkeypatch, capsys, damage):
    from harness.data import DATASETS, cache_path, load_imageset, verify_entry

    monkeypatch.setenv("FGVC_HARNESS_CACHE", str(tmp_path))
    params = DATASETS.get("synthfg").Params.model_validate({"name": "synthfg", "classes": 4, "train_per_class": 2,
                                                            "test_per_class": 2})
    first = load_imageset(params, 32)
    expected = np.array(first.train.images)
    path = cache_path(params, 32)
    assert verify_entry(path) is None
    images, labels, meta = path / "train_images.npy", path / "test_labels.npy", path / "meta.json"
    if damage == "truncated images":
        images.write_bytes(images.read_bytes()[:-100])
    elif damage == "empty labels":
        labels.write_bytes(b"")
    elif damage == "deleted meta.json":
        meta.unlink()
    elif damage == "flipped byte":
        data = bytearray(images.read_bytes())
        data[-1] ^= 0xFF
        images.write_bytes(data)
        os.utime(images, ns=(1, 1))  # a new stamp: this process re-checks the entry
    else:
        meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "files"}))
    assert verify_entry(path) not in (None, "not built yet")
    again = load_imageset(params, 32)
    assert f"dataset cache entry {path} is broken" in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(again.train.images), expected)
    assert verify_entry(path) is None
    assert not [p for p in tmp_path.iterdir() if ".broken-" in p.name]


def test_the_atomic_writer_flushes_the_file_and_its_folder(tmp_path, monkeypatch):
    from harness import _atomic

    synced = []
    real = os.fsync
    fds: dict[int, str] = {}
    real_open = os.open

    def fake_open(path, flags, *a, **k):
        fd = real_open(path, flags, *a, **k)
        fds[fd] = str(path)
        return fd

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fds.get(fd)), real(fd)))
    _atomic.atomic_write_bytes(tmp_path / "f.json", b"{}")
    assert any(p and Path(p).name.startswith(".f.json.") for p in synced)  # the data, before the rename
    assert str(tmp_path) in synced  # the rename
    synced.clear()
    _atomic.atomic_write(tmp_path / "entry", lambda d: (d / "a.npy").write_bytes(b"x"), directory=True)
    assert any(p and p.endswith("a.npy") for p in synced) and str(tmp_path) in synced
    assert (tmp_path / "entry" / "a.npy").read_bytes() == b"x"


# ----------------------------------------------------------------------------- the run lock on the storage

def test_a_storage_prefix_has_one_driver(tmp_path):
    from harness.orchestrate._storage import Storage, StorageLease
    from harness.results import RunLocked

    storage = Storage(tmp_path / "shared")
    first = StorageLease(storage, "tiny/default", tmp_path / "runs-a", settle_s=0.01).acquire()
    held = json.loads((tmp_path / "shared" / "tiny" / "default" / ".lease").read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["started"] <= time.time()
    with pytest.raises(RunLocked, match=r"another driver uses the storage prefix .* pid \d+ on .*runs-a"):
        StorageLease(storage, "tiny/default", tmp_path / "runs-b", settle_s=0.01).acquire()
    StorageLease(storage, "other/default", tmp_path / "runs-b", settle_s=0.01).acquire().release()  # other prefix
    first.release()
    assert not (tmp_path / "shared" / "tiny" / "default" / ".lease").exists()
    StorageLease(storage, "tiny/default", tmp_path / "runs-b", settle_s=0.01).acquire().release()


def test_a_lease_is_refreshed_and_taken_over_only_when_stale(tmp_path):
    from harness.orchestrate._storage import Storage, StorageLease
    from harness.results import RunLocked

    storage = Storage(tmp_path)
    lease = StorageLease(storage, "p", refresh_s=0.05, settle_s=0.01).acquire()
    t0 = json.loads((tmp_path / "p" / ".lease").read_text())["refreshed"]
    time.sleep(0.3)
    assert json.loads((tmp_path / "p" / ".lease").read_text())["refreshed"] > t0
    lease._stop.set()  # the driver hangs: no more refreshes
    lease._thread.join()
    time.sleep(0.2)
    with pytest.raises(RunLocked):
        StorageLease(storage, "p", stale_s=60, settle_s=0.01).acquire()
    StorageLease(storage, "p", stale_s=0.1, settle_s=0.01).acquire().release()  # not refreshed for 0.1 s: stale
    # Another host's lease, fresh: refused; a dead driver on this host: taken over at once.
    other = {"token": "x", "host": "elsewhere", "pid": 1, "started": time.time(), "refreshed": time.time()}
    (tmp_path / "p" / ".lease").write_text(json.dumps(other))
    with pytest.raises(RunLocked, match="on elsewhere"):
        StorageLease(storage, "p", settle_s=0.01).acquire()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    here = {**other, "host": socket.gethostname(), "pid": int(dead.stdout)}
    (tmp_path / "p" / ".lease").write_text(json.dumps(here))
    StorageLease(storage, "p", settle_s=0.01).acquire().release()


def test_two_drivers_with_other_runs_folders_cannot_share_a_storage(tmp_path, monkeypatch, capsys):
    from harness.orchestrate._storage import Storage, StorageLease

    lease = StorageLease(Storage(tmp_path / "shared"), "tiny/default", tmp_path / "elsewhere", settle_s=0.01).acquire()
    try:
        rc, output, outside = run_cli(tmp_path, TINY_STUDY, ["--storage", str(tmp_path / "shared")], monkeypatch,
                                      capsys)
    finally:
        lease.release()
    assert rc == 2 and "another driver uses the storage prefix" in output and "Traceback" not in output


# ----------------------------------------------------------------------------- Ray's surface

def test_address_gives_up_after_the_connect_timeout_naming_it(tmp_path, monkeypatch, capsys):
    t0 = time.perf_counter()
    rc, output, _ = run_cli(tmp_path, TINY_STUDY, ["--address", "127.0.0.1:1", "--connect-timeout", "1"],
                            monkeypatch, capsys)
    assert rc == 2 and "cannot reach the Ray cluster at 127.0.0.1:1" in output and "--connect-timeout" in output
    assert time.perf_counter() - t0 < 30


def test_disabled_authentication_is_said_and_a_readable_token_file_is_made_private(tmp_path, monkeypatch, capsys):
    from harness.orchestrate import _check_authentication

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("secret")
    token.chmod(0o644)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    said = []
    _check_authentication(None, said.append)
    assert "RAY_AUTH_MODE=disabled: Ray's token authentication is OFF" in capsys.readouterr().err
    assert token.stat().st_mode & 0o777 == 0o600 and "made it 0600" in said[0]
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    _check_authentication(None, said.append)
    assert "OFF" not in capsys.readouterr().err


LISTENERS = """
import json, os, sys
sys.path.insert(0, {root!r})
from harness import orchestrate
import psutil  # Ray's own copy (ray/thirdparty_files), on the path once Ray is imported
orchestrate.start_ray(None, num_cpus=1, dashboard=True)
import ray
ray.get(ray.remote(lambda: 1).remote())
mine = {{p.pid for p in psutil.Process().children(recursive=True)}} | {{os.getpid()}}
found = sorted({{c.laddr.ip for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid in mine}})
orchestrate.shutdown()
print(json.dumps({{"listen": found, "token_in_env": bool(os.environ.get("RAY_AUTH_TOKEN"))}}))
"""


@pytest.mark.slow
def test_a_local_ray_listens_on_loopback_only_and_writes_no_token_file(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")}
    env.update(HOME=str(tmp_path), RAY_AUTH_MODE="token")
    out = subprocess.run([sys.executable, "-c", LISTENERS.format(root=str(ROOT))], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["listen"] and set(seen["listen"]) <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, seen
    assert seen["token_in_env"]  # this run's own token, in its processes' environment
    assert not (tmp_path / ".ray" / "auth_token").exists()


def test_a_narrower_rerun_through_the_cli_keeps_every_finished_row(tiny_run, tmp_path, monkeypatch, capsys):
    """The bar of issue 19 on a real run: tiny_run trained stages 1 and 2; a rerun of stage 1 alone trains nothing
    (no Ray starts) and results.parquet still holds both finished trials."""
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(tiny_run[0] / "runs", runs)
    before = pd.read_parquet(runs / "tiny" / "fast" / "results.parquet")
    assert len(before) == 2 and (before["status"] == "finished").all()
    study = tmp_path / "tiny.yaml"
    study.write_text(TINY_STUDY)
    monkeypatch.setenv("HOME", str(tmp_path))
    rc = main([str(study), "--profile", "fast", "--runs-dir", str(runs), "--reports-dir", str(tmp_path / "reports"),
               "--set", "grid.method.stages=[1]", "--set", "grid.method.jigsaw=[true]"])
    out = capsys.readouterr().out
    assert rc == 0 and "0 trials trained, 1 skipped" in out
    after = pd.read_parquet(runs / "tiny" / "fast" / "results.parquet")
    assert set(after["trial_id"]) == set(before["trial_id"]) and after["in_grid"].sum() == 1
    assert "1 more finished trial of this study and profile" in (tmp_path / "reports" / "tiny" / "fast" /
                                                                 "table.md").read_text()
