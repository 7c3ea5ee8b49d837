"""A study's `findings:` section as data: its paper's ablation claims, each a comparison between cells or groups of
cells (harness.report.findings evaluates them on a run).
"""

from __future__ import annotations
from typing import Any, Literal
import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class PaperNumbers(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    better: float | None = Field(None, description="the paper's value of the `better` side (in %)")
    worse: float | None = Field(None, description="the paper's value of the `worse` side (in %)")
    effect: float | None = Field(None, description="the paper's difference better - worse (points)")

    def difference(self) -> float | None:
        if self.effect is not None:
            return self.effect
        return None if self.better is None or self.worse is None else self.better - self.worse


class Finding(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    claim: str = Field(..., min_length=1, max_length=300, description="what the paper says, in its words")
    source: str = Field("", max_length=200, description="where the paper says it (section, table)")
    better: dict[str, Any] = Field(..., min_length=1, description="the side the paper finds higher: axes -> values")
    worse: dict[str, Any] = Field(..., min_length=1, description="the side it finds lower (or not higher)")
    relation: Literal["better", "not_better"] = Field("better", description=(
        "better: `better` > `worse`; not_better: `better` brings no advantage over `worse`"))
    metric: str = Field("test/acc", pattern=r"^[A-Za-z0-9_.@/-]{1,200}$")
    grid: str | None = Field(None, description="with `grids:`, the named grid whose trials the finding compares")
    margin: float = Field(1.0, gt=0.0, le=100.0, description="not_better: points within which 'no advantage' holds")
    paper: PaperNumbers | None = None


def problems(findings: list[Finding], grid: dict[str, list], grids: dict[str, dict[str, list]]) -> list[str]:
    """What a study's findings name that its grids cannot hold: an unknown grid, an axis no grid varies, a value
    the axis never takes (said at load time, before anything trains)."""
    out = []
    for i, f in enumerate(findings):
        if f.grid is not None and f.grid not in grids:
            out.append(f"findings[{i}].grid: no grid {f.grid!r} (grids: {', '.join(grids) or 'none'})")
            continue
        axes = grids[f.grid] if f.grid is not None else {**grid, **{a: v for g in grids.values() for a, v in g.items()}}
        for side in ("better", "worse"):
            for axis, wanted in getattr(f, side).items():
                if axis not in axes:
                    out.append(f"findings[{i}].{side}: {axis!r} is not a grid axis"
                               f"{f' of grid {f.grid}' if f.grid else ''} (axes: {', '.join(axes) or 'none'})")
                    continue
                values = {_text(v) for v in axes[axis] if not isinstance(v, dict)}
                missing = [v for v in (wanted if isinstance(wanted, list) else [wanted]) if _text(v) not in values]
                if values and missing:
                    out.append(f"findings[{i}].{side}: {axis} never takes {missing[0]!r} (the grid: "
                               f"{', '.join(sorted(values))})")
    return out


def _text(value) -> str:
    """Values compared as the tables print them: True/true/1.0 and their kin made one spelling."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, (int, float, np.integer, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip().lower()
