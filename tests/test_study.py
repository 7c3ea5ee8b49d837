"""The study loader: strict validation with errors that name the key, the line and the fix."""

from pathlib import Path

import pytest

from harness.run import main
from harness.study.errors import StudyError
from harness.study.load import load_study
from harness.study.trials import trial_identity

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text, name="s.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = "name: s\nmethod: {name: pmg}\ndataset: {name: synthfg}\n"


def test_tiny_study_expands_grid_times_seeds(tiny_study):
    study = load_study(tiny_study)
    assert len(study.trials) == 4
    assert {tuple(t.axes.values()) for t in study.trials} == {(1, True), (1, False), (2, True), (2, False)}
    assert len({t.trial_id for t in study.trials}) == 4
    # Parameters are resolved with the method's defaults filled in.
    assert study.trials[0].config["method"]["beta"] == 2.0


def test_seeds_multiply_trials(tiny_study):
    study = load_study(tiny_study, overrides=["seeds=[0, 1, 2]"])
    assert len(study.trials) == 12


def test_unknown_top_level_key_names_key_line_and_closest(tmp_path):
    path = write(tmp_path, BASE + "trian: {epochs: 2}\n")
    with pytest.raises(StudyError) as e:
        load_study(path)
    msg = str(e.value)
    assert "unknown key 'trian'" in msg and "did you mean 'train'" in msg and f"{path}:4" in msg



@pytest.mark.parametrize("section", ["table: {rows: method.stages, cols: method.jigsaw}",
                                     "tables: {main: {rows: method.stages, cols: method.jigsaw}}"])
def test_unknown_key_in_an_optional_or_named_section_lists_its_keys(tmp_path, section):
    path = write(tmp_path, BASE + "grid: {method.stages: [1, 2], method.jigsaw: [true, false]}\n" + section + "\n")
    with pytest.raises(StudyError) as e:
        load_study(path)
    assert "did you mean 'columns'" in str(e.value)
    assert "(valid keys: columns, grid, metric, model_comparison, reference, rows)" in str(e.value)

def test_unknown_method_parameter_suggests_closest(tmp_path):
    path = write(tmp_path, "name: s\nmethod:\n  name: pmg\n  stagse: 3\n")
    with pytest.raises(StudyError) as e:
        load_study(path)
    assert "unknown key 'method.stagse'" in str(e.value) and "did you mean 'stages'" in str(e.value)
    assert f"{path}:4" in str(e.value)


def test_out_of_range_method_parameter_names_allowed_range(tmp_path):
    path = write(tmp_path, "name: s\nmethod: {name: pmg, stages: 7}\n")
    with pytest.raises(StudyError, match=r"method\.stages.*less than or equal to 5.*allowed: stages >= 1 and <= 5"):
        load_study(path)


def test_wrong_type_is_an_error(tmp_path):
    path = write(tmp_path, BASE + "train: {epochs: many}\n")
    with pytest.raises(StudyError, match=r"train\.epochs: Input should be a valid integer.*'many'"):
        load_study(path)


def test_unknown_method_gets_did_you_mean(tmp_path):
    with pytest.raises(StudyError, match="unknown method 'pgm': did you mean 'pmg'"):
        load_study(write(tmp_path, "name: s\nmethod: {name: pgm}\n"))


def test_unknown_dataset_gets_did_you_mean(tmp_path):
    with pytest.raises(StudyError, match="unknown dataset 'synthgf': did you mean 'synthfg'"):
        load_study(write(tmp_path, "name: s\nmethod: {name: pmg}\ndataset: {name: synthgf}\n"))


def test_stages_beyond_backbone_is_an_error(tmp_path):
    # vgg-free check: resnet18 has 5 stages, so out_indices limiting it to 3 makes stages=4 invalid.
    path = write(tmp_path, "name: s\nmethod: {name: pmg, stages: 4}\n"
                           "backbone: {name: resnet18, out_indices: [2, 3, 4]}\n")
    with pytest.raises(StudyError, match="backbone has 3 stages"):
        load_study(path)


def test_grid_axis_typo_and_invalid_values(tmp_path):
    with pytest.raises(StudyError, match=r"grid axis 'method.stagez'.*did you mean 'method.stages'"):
        load_study(write(tmp_path, BASE + "grid: {method.stagez: [1, 2]}\n"))
    with pytest.raises(StudyError, match=r"(?s)s.yaml:4: method\.stages.*in the trial with method.stages=9"):
        load_study(write(tmp_path, BASE + "grid: {method.stages: [1, 9]}\n"))
    with pytest.raises(StudyError, match="repeated values"):
        load_study(write(tmp_path, BASE + "grid: {method.stages: [1, 1]}\n"))


def test_table_axis_must_be_a_grid_axis(tmp_path):
    with pytest.raises(StudyError, match="table.rows 'method.jigsaw' is not a grid axis"):
        load_study(write(tmp_path, BASE + "grid: {method.stages: [1, 2]}\ntable: {rows: method.jigsaw}\n"))


def test_profile_and_overrides(tiny_study):
    fast = load_study(tiny_study, profile="fast")
    assert all(t.config["train"]["epochs"] == 1 for t in fast.trials)
    assert fast.profile == "fast"
    over = load_study(tiny_study, overrides=["train.epochs=3", "grid.method.stages=[2]"])
    assert {t.config["train"]["epochs"] for t in over.trials} == {3}
    assert len(over.trials) == 2
    with pytest.raises(StudyError, match="no profile 'fsat': did you mean 'fast'"):
        load_study(tiny_study, profile="fsat")
    with pytest.raises(StudyError, match="expected dotted.key=value"):
        load_study(tiny_study, overrides=["train.epochs"])


def test_environment_variables_in_profiles(tmp_path, monkeypatch):
    text = BASE + "profiles:\n  real:\n    dataset: {name: imagefolder, root: '${FOLDER_ROOT}/x'}\n"
    path = write(tmp_path, text)
    monkeypatch.delenv("FOLDER_ROOT", raising=False)
    load_study(path)  # the default profile does not need the variable
    with pytest.raises(StudyError, match="environment variable FOLDER_ROOT is not set"):
        load_study(path, profile="real")
    monkeypatch.setenv("FOLDER_ROOT", "/data/folders")
    assert load_study(path, profile="real").trials[0].config["dataset"]["root"] == "/data/folders/x"
    # Only a path may name one (issue 26): elsewhere ${VAR} is text as written, never the environment's value.
    monkeypatch.setenv("SYNTH_SEED", "7")
    with pytest.raises(StudyError, match=r"dataset\.seed"):
        load_study(write(tmp_path, BASE.replace("{name: synthfg}", "{name: synthfg, seed: '${SYNTH_SEED}'}"),
                         "seed.yaml"))


def test_identity_is_stable_and_tracks_every_knob(tiny_study):
    a = load_study(tiny_study).trials
    b = load_study(tiny_study).trials
    assert [t.trial_id for t in a] == [t.trial_id for t in b]
    c = load_study(tiny_study, overrides=["train.lr=0.01"]).trials
    assert not {t.trial_id for t in a} & {t.trial_id for t in c}
    # Writing a default explicitly does not change the identity.
    d = load_study(tiny_study, overrides=["method.beta=2.0"]).trials
    assert [t.trial_id for t in a] == [t.trial_id for t in d]
    assert trial_identity({"x": 1}) != trial_identity({"x": 2})


def test_malformed_files(tmp_path):
    with pytest.raises(StudyError, match="not valid YAML"):
        load_study(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(StudyError, match="must be a mapping"):
        load_study(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(StudyError, match="study file not found"):
        load_study(tmp_path / "missing.yaml")


def test_cli_dry_run_and_invalid_exit_codes(tiny_study, tmp_path, capsys):
    assert main([str(tiny_study), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 trials" in out and "method.stages=1,method.jigsaw=True,seed=0" in out
    bad = write(tmp_path, "name: s\nmethod: {name: pmg, stages: 0}\n", "bad.yaml")
    assert main([str(bad), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "allowed: stages >= 1 and <= 5" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing started


def test_shipped_studies_validate():
    study = load_study("studies/pmg_ablation.yaml")
    assert len(study.trials) == 20  # 5 x 2 cells x 2 seeds
    assert {t.axes["method.stages"] for t in study.trials} == {1, 2, 3, 4, 5}


def test_switching_dataset_replaces_its_parameters(tiny_study, tmp_path):
    root = tmp_path / "CUB_200_2011"
    study = load_study(tiny_study, overrides=["dataset.name=cub200", f"dataset.root={root}"])
    assert study.trials[0].config["dataset"] == {"name": "cub200", "root": str(root)}


def test_paper_profile_resolves_the_authors_protocol(monkeypatch):
    monkeypatch.setenv("CUB200_ROOT", "/data/CUB_200_2011")
    study = load_study("studies/pmg_ablation.yaml", profile="paper")
    cfg = study.trials[0].config
    assert cfg["dataset"] == {"name": "cub200", "root": "/data/CUB_200_2011"}
    assert cfg["backbone"]["name"] == "resnet50.tv_in1k" and cfg["backbone"]["pretrained"] is True
    assert (cfg["train"]["image_size"], cfg["train"]["resize"], cfg["train"]["batch_size"]) == (448, 550, 16)
    assert cfg["train"]["lr"] == 0.002 and cfg["train"]["epochs"] == 200 and cfg["train"]["precision"] == "fp32"
    m = cfg["method"]
    assert (m["feature_size"], m["stage_dim"], m["backbone_lr_scale"], m["early_exit"]) == (512, 1024, 0.1, False)
    assert len(study.trials) == 30  # 5 x 2 x 3 seeds


def test_named_grids_pool_trials_and_share_the_base(tmp_path):
    text = BASE.replace("method: {name: pmg}", "method: {name: mksmt}") + (
        "grids:\n  steps: {method.steps: [1, 2, 3]}\n  temperature: {method.temperature: [1, 4]}\n"
        "tables:\n  steps: {grid: steps, rows: method.steps, metric: [test/acc/S3, test/acc/S4]}\n")
    study = load_study(write(tmp_path, text))
    assert len(study.trials) == 4  # 3 + 2, the base (steps 2, T 1) once
    base = [t for t in study.trials if t.config["method"]["steps"] == 2 and t.config["method"]["temperature"] == 1]
    assert len(base) == 1 and sorted(base[0].grids) == ["steps", "temperature"]
    assert all(set(t.axes) == {"method.steps", "method.temperature"} for t in study.trials)
    with pytest.raises(StudyError, match="needs grid: one of steps, temperature"):
        load_study(write(tmp_path, text.replace("{grid: steps, ", "{")))
    with pytest.raises(StudyError, match="either grid: .* or grids:"):
        load_study(write(tmp_path, text + "grid: {method.steps: [1]}\n"))


def test_mksmt_study_and_its_paper_references(monkeypatch):
    study = load_study("studies/mksmt_ablation.yaml")
    assert len(study.trials) == 12 * len(study.study.seeds)  # the grids' 12 distinct cells, each at every seed
    monkeypatch.setenv("CUB200_ROOT", "/data/CUB_200_2011")
    paper = load_study("studies/mksmt_ablation.yaml", profile="paper")
    assert paper.study.tables["distillation"].reference.file == "mksmt.csv"
    assert paper.trials[0].config["backbone"]["name"].startswith("swin_large_patch4_window12_384")


SHIPPED = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "studies").glob("*.yaml"))


@pytest.mark.parametrize("study", SHIPPED)
def test_every_shipped_study_validates_in_every_profile(study, monkeypatch):
    """Every file in studies/, found on disk (a new study is covered without being listed anywhere)."""
    for var in ("CUB200_ROOT", "CARS_ROOT", "AIRCRAFT_ROOT", "DOGS_ROOT", "NABIRDS_ROOT"):
        monkeypatch.setenv(var, f"/data/{var}")
    default = load_study(ROOT / study)
    assert default.trials and all(t.config["dataset"]["name"] == "synthfg" for t in default.trials)
    for profile in default.study.profiles:
        resolved = load_study(ROOT / study, profile=profile)
        assert resolved.trials and resolved.profile == profile


def test_whole_section_axes_compare_plugins_with_their_own_settings(tmp_path):
    text = ("name: s\nmethod: {name: baseline}\ngrid:\n  method:\n    - {name: baseline}\n"
            "    - {name: pmg, stages: 2, feature_size: 16}\n  dataset:\n"
            "    - {label: easy, name: synthfg, part_scale: 2.0}\n    - {label: hard, name: synthfg, part_scale: 1.0}\n"
            "table: {rows: method, columns: dataset}\n")
    study = load_study(write(tmp_path, text))
    assert len(study.trials) == 4
    pmg = [t for t in study.trials if t.axes["method"] == "pmg"]
    assert {t.axes["dataset"] for t in pmg} == {"easy", "hard"}
    assert pmg[0].config["method"]["stages"] == 2 and "label" not in pmg[0].config["dataset"]
    with pytest.raises(StudyError, match="share the label"):
        load_study(write(tmp_path, text.replace("label: hard", "label: easy")))
    with pytest.raises(StudyError, match=r"(?s)method\.stages.*less than or equal to 5"):
        load_study(write(tmp_path, text.replace("stages: 2", "stages: 9")))


def test_comparison_study_covers_every_registered_method(monkeypatch):
    from harness.plugin.method import METHODS
    study = load_study("studies/methods_comparison.yaml")
    assert {t.config["method"]["name"] for t in study.trials} == set(METHODS.names())
    for var in ("CUB200_ROOT", "CARS_ROOT", "AIRCRAFT_ROOT", "DOGS_ROOT", "NABIRDS_ROOT"):
        monkeypatch.setenv(var, f"/data/{var}")
    paper = load_study("studies/methods_comparison.yaml", profile="paper")
    assert {t.config["dataset"]["name"] for t in paper.trials} == {
        "cub200", "stanford_cars", "fgvc_aircraft", "stanford_dogs", "nabirds"}
    assert {t.config["method"]["name"] for t in paper.trials} == set(METHODS.names())


def test_workers_need_a_batch_that_divides_and_whole_gpus(tiny_study):
    study = load_study(tiny_study, overrides=["resources.workers=2"])
    assert study.study.resources.workers == 2
    with pytest.raises(StudyError, match=r"train.batch_size=8 does not divide by resources.workers=3.*e.g. 9"):
        load_study(tiny_study, overrides=["resources.workers=3"])
    with pytest.raises(StudyError, match="several workers of one trial need a whole GPU each"):
        load_study(tiny_study, overrides=["resources.workers=2", "resources.gpu=0.5"])
    # The batch may divide in the base but not in a grid point: the message names that trial.
    with pytest.raises(StudyError, match=r"(?s)batch_size=6 does not divide.*in the trial with .*train.batch_size=6"):
        load_study(tiny_study, overrides=["resources.workers=4", "grid.train.batch_size=[8, 6]"])


def test_the_smoke_study_covers_every_registered_method():
    from harness.plugin.method import METHODS
    study = load_study(ROOT / "studies/ci_smoke.yaml")
    assert {t.config["method"]["name"] for t in study.trials} == set(METHODS.names())
    assert all(t.config["train"]["reference_workload"] for t in study.trials)
