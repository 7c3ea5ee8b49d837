"""The CI regression gate on stored runs: a run passes against its own baseline; a regression (accuracy, a
constant predictor, loss, slowdown, a crash) is exit 1 naming the cells; every input it cannot judge (NaN,
missing or zero throughput, another test set, config, precision or study, a missing column, a new cell that
failed, a baseline of fewer than 3 seeds) is exit 2 with the reason and no traceback."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from harness.gate.cli import main
from harness.core.records import pack_correct

SEEDS = (0, 1, 2)
CONFIG = {"method": {"name": "baseline"}, "dataset": {"name": "synthfg", "classes": 4},
          "backbone": {"name": "resnet18"}, "train": {"epochs": 3, "precision": "auto", "timeout_s": 100}}


def write_run(run, cells=(("baseline", 0.8, 0.5), ("wsdan", 0.7, 0.25)), seeds=SEEDS, precision="fp32",
              edit=None, n_test=1200, study_name="ci_smoke"):
    """A run directory as harness.run leaves it: study.yaml and results.parquet with the columns the gate reads.
    `edit(rows)` doctors the rows before they are written."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "study.yaml").write_text(yaml.safe_dump({"name": study_name, "profile": "default",
                                                    "grid": {"method": [{"name": m} for m, _, _ in cells]}}))
    rows = []
    for m, (method, p, rel) in enumerate(cells):
        learned = np.random.default_rng(m).random(n_test) < p  # what the method gets right on the same test images
        for seed in seeds:
            rng = np.random.default_rng(100 * m + seed)  # a seed reruns the same, as training does on one machine
            correct = learned ^ (rng.random(n_test) < 0.02)  # each seed differs on ~2% of the images
            config = json.loads(json.dumps(CONFIG))
            config["method"]["name"], config["seed"] = method, seed
            rows.append({"trial_id": f"{method}{seed}", "status": "finished", "error": "", "method": method,
                         "seed": seed, "test/acc": float(correct.mean()), "test/correct": pack_correct(correct),
                         "test/set_hash": f"set{n_test}", "num_classes": 4, "train/images_per_s": 100.0,
                         "train/images_per_s_rel": rel * (1 + rng.normal(0, 0.02)), "version/math": "5",
                         "train/loss": 1.2 + rng.normal(0, 0.01), "precision": precision,
                         "config": json.dumps(config, sort_keys=True)})
    if edit:
        edit(rows)
    pd.DataFrame(rows).to_parquet(run / "results.parquet")
    return run


@pytest.fixture
def baseline(tmp_path):
    """A baseline of 3 seeds in fp32 (baselines/ci_smoke.fp32.json), and the run it was written from."""
    run = write_run(tmp_path / "base" / "ci_smoke" / "default")
    template = str(tmp_path / "ci_smoke.{precision}.json")
    assert main([str(run), "--write-baseline", template]) == 0
    return tmp_path / "ci_smoke.fp32.json", template


def run_with(tmp_path, **kwargs):
    return write_run(tmp_path / "run" / "ci_smoke" / "default", seeds=(0,), **kwargs)


def test_the_baseline_records_noise_identity_and_precision(baseline):
    path, _ = baseline
    data = json.loads(path.read_text())
    assert data["precision"] == "fp32" and data["seeds"] == [0, 1, 2] and data["config_hash"]
    cell = data["cells"]["method=baseline"]
    assert cell["seeds"] == 3 and cell["test_images"] == 1200 and cell["test_set_hash"] == "set1200"
    assert cell["chance"] == 0.25 and cell["accuracy_std"] > 0 and cell["throughput_log_std"] > 0
    assert cell["config_hash"] != data["cells"]["method=wsdan"]["config_hash"]


def test_a_one_seed_run_passes_against_its_baseline(baseline, tmp_path, capsys):
    _, template = baseline
    run = run_with(tmp_path)
    capsys.readouterr()
    assert main([str(run), template, "--junit", str(tmp_path / "j.xml")]) == 0
    out = capsys.readouterr().out
    assert "no regression in 2 cells" in out and "fp32" in out
    assert 'failures="0" errors="0"' in (tmp_path / "j.xml").read_text()


def test_fewer_than_three_seeds_is_no_baseline(tmp_path, capsys):
    run = write_run(tmp_path / "r" / "ci_smoke" / "default", seeds=(0, 1))
    assert main([str(run), "--write-baseline", str(tmp_path / "b.json")]) == 2
    assert "at least 3" in capsys.readouterr().err and not (tmp_path / "b.json").exists()


def test_a_baseline_cell_near_chance_is_refused(tmp_path, capsys):
    run = write_run(tmp_path / "r" / "ci_smoke" / "default", cells=(("baseline", 0.8, 0.5), ("gain", 0.3, 0.4)))
    assert main([str(run), "--write-baseline", str(tmp_path / "b.json")]) == 2
    assert "method=gain: accuracy" in capsys.readouterr().err


def test_a_constant_predictor_regresses(baseline, tmp_path, capsys):
    _, template = baseline

    def constant(rows):
        for r in rows:
            if r["method"] == "wsdan":
                correct = np.arange(1200) % 4 == 0  # always the same class of 4 balanced ones
                r.update({"test/acc": 0.25, "test/correct": pack_correct(correct)})

    capsys.readouterr()
    assert main([str(run_with(tmp_path, edit=constant)), template, "--junit", str(tmp_path / "j.xml")]) == 1
    out = capsys.readouterr().out
    assert "REGRESSED: method=wsdan" in out and "floor" in out and "method=baseline:" not in out
    assert 'failures="1"' in (tmp_path / "j.xml").read_text()


def test_a_ten_point_drop_regresses_and_a_small_one_does_not(baseline, tmp_path, capsys):
    _, template = baseline
    run = run_with(tmp_path, cells=(("baseline", 0.7, 0.5), ("wsdan", 0.69, 0.25)))
    capsys.readouterr()
    assert main([str(run), template]) == 1
    out = capsys.readouterr().out
    assert "REGRESSED: method=baseline" in out and "se)" in out and "method=wsdan:" not in out


def test_a_slowdown_and_a_rising_loss_regress(baseline, tmp_path, capsys):
    _, template = baseline

    def slower(rows):
        for r in rows:
            if r["method"] == "wsdan":
                r["train/images_per_s_rel"] /= 2
            else:
                r["train/loss"] = 1.5  # a quarter above the baseline's 1.2

    capsys.readouterr()
    assert main([str(run_with(tmp_path, edit=slower)), template]) == 1
    out = capsys.readouterr().out
    assert "relative throughput 0.5" in out and "training loss 1.500 > baseline" in out
    assert main([str(run_with(tmp_path, edit=slower)), template, "--loss-tol", "0.5", "--max-slowdown", "0.6"]) == 0


def test_a_failed_cell_regresses(baseline, tmp_path, capsys):
    _, template = baseline

    def crash(rows):
        for r in rows:
            if r["method"] == "wsdan":
                r.update({"status": "failed", "error": "RuntimeError: boom", "test/acc": None})

    capsys.readouterr()
    assert main([str(run_with(tmp_path, edit=crash)), template]) == 1
    assert "method=wsdan: failed: all 1 trial(s) (RuntimeError: boom)" in capsys.readouterr().out


@pytest.mark.parametrize("case,edit,message", [
    ("nan accuracy", lambda r: r[0].update({"test/acc": float("nan")}), "test/acc is NaN"),
    ("nan loss", lambda r: r[0].update({"train/loss": float("nan")}), "train/loss is NaN"),
    ("zero throughput", lambda r: r[0].update({"train/images_per_s_rel": 0.0}), "is missing, NaN or 0"),
    ("nan throughput", lambda r: r[0].update({"train/images_per_s_rel": float("nan")}), "is missing, NaN or 0"),
    ("no throughput", lambda r: [x.pop("train/images_per_s_rel") for x in r], "is missing, NaN or 0"),
    ("other test set", lambda r: r[0].update({"test/set_hash": "other"}), "tested on other images"),
    ("other config", lambda r: r[0].update({"config": r[0]["config"].replace('"epochs": 3', '"epochs": 4')}),
     "its config differs"),
    ("missing column", lambda r: [x.pop("test/acc") for x in r], "no column test/acc"),
    ("no precision column", lambda r: [x.pop("precision") for x in r], "no column precision"),
    ("new cell that failed", lambda r: r.append({**r[0], "trial_id": "x", "method": "racnn", "status": "failed",
                                                "test/acc": None, "error": "boom",
                                                "config": r[0]["config"].replace("baseline", "racnn")}),
     "new (not in the baseline) and 1 trial(s) failed"),
])
def test_input_the_gate_cannot_judge_exits_2_with_the_reason(baseline, tmp_path, capsys, case, edit, message):
    _, template = baseline
    run = run_with(tmp_path, edit=edit)
    if case == "new cell that failed":  # the study lists it too
        study = yaml.safe_load((run / "study.yaml").read_text())
        study["grid"]["method"].append({"name": "racnn"})
        (run / "study.yaml").write_text(yaml.safe_dump(study))
    capsys.readouterr()
    assert main([str(run), template, "--junit", str(tmp_path / "j.xml")]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err + captured.out


def test_a_four_image_test_set_is_not_compared_with_a_1200_image_baseline(baseline, tmp_path, capsys):
    _, template = baseline
    capsys.readouterr()
    assert main([str(run_with(tmp_path, n_test=4)), template]) == 2
    assert "tested on 4 images, the baseline on 1200" in capsys.readouterr().err


def test_no_throughput_is_judged_only_when_asked_not_to(baseline, tmp_path):
    _, template = baseline
    run = run_with(tmp_path, edit=lambda r: [x.update({"train/images_per_s_rel": None}) for x in r])
    assert main([str(run), template]) == 2
    assert main([str(run), template, "--no-throughput"]) == 0


def test_a_run_of_another_precision_needs_its_own_baseline(baseline, tmp_path, capsys):
    path, template = baseline
    run = run_with(tmp_path, precision="bf16")
    capsys.readouterr()
    assert main([str(run), template]) == 2  # baselines/ci_smoke.bf16.json does not exist
    assert "ci_smoke.bf16.json not found" in capsys.readouterr().err
    assert main([str(run), str(path)]) == 2  # the fp32 file named outright: never compared
    err = capsys.readouterr().err
    assert "trained in bf16, the baseline" in err and "in fp32" in err
    mixed = run_with(tmp_path, edit=lambda r: r[0].update({"precision": "bf16"}))
    assert main([str(mixed), template]) == 2
    assert "several precisions" in capsys.readouterr().err


def test_bad_baselines_and_runs_exit_2_with_the_reason(baseline, tmp_path, capsys):
    path, template = baseline
    run = run_with(tmp_path)
    bad = tmp_path / "bad.json"
    data = json.loads(path.read_text())
    data["cells"]["method=baseline"]["accuracy"] = 1.5
    data["cells"]["method=baseline"]["seeds"] = 1
    bad.write_text(json.dumps(data))
    capsys.readouterr()
    assert main([str(run), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "malformed" in err and "method=baseline.accuracy" in err and "method=baseline.seeds" in err
    bad.write_text("{not json")
    assert main([str(run), str(bad)]) == 2
    assert main([str(run), str(tmp_path / "none.json")]) == 2
    assert "--write-baseline" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere"), template]) == 2
    other = write_run(tmp_path / "o" / "other" / "default", seeds=(0,), study_name="other")
    assert main([str(other), template]) == 2
    assert "the baseline is of ci_smoke/default" in capsys.readouterr().err
    (run / "results.parquet").write_bytes(b"not parquet")
    assert main([str(run), template]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("gate: ") and "Parquet" in captured.err and "Traceback" not in captured.err


def test_the_committed_baseline_is_the_smoke_studys_and_clean():
    """The smoke study trains in fp32 everywhere (studies/ci_smoke.yaml), so one baseline serves every runner; it
    holds the throughput of the current measure and its config hash is the smoke study's as it stands."""
    from pathlib import Path

    from harness.engine.reference import MEASURE
    from harness.gate.cli import cell_config_hash, load_baseline
    from harness.study.load import load_study

    root = Path(__file__).resolve().parents[1]
    base = load_baseline(root / "baselines" / "ci_smoke.fp32.json")
    assert base.precision == "fp32" and len(base.seeds) >= 3 and base.throughput_measure == MEASURE
    assert all(c.accuracy >= 2 * c.chance for c in base.cells.values())  # every smoke cell learns
    resolved = load_study(root / "studies" / "ci_smoke.yaml")
    assert {t.config["train"]["precision"] for t in resolved.trials} == {"fp32"}
    import json

    from harness.core.versions import MATH_VERSION

    hashes = {cell_config_hash(json.dumps(t.config, sort_keys=True), MATH_VERSION) for t in resolved.trials}
    assert hashes == {c.config_hash for c in base.cells.values()}, "record the baseline again: make smoke-baseline"
    assert sorted(root.glob("baselines/ci_smoke.*.json")) == sorted(
        [root / "baselines" / "ci_smoke.fp32.json", *root.glob("baselines/ci_smoke.fp32.noise.json")])


def test_finished_trials_of_an_earlier_grid_are_left_out(baseline, tmp_path):
    """results.parquet keeps finished trials the current grid no longer holds (in_grid false): not judged."""
    _, template = baseline

    def earlier(rows):
        for r in rows:
            r["in_grid"] = True
        rows.append({**rows[0], "trial_id": "old", "in_grid": False, "test/acc": 0.1,
                     "config": rows[0]["config"].replace('"epochs": 3', '"epochs": 9')})

    assert main([str(run_with(tmp_path, edit=earlier)), template]) == 0


def test_the_gate_simulation_drives_the_gate_rule(baseline):
    """tests/benchmarks/bench_gate.py on a baseline: an unchanged system rarely alarms, a collapse is always caught."""
    from harness.gate.rules import Baseline, Rules
    from tests.benchmarks.bench_gate import simulate

    path, _ = baseline
    rates = simulate(Baseline.model_validate_json(path.read_text()), worlds=200, rules=Rules(), seed=1)
    assert rates["false alarms"][0] <= 0.03
    assert rates["10-point drop"][1] >= 0.9 and rates["2x slowdown"][1] >= 0.9
    assert 0 <= rates["5-point drop"][1] <= rates["10-point drop"][1]


def _on_cpu(model: str, capability: str):
    def edit(rows):
        for r in rows:
            r["cpu_model"], r["cpu_capability"] = model, capability
    return edit


def _slower(factor: float, model: str, capability: str):
    def edit(rows):
        _on_cpu(model, capability)(rows)
        for r in rows:
            r["train/images_per_s_rel"] /= factor
    return edit


def test_throughput_on_another_cpu_is_judged_only_against_half_the_baseline(tmp_path, capsys):
    """Ratios to the reference network move across CPUs (ops speed up unevenly): on the baseline's CPU a 1.6x
    slowdown is a regression; on another CPU only a fall below 0.5x is, and the gate says why it is lenient."""
    base = write_run(tmp_path / "base" / "ci_smoke" / "default", edit=_on_cpu("Intel Xeon", "AVX2"))
    template = str(tmp_path / "ci_smoke.{precision}.json")
    assert main([str(base), "--write-baseline", template]) == 0
    assert json.loads((tmp_path / "ci_smoke.fp32.json").read_text())["cpu"] == "Intel Xeon (AVX2)"
    same = run_with(tmp_path, edit=_slower(1.6, "Intel Xeon", "AVX2"))
    assert main([str(same), template]) == 1
    capsys.readouterr()
    other = write_run(tmp_path / "other" / "ci_smoke" / "default", seeds=(0,), edit=_slower(1.6, "AMD EPYC", "AVX2"))
    assert main([str(other), template]) == 0
    assert "judged only against 0.50x" in capsys.readouterr().err
    much = write_run(tmp_path / "much" / "ci_smoke" / "default", seeds=(0,), edit=_slower(2.5, "AMD EPYC", "AVX2"))
    assert main([str(much), template]) == 1


def _copy_of_first(rows, **changes):
    rows.append({**rows[0], **changes})


@pytest.mark.parametrize("case,edit,message", [
    ("accuracy in percent", lambda r: [x.update({"test/acc": 100 * x["test/acc"]}) for x in r], "not a top-1"),
    ("accuracy 1.5", lambda r: r[0].update({"test/acc": 1.5}), "test/acc 1.5 is not a top-1 accuracy"),
    ("negative accuracy", lambda r: r[0].update({"test/acc": -0.1}), "not a top-1 accuracy"),
    ("duplicated row", lambda r: _copy_of_first(r), "has more than one row"),
    ("duplicated seed 3 points lower", lambda r: _copy_of_first(r, trial_id="copy", **{
        "test/acc": r[0]["test/acc"] - 0.03}), "seed 0 finished more than once"),
    ("precision NaN", lambda r: [x.update({"precision": float("nan")}) for x in r], "does not say its precision"),
    ("new cell with NaN accuracy", lambda r: r.append({**r[0], "trial_id": "x", "method": "racnn",
                                                      "test/acc": float("nan"),
                                                      "config": r[0]["config"].replace("baseline", "racnn")}),
     "new (not in the baseline): test/acc is NaN"),
])
def test_impossible_runs_exit_2_naming_the_cell(baseline, tmp_path, capsys, case, edit, message):
    path, template = baseline
    run = run_with(tmp_path, edit=edit)
    if case.startswith("new cell"):
        study = yaml.safe_load((run / "study.yaml").read_text())
        study["grid"]["method"].append({"name": "racnn"})
        (run / "study.yaml").write_text(yaml.safe_dump(study))
    for base in (template, str(path)):  # the {precision} template and the literal path alike
        capsys.readouterr()
        assert main([str(run), base]) == 2, case
        captured = capsys.readouterr()
        assert message in captured.err and "Traceback" not in captured.err + captured.out


@pytest.mark.parametrize("field,value,message", [
    ("train_loss", float("nan"), "train_loss"),
    ("accuracy_std", float("inf"), "accuracy_std"),
    ("accuracy_std", 0.6, "impossible"),  # no 3 accuracies in [0, 1] with mean 0.8 spread that much
    ("train_loss_std", float("nan"), "train_loss_std"),
    ("throughput_log_std", float("inf"), "throughput_log_std"),
])
def test_a_baseline_with_nan_infinite_or_impossible_values_exits_2(baseline, tmp_path, capsys, field, value, message):
    path, _ = baseline
    data = json.loads(path.read_text())
    data["cells"]["method=baseline"][field] = value
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))  # json writes NaN and Infinity, as a careless editor might
    drop = run_with(tmp_path, cells=(("baseline", 0.6, 0.5), ("wsdan", 0.7, 0.25)))  # a 20-point drop
    capsys.readouterr()
    assert main([str(drop), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "malformed" in err and message in err


@pytest.mark.parametrize("args,message", [(["--k", "nan"], "--k nan"), (["--k", "-1"], "--k -1"),
                                          (["--k", "0"], "--k 0"), (["--k", "inf"], "--k inf"),
                                          (["--max-slowdown", "1.5"], "--max-slowdown"),
                                          (["--loss-tol", "nan"], "--loss-tol")])
def test_gate_settings_that_would_switch_a_check_off_exit_2(baseline, tmp_path, capsys, args, message):
    _, template = baseline
    drop = run_with(tmp_path, cells=(("baseline", 0.6, 0.5), ("wsdan", 0.7, 0.25)))
    capsys.readouterr()
    assert main([str(drop), template, *args]) == 2
    assert message in capsys.readouterr().err


def test_a_baseline_is_written_only_from_distinct_seeds(tmp_path, capsys):
    def thrice_seed_0(rows):
        for i, r in enumerate(rows):
            r["seed"] = 0
            r["config"] = r["config"].replace(f'"seed": {i % 3}', '"seed": 0')

    run = write_run(tmp_path / "r" / "ci_smoke" / "default", edit=thrice_seed_0)
    assert main([str(run), "--write-baseline", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert "1 distinct finished seed(s)" in err and not (tmp_path / "b.json").exists()


def test_a_run_whose_every_trial_failed_is_a_regression_with_its_errors(baseline, tmp_path, capsys):
    _, template = baseline

    def crash(rows):
        for r in rows:
            r.update({"status": "failed", "error": f"RuntimeError: {r['method']} crashed", "test/acc": None,
                      "precision": None})

    capsys.readouterr()
    assert main([str(run_with(tmp_path, edit=crash)), template, "--junit", str(tmp_path / "j.xml")]) == 1
    out = capsys.readouterr().out
    assert "every trial of the run failed" in out and "RuntimeError: wsdan crashed" in out
    assert 'failures="2"' in (tmp_path / "j.xml").read_text()
