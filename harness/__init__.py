"""fgvc-harness: a Ray-distributed benchmark harness for fine-grained visual classification.

Data flows one way: study file -> trials -> Ray Tune (``harness.orchestrate``, the only package that
imports Ray) -> training engine with a method plugin -> results store -> reports.
"""

from harness.core.versions import MATH_VERSION, __version__  # noqa: F401
