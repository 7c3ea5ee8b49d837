"""What a method plugin is written against (every file in methods/ imports only this, harness.core and harness.data):
the Method contract and its registry, the staged backbones, the optimizer steps (and the gradient averaging behind
them), per-replica BatchNorm, pretrained weights.
"""

from typing import TYPE_CHECKING

from harness.core.lazy import lazy_exports

if TYPE_CHECKING:  # what the names are, for readers and IDEs; imported when first used
    from harness.plugin.method import (Method, MethodParams, OptimizerSteps, METHODS, register_method,
                                       frozen_batchnorm, linear_cam, TrialDiverged)  # noqa: F401
    from harness.plugin.backbones import StagedBackbone, BackboneConfig, build_backbone  # noqa: F401
    from harness.plugin.distributed import Collective, sync_batchnorm  # noqa: F401
    from harness.plugin.replica_batchnorm import per_replica_batchnorm  # noqa: F401
    from harness.plugin.weights import ensure_weights  # noqa: F401

_EXPORTS = {name: module for module, names in {
    'harness.plugin.method': ['Method', 'MethodParams', 'OptimizerSteps', 'METHODS', 'register_method',
                              'frozen_batchnorm', 'linear_cam', 'TrialDiverged'],
    'harness.plugin.backbones': ['StagedBackbone', 'BackboneConfig', 'build_backbone'],
    'harness.plugin.distributed': ['Collective', 'sync_batchnorm'],
    'harness.plugin.replica_batchnorm': ['per_replica_batchnorm'],
    'harness.plugin.weights': ['ensure_weights'],
}.items() for name in names}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
