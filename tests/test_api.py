"""The Python API (harness.run_study, harness.load_results) and the `fgvc` command: the same rows as
`python -m harness.run`, DataFrames and tables without reading parquet by hand."""

import pandas as pd
import pytest

import harness
from harness.cli import main as fgvc
from tests.conftest import TINY_STUDY


@pytest.mark.integration
def test_run_study_returns_the_same_rows_as_the_command_line(tiny_run, tmp_path):
    cli_tmp, _ = tiny_run
    cli_rows = pd.read_parquet(next((cli_tmp / "runs").glob("*/*/results.parquet")))
    study = tmp_path / "tiny.yaml"
    study.write_text(TINY_STUDY)
    results = harness.run_study(study, profile="fast", overrides=["grid.method.stages=[1, 2]",
                                                                  "grid.method.jigsaw=[true]"],
                                runs_dir=tmp_path / "runs", reports_dir=tmp_path / "reports", num_cpus=2)
    rows = results.get_dataframe()
    assert len(results.summary.finished) == 2 and results.summary.skipped == 0
    key = ["trial_id", "test/acc", "train/loss", "optimizer_steps"]
    pd.testing.assert_frame_equal(rows[key].sort_values("trial_id").reset_index(drop=True),
                                  cli_rows[key].sort_values("trial_id").reset_index(drop=True))
    assert (results.report_dir / "index.html").exists() and "table" in results.tables
    assert set(results.curves["trial_id"]) == set(rows["trial_id"])
    again = harness.run_study(study, profile="fast",
                              overrides=["grid.method.stages=[1, 2]", "grid.method.jigsaw=[true]"],
                              runs_dir=tmp_path / "runs", reports_dir=tmp_path / "reports", num_cpus=2)
    assert again.summary.skipped == 2 and not again.summary.finished  # a rerun trains nothing


def test_load_results_reads_a_stored_run(tiny_run):
    tmp, _ = tiny_run
    run_dir = next((tmp / "runs").glob("*/*/results.parquet")).parent
    loaded = harness.load_results(run_dir)
    assert len(loaded.results) == 2 and loaded.summary is None
    table = loaded.tables["table"]
    assert "stats" in table.attrs and list(table.index) == ["1", "2"]
    assert "2 trials" in repr(loaded)


def test_the_fgvc_command_dispatches_to_each_command(tmp_path, capsys):
    assert fgvc(["--help"]) == 0 and "fgvc run" in capsys.readouterr().out
    assert fgvc(["nope"]) == 2 and "the commands: run, report, gate, data" in capsys.readouterr().err
    study = tmp_path / "tiny.yaml"
    study.write_text(TINY_STUDY)
    assert fgvc(["run", str(study), "--dry-run"]) == 0 and "study tiny" in capsys.readouterr().out
    assert fgvc(["gate", str(tmp_path / "nowhere"), "b.json"]) == 2
