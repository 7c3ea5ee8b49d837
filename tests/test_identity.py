"""Trial identities survive harness upgrades: a new config field with a default changes no identity, an
operational knob (train.timeout_s) is not part of it, and a changed default is caught here (it must come
with a MATH_VERSION bump). After a deliberate change of defaults, refresh the snapshot with

    python -m tests.test_identity --update
"""

import json
import sys
from pathlib import Path

import pytest
from pydantic import Field, create_model

from harness.plugin.backbones import BackboneConfig
from harness.data import DATASETS
from harness.plugin.method import METHODS
from harness.results.store import ResultStore
from harness.study.config import TrainConfig
from harness.study.load import load_study
from harness.study.trials import schema_defaults, trial_identity

SNAPSHOT = Path(__file__).with_name("schema_defaults.json")


def current_defaults() -> dict[str, dict[str, str]]:
    models = {"train": TrainConfig, "backbone": BackboneConfig}
    models.update({f"method:{n}": METHODS.get(n).Params for n in METHODS.names()})
    models.update({f"dataset:{n}": DATASETS.get(n).Params for n in DATASETS.names()})
    return {name: schema_defaults(model) for name, model in models.items()}


def test_no_default_changed_without_a_math_version_bump():
    recorded = json.loads(SNAPSHOT.read_text())
    now = current_defaults()
    changed = [f"{m}.{k}: {recorded[m][k]} -> {v}" for m, fields in now.items() for k, v in fields.items()
               if k in recorded.get(m, {}) and recorded[m][k] != v]
    assert not changed, ("defaults changed, so finished trials that relied on them would be reused with other "
                         "numbers: bump harness.MATH_VERSION, then run python -m tests.test_identity --update: "
                         f"{changed}")
    unrecorded = [f"{m}.{k}" for m, fields in now.items() for k in fields if k not in recorded.get(m, {})]
    assert not unrecorded, f"record the defaults of new fields: python -m tests.test_identity --update ({unrecorded})"


def test_a_new_field_with_a_default_keeps_identities_and_results(tiny_study, tmp_path, monkeypatch):
    before = load_study(tiny_study).trials
    store = ResultStore(tmp_path / "run")
    for spec in before:  # as if the study had run
        store.write_record(spec, "finished", {"test/acc": 0.5})
    # A later harness adds train.warmup_epochs (default 0): every existing trial keeps its identity.
    upgraded = create_model("TrainConfig", __base__=TrainConfig,
                            warmup_epochs=(int, Field(0, ge=0, description="added later")))
    import harness.study.config
    import harness.study.trials
    monkeypatch.setattr(harness.study.trials, "TrainConfig", upgraded)
    monkeypatch.setattr(harness.study.config, "Study", create_model(
        "Study", __base__=harness.study.config.Study, train=(upgraded, Field(default_factory=upgraded))))
    after = load_study(tiny_study).trials
    assert "warmup_epochs" in after[0].config["train"]  # the field is there, at its default
    assert [t.trial_id for t in after] == [t.trial_id for t in before]
    assert ResultStore(tmp_path / "run").finished_ids([t.trial_id for t in after]) == {t.trial_id for t in before}
    # Setting it to something else is a new trial.
    changed = load_study(tiny_study, overrides=["train.warmup_epochs=2"]).trials
    assert not {t.trial_id for t in changed} & {t.trial_id for t in before}


def test_operational_knobs_are_not_part_of_the_identity(tiny_study):
    base = [t.trial_id for t in load_study(tiny_study).trials]
    assert [t.trial_id for t in load_study(tiny_study, overrides=["train.timeout_s=60"]).trials] == base
    assert [t.trial_id for t in load_study(tiny_study, overrides=["train.lr=0.01"]).trials] != base


def test_identity_depends_on_the_math_version(monkeypatch):
    config = load_study_config()
    a = trial_identity(config)
    monkeypatch.setattr("harness.study.trials.MATH_VERSION", 999)
    assert trial_identity(config) != a


def load_study_config() -> dict:
    return {"method": {"name": "baseline"}, "dataset": {"name": "synthfg"}, "backbone": {"name": "resnet18"},
            "train": TrainConfig().model_dump(mode="json"), "seed": 0}


if __name__ == "__main__":
    if sys.argv[1:] == ["--update"]:
        SNAPSHOT.write_text(json.dumps(current_defaults(), indent=1, sort_keys=True) + "\n")
        print(f"wrote {SNAPSHOT}")
    else:
        pytest.main([__file__])
