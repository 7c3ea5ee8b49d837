"""A trial on one worker: the training loop (loop: run_trial and the TrialIO seam a runner plugs into), the device's
precision (precision), the interleaved reference workload (reference), where the model looks (explain) and what
inference costs (complexity).
"""

from typing import TYPE_CHECKING

from harness.core.lazy import lazy_exports

if TYPE_CHECKING:  # what the names are, for readers and IDEs; imported when first used
    from harness.engine.loop import run_trial, TrialIO, LocalCheckpoints, lr_factor, set_threads, evaluate  # noqa: F401
    from harness.engine.reference import ReferenceProbe, reference_throughput  # noqa: F401
    from harness.engine.complexity import inference_complexity  # noqa: F401

_EXPORTS = {name: module for module, names in {
    'harness.engine.loop': ['run_trial', 'TrialIO', 'LocalCheckpoints', 'lr_factor', 'set_threads', 'evaluate'],
    'harness.engine.reference': ['ReferenceProbe', 'reference_throughput'],
    'harness.engine.complexity': ['inference_complexity'],
}.items() for name in names}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
