"""Hostile and careless input (issue 19): every case exits 2 with its message and no traceback, prints no control
character, and writes nothing outside the run and report roots. Then the outputs: no element injected into a page,
escaped LaTeX and Markdown, no credentials stored. (No result lost: test_no_result_lost.py; the storage lease and
Ray's surface: test_run_isolation.py.)

The table-driven cases call harness.run.main in this process (no Ray starts: each is refused before it would);
a case that raised would fail here with its traceback, so "returns 2" is also "no traceback".
"""

from __future__ import annotations

import re
import time
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import TINY_STUDY
from tests.hostile import TINY, alias_bomb, fake_run, run_cli, study_text, with_train


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
    from harness.core.paths import UnsafePath, inside, name_problem

    for good in ("pmg_ablation", "paper", "v1.2-final", "a" * 100):
        assert name_problem(good) is None
    for bad in ("..", ".", "", "a/b", "/abs", "a\\b", "a b", "caf\u00e9", "x\x00", "a" * 101, None, 3):
        assert name_problem(bad), bad
    assert inside("runs", "s", "p") == Path("runs/s/p")
    for escape in (("..", "x"), ("s", "../../x"), ("/etc",)):
        with pytest.raises(UnsafePath):
            inside("runs", *escape)


def test_terminal_latex_markdown_and_uri_escaping():
    from harness.core.escape import latex, latex_label, markdown_cell, printable, redact_uri

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
    from harness.api import write_run_metadata

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
    from harness.report.build import build_reports, compare_runs

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
    from harness.report.html import maps_of_trial
    from harness.report.build import main as report_main

    bad = tmp_path / "maps.npz"
    bad.write_bytes(b"PK\x03\x04 not a zip at all")
    assert maps_of_trial(bad, "x")["error"].startswith("maps unreadable: BadZipFile")
    assert "maps unreadable" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "study.yaml").write_text("name: s\nprofile: default\n")
    (run / "results.parquet").write_bytes(b"PAR1 garbage")
    assert report_main([str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot read its results" in err and "Traceback" not in err
