"""How a study's layers combine: the file's base, the selected profile, `--set` overrides and `${VAR}`s."""

from __future__ import annotations

import copy
import math
import os
import re
from typing import Any

import yaml

from harness.study import reader as study_yaml
from harness.core.escape import remember_expansion
from harness.study.errors import StudyError


def _deep_merge(base: dict, override: dict) -> dict:
    """Profile overrides merged into the base. A method or dataset section that names a different
    plugin replaces the base section whole: its parameters belong to the other plugin. A backbone that
    names another model keeps the base's backbone settings but not its `kwargs` (arguments of one timm
    model, e.g. the default profile's narrow ResNet-18 widths, which a paper's ResNet-50 must not get)."""
    out = copy.deepcopy(base)
    if (isinstance(override.get("backbone"), dict) and isinstance(out.get("backbone"), dict)
            and override["backbone"].get("name", out["backbone"].get("name")) != out["backbone"].get("name")):
        out["backbone"].pop("kwargs", None)
    for key, value in override.items():
        renamed = (key in ("method", "dataset") and isinstance(value, dict) and isinstance(out.get(key), dict)
                   and value.get("name", out[key].get("name")) != out[key].get("name"))
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("grid", "grids") and not renamed:
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _yield_to_pipeline(study: dict, train_override: Any) -> dict:
    """A profile (or --set) that names a paper's input pipeline gets all of it: the base's values of the keys
    the pipeline sets (e.g. the default profile's 64 px image_size) give way, unless the profile sets them too."""
    if not isinstance(train_override, dict) or not train_override.get("pipeline"):
        return study
    from harness.data.transforms import PRESETS

    preset = PRESETS.get(train_override["pipeline"], {})
    base_train = study.get("train")
    if not isinstance(base_train, dict):
        return study
    kept = {k: v for k, v in base_train.items() if k not in preset or k in train_override}
    return {**study, "train": kept}


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Where a study may name an environment variable: a path (a dataset's root, a backbone's weights file), written as
# the key itself (`root:`, `pretrained:`) or as a grid axis (`dataset.root: [...]`). Nowhere else: `${VAR}` in a
# description, a protocol note or a label stays as written (it would print any secret of the environment into
# --dry-run, study.yaml and the page).
PATH_KEYS = ("root", "pretrained")


def _is_path_key(key: str | None) -> bool:
    return key is not None and str(key).rsplit(".", 1)[-1] in PATH_KEYS


def _interpolate(value: Any, where: str, key: str | None = None) -> Any:
    """`${VAR}` replaced by the environment's value in the path fields (PATH_KEYS) only; each expansion is
    remembered so that everything printed or stored shows `${VAR}`, never its value (harness.core.escape.scrub)."""
    if isinstance(value, dict):
        return {k: _interpolate(v, f"{where}.{k}" if where else k, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{where}[{i}]", key) for i, v in enumerate(value)]
    if isinstance(value, str) and _is_path_key(key):
        def sub(m: re.Match) -> str:
            if m.group(1) not in os.environ:
                raise StudyError(f"{where}: environment variable {m.group(1)} is not set; export it "
                                 f"(e.g. export {m.group(1)}=/data/...) or override with --set {where}=VALUE")
            remember_expansion(m.group(1), os.environ[m.group(1)])
            return os.environ[m.group(1)]
        return _ENV.sub(sub, value)
    return value


MAX_KEY_PARTS = 16


def set_dotted(config: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict. `grid.<axis>` keeps the dotted axis name as one key."""
    keys = dotted.split(".")
    if not dotted or len(dotted) > 200 or len(keys) > MAX_KEY_PARTS or not all(keys):
        raise StudyError(f"--set {dotted!r}: give a dotted key of at most {MAX_KEY_PARTS} parts, "
                         "e.g. --set train.epochs=2")
    if dotted.startswith("grid."):
        if not isinstance(config.get("grid") or {}, dict):
            raise StudyError(f"--set {dotted}: 'grid' is not a section")
        config["grid"] = config.get("grid") or {}
        config["grid"][dotted[len("grid."):]] = value
        return
    if len(keys) == 2 and keys[0] in ("method", "dataset") and keys[1] == "name" and \
            isinstance(config.get(keys[0]), dict) and config[keys[0]].get("name") != value:
        config[keys[0]] = {"name": value}  # another plugin: the old one's parameters do not apply
        return
    node = config
    for key in keys[:-1]:
        if node.get(key) is None:  # absent, or an empty section (`train:` with nothing under it)
            node[key] = {}
        if not isinstance(node[key], dict):
            raise StudyError(f"--set {dotted}: '{key}' is not a section")
        node = node[key]
    node[keys[-1]] = value


def get_dotted(config: dict, dotted: str) -> Any:
    node: Any = config
    for key in dotted.split("."):
        node = node[key]
    return node


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise StudyError(f"--set {text!r}: expected dotted.key=value, e.g. --set train.epochs=2")
    key, raw = text.split("=", 1)
    if len(raw) > 65_536:
        raise StudyError(f"--set {key.strip()}: the value is longer than 65,536 characters")
    try:
        return key.strip(), study_yaml.load(raw, f"--set {key.strip()}")[0] if raw.strip() else ""
    except (yaml.YAMLError, study_yaml.StudyFileError) as e:
        raise StudyError(f"--set {text!r}: the value is not valid YAML: {e}") from None


def non_finite(value: Any, where: str = "") -> str | None:
    """The dotted path of the first infinity or NaN anywhere in the study (None when there is none): every
    number of a study is finite, in sections no schema types too (backbone.kwargs, protocol, grid values)."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "(the value)"
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for k, v in items:
        found = non_finite(v, f"{where}{k}" if str(k).startswith("[") else f"{where}.{k}" if where else str(k))
        if found:
            return found
    return None
