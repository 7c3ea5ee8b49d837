"""What a report reads from a run folder, checked row by row: the report survives any one bad trial (issue 26).

results.parquet and curves.parquet are rebuilt from each trial's stored record, and a run folder is shared (copied
in, on NFS): one record may hold a metric that is text, a seed that is not a number, a trial id that is a path.
`checked_results` keeps every well-formed row as it is (numbers stay the numbers the trial produced) and leaves out
the rows that cannot be tabled, naming each on stderr; `checked_curves` keeps the epochs whose epoch and value are
numbers. A column whose values were stored as text because one record was bad reads as numbers again.
"""

from __future__ import annotations

import math
import sys

import pandas as pd

from harness.core.escape import printable
from harness.core.paths import identity_problem

METRIC_PREFIXES = ("test/", "val/", "train/", "inference/", "attention/", "test_hflip/", "test_vflip/")
NUMBER_COLUMNS = ("seed", "epoch", "best_epoch", "wall_time_s", "cpu_time_s", "world_size", "workers", "params",
                  "num_classes", "optimizer_steps")
TEXT_SUFFIXES = ("/correct", "/set_hash", "/members", "_split", "/map", "/device")  # text a trial stores


def _is_metric(column: str) -> bool:
    if column in NUMBER_COLUMNS:
        return True
    return column.startswith(METRIC_PREFIXES) and not column.endswith(TEXT_SUFFIXES)


def _warn(text: str) -> None:
    print(printable(f"warning: {text}"), file=sys.stderr)


def checked_results(results: pd.DataFrame, source: str) -> pd.DataFrame:
    """`results` without the rows the report cannot table (said on stderr), metric columns as numbers."""
    if results.empty:
        return results
    out = results.copy()
    bad = pd.Series(False, index=out.index)
    for column in [c for c in out.columns if isinstance(c, str) and _is_metric(c)
                   and not pd.api.types.is_numeric_dtype(out[c]) and not pd.api.types.is_bool_dtype(out[c])]:
        numbers = pd.to_numeric(out[column].map(lambda v: v if not isinstance(v, bool) else float("nan")),
                                errors="coerce")
        unreadable = out[column].notna() & numbers.isna()
        for trial in out.loc[unreadable, "trial_id"] if "trial_id" in out else []:
            _warn(f"{source}: trial {str(trial)[:60]!r}: {column} is not a number; left out of that column")
        out[column] = numbers
    if "trial_id" in out:
        ids = out["trial_id"].map(identity_problem)
        for problem in ids.dropna():
            _warn(f"{source}: a row left out of the report: {problem}")
        bad |= ids.notna()
    if "seed" in out:
        seeds = out["seed"]
        whole = seeds.map(lambda s: isinstance(s, (int, float)) and math.isfinite(s) and float(s).is_integer())
        for trial in out.loc[~whole & ~bad, "trial_id"] if "trial_id" in out else []:
            _warn(f"{source}: trial {trial}: its seed is not a whole number; left out of the report")
        bad |= ~whole
    if "status" in out:
        bad |= ~out["status"].map(lambda s: isinstance(s, str))
    return out[~bad].reset_index(drop=True) if bad.any() else out


def checked_curves(curves: pd.DataFrame) -> pd.DataFrame:
    """The epochs of curves.parquet whose epoch and value are numbers (a bad trial's others are left out)."""
    if curves.empty or not {"epoch", "value"} <= set(curves.columns):
        return curves
    epoch, value = pd.to_numeric(curves["epoch"], errors="coerce"), pd.to_numeric(curves["value"], errors="coerce")
    keep = epoch.notna() & value.notna()
    if keep.all():
        return curves
    _warn(f"curves.parquet: {int((~keep).sum())} epochs whose epoch or value is not a number are left out")
    return curves[keep].assign(epoch=epoch[keep], value=value[keep]).reset_index(drop=True)
