"""Studies as data: the strict schema (config), the bounded YAML reader (reader), errors with file:line (errors),
profiles and --set overrides (overrides), the expansion into trials with their identities (trials), the search space
and plan (search_space, search), the paper's findings (findings), and load_study, which ties them together (load).
"""

from typing import TYPE_CHECKING

from harness.core.lazy import lazy_exports

if TYPE_CHECKING:  # what the names are, for readers and IDEs; imported when first used
    from harness.study.config import Study, TrainConfig, Resources, TableSpec, ReportConfig, MAX_TRIALS  # noqa: F401
    from harness.study.load import load_study  # noqa: F401
    from harness.study.errors import StudyError, Where  # noqa: F401
    from harness.study.trials import ResolvedStudy, TrialSpec, TrialConfig, trial_identity, identity_config  # noqa: F401
    from harness.study.search_space import SearchConfig  # noqa: F401
    from harness.study.search import SearchPlan, SearchUnit  # noqa: F401
    from harness.study.findings import Finding  # noqa: F401

_EXPORTS = {name: module for module, names in {
    'harness.study.config': ['Study', 'TrainConfig', 'Resources', 'TableSpec', 'ReportConfig', 'MAX_TRIALS'],
    'harness.study.load': ['load_study'],
    'harness.study.errors': ['StudyError', 'Where'],
    'harness.study.trials': ['ResolvedStudy', 'TrialSpec', 'TrialConfig', 'trial_identity', 'identity_config'],
    'harness.study.search_space': ['SearchConfig'],
    'harness.study.search': ['SearchPlan', 'SearchUnit'],
    'harness.study.findings': ['Finding'],
}.items() for name in names}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
