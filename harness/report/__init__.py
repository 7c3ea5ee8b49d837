"""Reports from stored results: the paper-layout tables (tables) with honest statistics (stats), the paper's findings
(findings), plots (plots), the protocol beside the paper's (protocol), the search's section (search), the HTML page
(html), and build_reports, which writes them all (build).
"""

from typing import TYPE_CHECKING

from harness.core.lazy import lazy_exports

if TYPE_CHECKING:  # what the names are, for readers and IDEs; imported when first used
    from harness.report.build import build_reports, compare_runs, load_run, ReportError  # noqa: F401
    from harness.report.tables import paper_table, head_table, LEGEND  # noqa: F401
    from harness.report.stats import compare_column, summarize  # noqa: F401
    from harness.report.findings import evaluate  # noqa: F401

_EXPORTS = {name: module for module, names in {
    'harness.report.build': ['build_reports', 'compare_runs', 'load_run', 'ReportError'],
    'harness.report.tables': ['paper_table', 'head_table', 'LEGEND'],
    'harness.report.stats': ['compare_column', 'summarize'],
    'harness.report.findings': ['evaluate'],
}.items() for name in names}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
