"""The report's seaborn plots: a metric against each grid axis, and the learning curves (harness.report.build calls
them).
"""

from __future__ import annotations
from pathlib import Path
import pandas as pd
from harness.core.escape import (one_line)
from harness.core.paths import inside
from harness.core.atomic import atomic_write_bytes
from harness.results.store import FINISHED
from harness.report.tables import LEGEND, add_references, head_table, is_percent, paper_table  # noqa: F401 - the table API


def combined_axis(df: pd.DataFrame, axes: list[str]) -> tuple[pd.DataFrame, str | None]:
    """One string column standing for several axes (for a plot's hue or style)."""
    axes = [a for a in axes if a in df.columns]
    if not axes:
        return df, None
    if len(axes) == 1:  # one line, no control characters: a label reaches a legend
        return df.assign(**{axes[0]: df[axes[0]].astype(str).map(one_line)}), axes[0]
    name = ", ".join(a.split(".")[-1] for a in axes)
    return df.assign(**{name: df[axes].astype(str).agg(", ".join, axis=1).map(one_line)}), name


def write_plots(results: pd.DataFrame, curves: pd.DataFrame, axes: list[str], rows: str | None,
                columns: str | list[str] | None, metric: str, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    matplotlib.rcParams["text.parse_math"] = False  # a label such as $\undefined{x}$ is text, not mathtext
    cols = [columns] if isinstance(columns, str) else list(columns or [])
    written = []
    finished = results[results["status"] == FINISHED].copy()
    for axis in [a for a in axes if a in finished and not pd.api.types.is_numeric_dtype(finished[a])]:  # one line
        finished[axis] = finished[axis].map(lambda v: one_line(v) if isinstance(v, str) else v)
    if metric in finished.columns and is_percent(metric):
        finished[metric] = finished[metric] * 100
    for axis in axes:
        if finished.empty or metric not in finished.columns:
            break
        others = [a for a in cols if a != axis] or [a for a in (rows,) if a and a != axis]
        data, hue = combined_axis(finished, others)
        fig, ax = plt.subplots(figsize=(6, 4))
        dodge = 0.2 if hue and data[hue].nunique() > 1 else False
        sns.pointplot(data=data, x=axis, y=metric, hue=hue, errorbar="sd", dodge=dodge, ax=ax)
        ax.set(ylabel=f"{metric}" + (" (%)" if is_percent(metric) else ""), title=f"{metric} against {axis}")
        written.append(_save(fig, inside(out, f"{metric.replace('/', '_')}_vs_{axis.replace('.', '_')}.png")))
    if not curves.empty:
        panels = [m for m in ("test/acc", "train/loss") if m in set(curves["metric"])]
        fig, axs = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
        for ax, m in zip(axs[0], panels):
            data = curves[curves["metric"] == m]
            data = data.assign(value=data["value"] * (100 if m.startswith("test/acc") else 1))
            data, hue = combined_axis(data, [rows] if rows else [])
            data, style = combined_axis(data, cols)
            sns.lineplot(data=data, x="epoch", y="value", hue=hue, style=style, errorbar="sd", ax=ax)
            ax.set(ylabel=m + (" (%)" if m.startswith("test/acc") else ""), title=f"learning curves: {m}")
        written.append(_save(fig, inside(out, "learning_curves.png")))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt
    import io
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path
