"""A run's results on disk: one record per trial, results.parquet and curves.parquet rebuilt from them, the run lock
(store).
"""

from typing import TYPE_CHECKING

from harness.core.lazy import lazy_exports

if TYPE_CHECKING:  # what the names are, for readers and IDEs; imported when first used
    from harness.results.store import ResultStore, RunLock, RunLocked, FINISHED, FAILED, STOPPED, versions, git_commit  # noqa: F401

_EXPORTS = {name: module for module, names in {
    'harness.results.store': ['ResultStore', 'RunLock', 'RunLocked', 'FINISHED', 'FAILED', 'STOPPED', 'versions',
                              'git_commit'],
}.items() for name in names}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
