"""Helpers of the hostile-input tests (issue 19): study files from the tiny study, and harness.run's command line
run from a folder of its own with its roots deep inside the test's tmp_path, reporting what it wrote outside them."""

from __future__ import annotations

from pathlib import Path

import yaml

from harness.run import main
from tests.conftest import TINY_STUDY

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


def fake_run(run_dir: Path, study: Path, overrides: list[str], acc: float = 0.5) -> list:
    """A run folder as harness.run leaves it, without training: finished records of the study's trials."""
    from harness.results.store import ResultStore
    from harness.study.load import load_study

    resolved = load_study(study, overrides=overrides)
    store = ResultStore(run_dir)
    for spec in resolved.trials:
        store.write_record(spec, "finished", {"test/acc": acc, "train/loss": 1.0, "wall_time_s": 1.0})
    store.write_tables(resolved.trials)
    dump = resolved.study.model_dump(mode="json", exclude={"profiles"})
    (run_dir / "study.yaml").write_text(yaml.safe_dump(dump, sort_keys=False))
    return resolved.trials
