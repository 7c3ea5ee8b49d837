"""fgvc-harness: a Ray-distributed benchmark harness for fine-grained visual classification.

Data flows one way: study file -> trials -> Ray Tune (``harness.orchestrate``, the only package that
imports Ray) -> training engine with a method plugin -> results store -> reports. The layers and who may import
whom: docs/architecture.md (tests/test_layers.py checks them).

The Python API (harness.api): ``harness.run_study(path, profile=..., overrides=[...], **options)`` runs a study and
returns a ``StudyResults`` (results and curves as DataFrames, the tables, the findings, the report's folder);
``harness.load_results(run_dir)`` reads a stored run.
"""

from typing import TYPE_CHECKING

from harness.core.lazy import lazy_exports
from harness.core.versions import MATH_VERSION, __version__  # noqa: F401

if TYPE_CHECKING:
    from harness.api import StudyResults, load_results, run_study  # noqa: F401

_EXPORTS = {"run_study": "harness.api", "load_results": "harness.api", "StudyResults": "harness.api"}
__all__ = ["MATH_VERSION", "__version__", *_EXPORTS]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
