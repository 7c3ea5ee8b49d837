"""A study's training protocol, one line per knob, beside the paper's.

A study file may state the paper's protocol (`protocol:`, top level: the paper does not change with
the profile), knob by knob in the words `describe` uses, each a value or `{value: ..., note: ...}`,
with a `source:`. The report and `--dry-run` print it beside what the selected profile actually runs,
and mark every knob that differs, so a user sees at a glance how far a profile is from the paper.
"""

from __future__ import annotations

from typing import Any

from harness.core.escape import markdown_cell, markdown_text

KNOBS = ("backbone", "input", "augmentation", "normalisation", "optimizer", "lr", "schedule", "epochs", "batch",
         "precision", "reported")


def _g(x: float) -> str:
    return f"{x:g}"


def describe(study: dict) -> dict[str, str]:
    """The protocol a resolved study (or its study.yaml) runs, in the vocabulary of `KNOBS`."""
    method, backbone, train = study["method"], study["backbone"], study["train"]
    pretrained = backbone.get("pretrained")
    weights = "from scratch" if not pretrained else ("pretrained" if pretrained is True else f"weights {pretrained}")
    stem = ", stem after max pool" if backbone.get("stem_pooled") else ""
    stored = train.get("resize") or train["image_size"]
    pad = f", padding {train['crop_padding']}" if train.get("crop_padding") else ""
    augmentation = []
    if train.get("random_scale"):
        augmentation.append(f"rescale x[{_g(train['random_scale'][0])}, {_g(train['random_scale'][1])}]")
    augmentation.append("random crop")
    if train.get("hflip", True):
        augmentation.append("flip")
    jitter = train.get("colour_jitter") or [0, 0, 0, 0]
    augmentation += [f"{name} {_g(v)}" for name, v in zip(("brightness", "contrast", "saturation", "hue"), jitter) if v]
    scale = float(method.get("backbone_lr_scale", 1.0))
    lr = float(train["lr"])
    lrs = f"{_g(lr)} new layers, {_g(lr * scale)} backbone" if scale != 1 else f"{_g(lr)} all layers"
    schedule = {"cosine": "cosine per epoch",
                "step": f"x{_g(train.get('gamma', 0.9))} every {train.get('step_size', 2)} epochs",
                "poly": f"poly {_g(train.get('poly_power', 0.9))} to {_g(train.get('end_lr', 1e-6))}",
                "constant": "constant"}[train.get("schedule", "cosine")]
    metric = _first_metric(study)
    return {
        "backbone": f"{backbone['name']} ({weights}{stem})",
        "input": f"{stored} -> {train['image_size']}{pad}",
        "augmentation": ", ".join(augmentation),
        "normalisation": {"half": "(x - 0.5) / 0.5",
                          "imagenet": "ImageNet mean/std"}[train.get("normalize", "imagenet")],
        "optimizer": f"SGD momentum {_g(train.get('momentum', 0.9))}, "
                     f"weight decay {_g(train.get('weight_decay', 5e-4))}"
                     + (", nesterov" if train.get("nesterov") else ""),
        "lr": lrs,
        "schedule": schedule,
        "epochs": str(train["epochs"]),
        "batch": str(train["batch_size"]),
        "precision": {"auto": "auto (bf16 autocast where native, else fp32)", "fp32": "fp32",
                      "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[train.get("precision", "auto")],
        "reported": ("best epoch" + _tested(train.get("eval_epochs"))) if "acc_best" in metric else "last epoch",
    }


def _tested(ranges: list | None) -> str:
    """' of 1-5, 81-200' for train.eval_epochs [[1, 5], [81, 200]]; '' when every epoch may be the best."""
    if not ranges:
        return ""
    return " of " + ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in ranges)


def _first_metric(study: dict) -> str:
    tables = list((study.get("tables") or {}).values()) or ([study["table"]] if study.get("table") else [])
    if not tables:
        return "test/acc"
    metric = tables[0].get("metric", "test/acc") if isinstance(tables[0], dict) else "test/acc"
    return metric if isinstance(metric, str) else metric[0]


def compare(paper: dict[str, Any], ours: dict[str, str]) -> list[dict[str, str]]:
    """Rows knob, paper, ours, differs ('yes'/''), note: every knob the paper states (in KNOBS order first)."""
    rows = []
    for knob in [k for k in KNOBS if k in paper] + [k for k in paper if k not in KNOBS and k != "source"]:
        stated = paper[knob]
        value, note = (stated.get("value"), stated.get("note", "")) if isinstance(stated, dict) else (stated, "")
        mine = ours.get(knob, "-")
        differs = " ".join(str(value).split()) != " ".join(mine.split())
        rows.append({"knob": knob, "paper": str(value), "ours": mine, "differs": "yes" if differs else "",
                     "note": str(note)})
    return rows


def protocol_markdown(study: dict) -> str:
    """The protocol table of a study (empty when it states no paper protocol)."""
    paper = study.get("protocol") or {}
    if not paper:
        return ""
    rows = compare(paper, describe(study))
    source = markdown_text(paper.get("source", "the paper"))  # one line, no raw HTML
    lines = [f"Paper: {source}. Profile run: {markdown_text(study.get('profile', 'default'))}. "
             f"{sum(r['differs'] == 'yes' for r in rows)} of {len(rows)} knobs differ (marked **≠**).", "",
             "| knob | paper | ours | | note |", "| --- | --- | --- | --- | --- |"]
    cell = markdown_cell  # a `|` in a value would start a new column
    lines += [f"| {cell(r['knob'])} | {cell(r['paper'])} | {cell(r['ours'])} | {'**≠**' if r['differs'] else ''} | "
              f"{cell(r['note'])} |" for r in rows]
    return "\n".join(lines) + "\n"
