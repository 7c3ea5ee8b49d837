"""index.html: one self-contained page per study run (opens from disk: no server, no network; images are
inlined as data URIs), rendered from report_template.html with jinja2.

It holds the study and profile, every table with its statistics and paper references, the localisation
tables, every head's accuracy, the plots and learning curves, the maps of each ablation cell on the
study's fixed test images, the protocol beside the paper's, each trial with its wall time and
device-hours, the failed trials with their errors, and the run's metadata (run.json).
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from harness.core.versions import __version__
from harness.core.bounded import npz_problem
from harness.core.escape import printable, redact_uri
from harness.core.paths import UnsafePath, identity_problem, own_path
from harness.report.protocol import compare, describe
from harness.core.atomic import atomic_write_bytes
from harness.results.store import FAILED
from harness.report import search as search_report
from harness.report.tables import LEGEND

MAP_PX = 96  # each map is shown at this size (nearest neighbour: small test images stay crisp)


def _png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode()


def _overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """(3, H, W) uint8 image and an (H, W) map in [0, 1] -> (H, W, 3) uint8: the map in jet over the image."""
    from matplotlib import colormaps

    rgb = image.transpose(1, 2, 0).astype(np.float32) / 255
    colour = colormaps["jet"](np.clip(heat.astype(np.float32), 0, 1))[..., :3]
    return (255 * (0.5 * rgb + 0.5 * colour)).clip(0, 255).astype(np.uint8)


def _with_box(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    picture = Image.fromarray(image.transpose(1, 2, 0).copy())
    x0, y0, x1, y1 = (float(v) for v in box)
    ImageDraw.Draw(picture).rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=(255, 32, 32), width=1)
    return np.asarray(picture)


MAX_MAPS_BYTES = 512 << 20  # a trial's maps.npz: 32 images of 448 px with a dozen maps is ~100 MB


def _maps_path(run_dir: Path, trial_id: object) -> Path | str:
    """trials/<id>/maps.npz of a row, or why it is not read: results.parquet is stored data, so the id is checked
    before it is joined, and the folder must be the run's own (no link out of it)."""
    problem = identity_problem(trial_id)
    if problem:
        return f"trial id {problem}"
    try:
        return own_path(run_dir, "trials", str(trial_id), "maps.npz")
    except UnsafePath as e:
        return str(e)


def maps_of_trial(path: Path, label: str) -> dict | None:
    """A trial's maps.npz as rows of PNGs (one row per map, one column per image); None when it has none. A file
    that cannot be read (corrupt, a link, a header claiming more than it holds, images of no pixels) costs its
    maps, not the report: the cell says "maps unreadable: <reason>" (and so does stderr)."""
    if not os.path.lexists(path):
        return None
    if os.path.islink(path):
        problem = "a symbolic link (a trial's maps are a file of its own)"
    else:
        problem = npz_problem(path, MAX_MAPS_BYTES)
    if problem is None:
        try:
            return _maps_of_trial(path, label)
        except Exception as e:  # noqa: BLE001 - any one bad trial costs its maps, never the page
            problem = f"{type(e).__name__}: {str(e)[:200]}"
    print(printable(f"warning: {path}: maps unreadable, left out of the report ({problem})"), file=sys.stderr)
    return {"label": label, "error": f"maps unreadable: {problem}", "images": [], "rows": []}


def _maps_of_trial(path: Path, label: str) -> dict:
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    images = arrays["images"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3 or not 0 < images.shape[0] <= 64 \
            or not all(0 < side <= 4096 for side in images.shape[2:]):
        raise ValueError(f"images of shape {images.shape} and type {images.dtype}: expected (N, 3, H, W) uint8 "
                         "with 1 to 64 images of 1 to 4096 px")
    scale = max(1, MAP_PX // images.shape[-1])

    def big(rgb: np.ndarray) -> np.ndarray:
        return np.kron(rgb, np.ones((scale, scale, 1), dtype=np.uint8)) if scale > 1 else rgb

    rows = []
    for key, values in arrays.items():
        if not key.startswith("map:"):
            continue
        values = np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        if values.ndim == 3 and values.shape == (images.shape[0], *images.shape[2:]):
            shown = [_png(big(_overlay(img, m))) for img, m in zip(images, values)]
        elif values.shape == (images.shape[0], 4):
            shown = [_png(big(_with_box(img, b))) for img, b in zip(images, values)]
        else:
            raise ValueError(f"{printable(key)[:80]} of shape {values.shape} does not fit images {images.shape}")
        rows.append({"name": key[4:], "images": shown})
    originals = [_png(big(img.transpose(1, 2, 0))) for img in images]
    return {"label": label, "images": originals, "rows": rows}


def _device_hours(results: pd.DataFrame, resources: dict) -> tuple[pd.Series, str]:
    """Per trial: wall time x the devices it held (GPUs when the study asks for them, else CPUs)."""
    workers = results["world_size"].fillna(resources.get("workers", 1)) if "world_size" in results else 1
    per = resources.get("gpu") or resources.get("cpu", 1)
    kind = "GPU-hours" if resources.get("gpu") else "CPU-hours"
    wall = results["wall_time_s"].fillna(0) if "wall_time_s" in results else pd.Series(0.0, index=results.index)
    return wall / 3600 * workers * per, kind


def precision_summary(results: pd.DataFrame) -> str:
    """'fp32 (10 trials)', or each precision with its count and a warning when the trials mix them."""
    if "precision" not in results or results["precision"].dropna().empty:
        return "?"
    counts = results["precision"].dropna().value_counts()
    text = ", ".join(f"{p} ({n} trial{'s' if n > 1 else ''})" for p, n in counts.items())
    requested = sorted(results["precision_requested"].dropna().unique()) if "precision_requested" in results else []
    text += f"; asked for: {', '.join(requested)}" if requested else ""
    return text + ("; the trials mix precisions" if len(counts) > 1 else "")


TIME_PARTS = {"time/start_s": "start (imports, data, model)", "time/train_s": "training",
              "time/eval_s": "evaluations", "time/record_s": "test record (flips, localisation, maps)"}


def time_summary(results: pd.DataFrame) -> str:
    """Where the finished trials' time went, summed over them (each row's time/* columns, harness.engine.loop):
    the overhead around the training is visible beside it."""
    cols = [c for c in TIME_PARTS if c in results]
    if not cols:
        return "? (trials from before the harness recorded it)"
    ok = results[results["status"] == "finished"]
    sums = {c: float(pd.to_numeric(ok[c], errors="coerce").sum()) for c in cols}
    total = sum(sums.values())
    parts = ", ".join(f"{TIME_PARTS[c]} {v:.0f} s ({100 * v / total:.0f}%)" for c, v in sums.items()) if total else ""
    return f"{total:.0f} s in all: {parts}" if parts else "?"


def _metadata(run_dir: Path, results: pd.DataFrame, hours: pd.Series, kind: str) -> list[tuple[str, str]]:
    meta = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    first = results.iloc[0] if len(results) else pd.Series(dtype=object)
    versions = ", ".join(f"{k.removeprefix('version/')} {first[k]}"
                         for k in results.columns if k.startswith("version/"))
    cluster = meta.get("cluster") or {}
    rows = [("trials", f"{int((results['status'] == 'finished').sum())} finished, "
                       f"{int((results['status'] == FAILED).sum())} failed, of {len(results)}"),
            ("last run", f"{meta.get('started', '?')}, {meta.get('wall_time_s', float('nan')):.0f} s wall, "
                         f"{meta.get('trained', '?')} trained, {meta.get('skipped', '?')} skipped"),
            (kind, f"{hours.sum():.3f} in all (wall time x devices of each trial)"),
            ("versions", versions or "?"), ("git commit", str(first.get("git_commit", meta.get("git_commit", "?")))),
            ("hardware", f"{meta.get('cpu', '?')}, {meta.get('cpu_count', '?')} CPUs (driver)" + (
                f"; cluster: {cluster.get('nodes', '?')} nodes, {cluster.get('cpus', '?')} CPUs, "
                f"{cluster.get('gpus', '?')} GPUs {', '.join(cluster.get('gpu_types', []))}" if cluster else
                "; no cluster started by the last run (it trained nothing)")),
            ("precision", precision_summary(results)),
            ("time in the trials", time_summary(results)),
            ("CPUs of the trials", ", ".join(sorted({f"{r['cpu_model']} ({r['cpu_capability']}, "
                                                    f"{'bf16 units' if r['cpu_bf16'] else 'no bf16 units'}, "
                                                    f"{r['threads']:.0f} torch threads)"
                                                    for _, r in results.dropna(subset=["cpu_model"]).iterrows()}))
             if "cpu_model" in results else "?"),
            ("devices of the trials", ", ".join(sorted({str(d) for d in results.get("device_name", pd.Series(dtype=str))
                                                       .dropna()})) or "?"),
            ("driver", f"{meta.get('driver_host', '?')}, "
                       f"peak memory {meta.get('driver_peak_rss_mb', float('nan')):.0f} MB"),
            ("storage", redact_uri(meta.get("storage") or "local")), ("address", str(meta.get("address", "?")))]
    return rows


def _trials_table(results: pd.DataFrame, axes: list[str], hours: pd.Series, kind: str) -> str:
    columns = ["status", *[a for a in axes if a in results], "seed", "test/acc", "test/acc_best", "best_epoch",
               "test/loc/energy", "wall_time_s", "train/images_per_s", "world_size", "node_address"]
    table = results[[c for c in columns if c in results]].copy()
    table[kind] = hours.round(4)
    for c in ("test/acc", "test/acc_best", "test/loc/energy"):
        if c in table:
            table[c] = (100 * table[c]).round(1)
    return table.to_html(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}", border=0)


def _findings_rows(findings: pd.DataFrame | None) -> list[dict]:
    """The paper's findings as the page shows them (harness.report.findings.evaluate's table; text autoescaped)."""
    if findings is None or findings.empty:
        return []

    def signed(v) -> str:
        return "-" if v is None or pd.isna(v) else f"{v:+.1f}"

    out = []
    for r in findings.to_dict("records"):
        ci = "" if r["ci_low"] is None or pd.isna(r["ci_low"]) else f" ({r['ci_low']:+.1f} to {r['ci_high']:+.1f})"
        p = "-" if r["p_adjusted"] is None or pd.isna(r["p_adjusted"]) else f"{r['p_adjusted']:.3g}"
        out.append({"claim": r["claim"], "source": r["source"] or "-", "paper": signed(r["paper_effect"]),
                    "run": signed(r["effect"]) + ci, "seeds": r["seeds"], "p": p, "verdict": r["verdict"],
                    "direction": "" if r["direction"] is None or r["verdict"] in ("agrees", "contradicts") else
                    (" (same direction)" if r["direction"] else " (opposite direction)")})
    return out


def write_html(out: Path, run_dir: Path, study: dict, results: pd.DataFrame, tables: dict, localisation: dict,
               heads: pd.DataFrame, axes: list[str], search: list[dict] | None = None,
               findings: pd.DataFrame | None = None) -> Path:
    """Render index.html into `out` (the report folder, whose PNG plots it inlines)."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    resources = study.get("resources") or {}
    hours, kind = _device_hours(results, resources)
    cells = []
    for _, row in results.sort_values([a for a in axes if a in results] + ["seed"]).iterrows():
        label = ", ".join(f"{a.split('.')[-1]}={row[a]}" for a in axes if a in results) + f", seed {row['seed']}"
        path = _maps_path(run_dir, row["trial_id"])
        if isinstance(path, str):  # not read: said in its cell, and on stderr
            print(printable(f"warning: {path}"), file=sys.stderr)
            cell = {"label": label, "error": f"maps unreadable: {path}", "images": [], "rows": []}
        else:
            cell = maps_of_trial(path, label)
        if cell:
            cells.append(cell)
    protocol = None
    if study.get("protocol"):
        rows = compare(study["protocol"], describe(study))
        protocol = {"rows": rows, "summary": f"Paper: {study['protocol'].get('source', 'the paper')}. "
                                             f"{sum(bool(r['differs']) for r in rows)} of {len(rows)} knobs differ."}
    plots = [{"name": p.relative_to(out).as_posix(), "data": base64.b64encode(p.read_bytes()).decode()}
             for p in sorted(out.rglob("*.png")) if p.relative_to(out).parts[0] != "search"]  # search's: its section
    failed = [{"label": ", ".join(f"{a.split('.')[-1]}={r[a]}" for a in axes if a in results) + f", seed {r['seed']}",
               "error": r.get("error", ""),
               "traceback": r.get("traceback", "") if isinstance(r.get("traceback"), str) else ""}
              for _, r in results[results["status"] == FAILED].iterrows()]

    def html(table: pd.DataFrame) -> str:
        return table.to_html(escape=True, border=0, na_rep="-")

    meta = _metadata(run_dir, results, hours, kind)
    # harness.report.build.load_run: stored finished trials the current grid does not hold
    if study.get("_outside_grid"):
        meta.insert(1, ("outside the grid", f"{study['_outside_grid']} more finished trials of this study and profile "
                                            "are kept in results.parquet (in_grid false), not in these tables"))
    env = Environment(loader=FileSystemLoader(Path(__file__).parent), autoescape=select_autoescape(["html"]))
    page = env.get_template("report_template.html").render(
        study=study, meta=meta, legend=LEGEND.replace("`", ""),
        tables=[{"title": name or (metric if isinstance(metric, str) else ", ".join(metric)), "html": html(t),
                 "note": t.attrs.get("note", ""), "power": t.attrs.get("power", "")}
                for name, (t, metric) in tables.items()],
        localisation=[{"title": name or "localisation", "html": html(t), "note": t.attrs.get("note", "")}
                      for name, t in localisation.items()],
        heads=html(heads) if not heads.empty else "", plots=plots, cells=cells,
        n_images=max((len(c["images"]) for c in cells), default=0), map_px=MAP_PX, protocol=protocol,
        trials=_trials_table(results, axes, hours, kind), failed=failed, version=__version__,
        search=search_report.html_entries(search or [], out), findings=_findings_rows(findings),
        run_dir=run_dir)
    path = out / "index.html"
    atomic_write_bytes(path, page.encode())
    return path
