"""The bottom layer: atomic writes, escaping, paths and their guard, bounded reads, the registry, the strict config
base, the per-image records of a test set and the versions. It imports nothing else of harness.
"""

from typing import TYPE_CHECKING

from harness.core.lazy import lazy_exports

if TYPE_CHECKING:  # what the names are, for readers and IDEs; imported when first used
    from harness.core.atomic import atomic_write, atomic_write_bytes  # noqa: F401
    from harness.core.escape import printable, scrub, redact_uri, markdown_cell, markdown_frame, latex, csv_frame  # noqa: F401
    from harness.core.paths import inside, UnsafePath, name_problem, identity_problem, own_path  # noqa: F401
    from harness.core.bounded import BoundedReadError, read_bytes, read_text, read_json  # noqa: F401
    from harness.core.registry import Registry, RegistryError, did_you_mean  # noqa: F401
    from harness.core.schema import ConfigModel  # noqa: F401
    from harness.core.records import pack_correct, unpack_correct, split_hash  # noqa: F401
    from harness.core.versions import MATH_VERSION, __version__  # noqa: F401

_EXPORTS = {name: module for module, names in {
    'harness.core.atomic': ['atomic_write', 'atomic_write_bytes'],
    'harness.core.escape': ['printable', 'scrub', 'redact_uri', 'markdown_cell', 'markdown_frame', 'latex',
                            'csv_frame'],
    'harness.core.paths': ['inside', 'UnsafePath', 'name_problem', 'identity_problem', 'own_path'],
    'harness.core.bounded': ['BoundedReadError', 'read_bytes', 'read_text', 'read_json'],
    'harness.core.registry': ['Registry', 'RegistryError', 'did_you_mean'],
    'harness.core.schema': ['ConfigModel'],
    'harness.core.records': ['pack_correct', 'unpack_correct', 'split_hash'],
    'harness.core.versions': ['MATH_VERSION', '__version__'],
}.items() for name in names}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
