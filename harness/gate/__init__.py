"""The CI regression gate: the decision on numbers (rules) and the command that reads runs and baselines (cli; python
-m harness.gate).
"""

from typing import TYPE_CHECKING

from harness.core.lazy import lazy_exports

if TYPE_CHECKING:  # what the names are, for readers and IDEs; imported when first used
    from harness.gate.cli import main, measure, write_baseline, load_baseline  # noqa: F401
    from harness.gate.rules import Baseline, BaselineCell, CellRun, Rules, judge, GateInputError  # noqa: F401

_EXPORTS = {name: module for module, names in {
    'harness.gate.cli': ['main', 'measure', 'write_baseline', 'load_baseline'],
    'harness.gate.rules': ['Baseline', 'BaselineCell', 'CellRun', 'Rules', 'judge', 'GateInputError'],
}.items() for name in names}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
