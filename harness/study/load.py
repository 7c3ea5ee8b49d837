"""Loading a study file: read it within bounds, merge a profile and --set overrides, validate strictly, expand it into
trials (and a search's plan). Any invalid input raises StudyError naming the file, the key and its line, what is
allowed, and the closest valid key.
"""

from __future__ import annotations
import os
import sys
import warnings
from pathlib import Path
import yaml
from pydantic import ValidationError
from harness.study import reader as study_yaml
from harness.core.escape import printable
from harness.core.paths import name_problem, table_names_problem
from harness.core.registry import RegistryError, did_you_mean
from harness.study.errors import StudyError, Where, format_errors
from harness.study.overrides import (_deep_merge, _interpolate, _yield_to_pipeline, non_finite, parse_override,
                                     set_dotted)
from harness.study import config
from harness.study.config import MAX_TRIALS


def _check_names(merged: dict, where: Where) -> None:
    """Study and table names (profile names are checked first) become folders and files: harness.core.paths'
    safe-name rule, with the line."""
    if isinstance(merged.get("tables"), dict):
        for table in merged["tables"]:
            problem = name_problem(table)
            if problem:
                raise StudyError(f"{where.at(('tables', table))}table name {problem}")
        problem = table_names_problem(list(merged["tables"]))  # the report's own files, and each other's
        if problem:
            raise StudyError(f"{where.at(('tables',))}{problem}")
    if "name" in merged:
        problem = name_problem(merged["name"])
        if problem:
            raise StudyError(f"{where.at(('name',))}study name {problem}")


def load_study(path: str | os.PathLike, profile: str | None = None, overrides: tuple[str, ...] | list[str] = (),
               max_trials: int = MAX_TRIALS, on_count=None):
    """Load and fully validate a study. Returns a ResolvedStudy with its trials; raises StudyError.

    A grid of more than `max_trials` trials is refused before it is expanded; `on_count(n)`, when given, hears
    the count first (`--dry-run` prints it before a long expansion)."""
    from harness.study.trials import resolve  # trials depend on the study schema, not the other way round

    path = Path(path)
    try:
        found = path.is_file()
    except (OSError, ValueError):  # a name the OS cannot take (a NUL byte, too long)
        found = False
    if not found:
        raise StudyError(f"study file not found: {path} (studies live in studies/, e.g. studies/pmg_ablation.yaml)")
    try:
        raw, lines = study_yaml.load(study_yaml.read_text(path), str(path))
    except study_yaml.StudyFileError as e:
        raise StudyError(str(e)) from None
    except yaml.YAMLError as e:
        raise StudyError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: a study file must be a mapping with at least 'name' and 'method'")
    if profile is not None and name_problem(profile):
        raise StudyError(f"--profile: {name_problem(profile)}")

    profiles = raw.get("profiles") or {}
    if not isinstance(profiles, dict):
        raise StudyError(f"{path}: 'profiles' must map profile names to overrides")
    for name in profiles:
        if name_problem(name):
            raise StudyError(f"{Where(str(path), lines, None).at(('profiles', name))}profile name {name_problem(name)}")
    selected = profile or "default"
    if profile not in (None, "default") and profile not in profiles:
        hint = did_you_mean(profile, profiles)
        raise StudyError(f"{path}: no profile '{profile}': {hint}(profiles: default, {', '.join(profiles) or 'none'})")
    merged = {k: v for k, v in raw.items() if k != "profiles"}
    if selected in profiles:
        if not isinstance(profiles[selected], dict):
            raise StudyError(f"{path}: profile '{selected}' must be a mapping of overrides")
        merged = _deep_merge(_yield_to_pipeline(merged, profiles[selected].get("train")), profiles[selected])
    for text_override in overrides:
        key, value = parse_override(text_override)
        if key == "train.pipeline":
            later = {k.removeprefix("train.") for k, _ in map(parse_override, overrides) if k.startswith("train.")}
            merged = _yield_to_pipeline(merged, {**{k: None for k in later}, "pipeline": value})
        set_dotted(merged, key, value)
    merged = _interpolate(merged, "")
    where = Where(str(path), lines, selected if selected in profiles else None)
    _check_names(merged, where)
    bad = non_finite({**merged, "profiles": profiles})
    if bad:
        raise StudyError(f"{where.at(tuple(bad.replace('[', '.[').split('.')))}{bad}: infinity and NaN are not "
                         "allowed in a study; give a finite number")
    with warnings.catch_warnings(record=True) as caught:  # deprecations, said once per study with its file
        warnings.simplefilter("always", FutureWarning)
        try:
            study = config.Study.model_validate({**merged, "profiles": profiles})
        except ValidationError as e:
            raise StudyError(format_errors(e, config.Study, (), where)) from None
        study.path, study.profile = str(path), selected
        try:
            resolved = resolve(study, where, max_trials=max_trials, on_count=on_count)
            if study.search is not None:  # every knob checked against every method it tunes, before anything runs
                from harness.study.search import plan_search
                resolved.search = plan_search(study, resolved, where, max_trials)
        except RegistryError as e:
            raise StudyError(f"{path}: {e}") from None
    for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, FutureWarning)):
        print(printable(f"{path}: {message}"), file=sys.stderr)
    return resolved
