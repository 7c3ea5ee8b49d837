"""Reading a study file, or a --set value, with bounds: a shared study file may be careless or hostile.

- The file is read as UTF-8 (a BOM is allowed), at most MAX_BYTES; anything else is an error naming the line.
- Nesting is limited to MAX_DEPTH levels while the YAML is composed (PyYAML's composer recurses: 5,000 levels
  would be a RecursionError), and the document's size with every alias expanded is computed from the node
  graph before anything is built from it (a 773-byte "billion laughs" expands to 10^9 nodes): above
  MAX_NODES it is refused.
- Only plain YAML data is built (PyYAML's SafeLoader: no Python objects).
- A key written twice in one mapping is an error naming both lines (YAML would silently keep the last).

`load(text, source)` returns the data and the line of every key path (for file:line messages).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1 << 20  # a large study is ~10 kB
MAX_DEPTH = 64  # the deepest shipped study nests 6 levels
MAX_NODES = 200_000  # every alias expanded; a 10,000-trial grid written out is ~30,000 nodes


class StudyFileError(ValueError):
    """A study file (or --set value) that cannot be read safely; the message names the file and line."""


def read_text(path: str | Path) -> str:
    """The file's text: UTF-8, at most MAX_BYTES."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise StudyFileError(f"{path}: {size:,} bytes; a study file is at most {MAX_BYTES:,} bytes")
        data = path.read_bytes()[:MAX_BYTES + 1]
    except OSError as e:
        raise StudyFileError(f"{path}: cannot read it ({e.strerror or e})") from None
    if len(data) > MAX_BYTES:
        raise StudyFileError(f"{path}: more than {MAX_BYTES:,} bytes; a study file is at most that")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise StudyFileError(f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x} at column {column}); "
                             "save the study file as UTF-8") from None


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer refuses documents nested deeper than MAX_DEPTH."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise StudyFileError(f"{mark.line + 1}: nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _expanded_size(root: yaml.Node) -> int:
    """Nodes in the document with every alias expanded (aliases point at shared nodes: memoised, so this is
    linear in the nodes written, however far they expand). Depth is bounded, so recursion is safe."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()  # nodes being counted: meeting one again is an alias to itself

    def size(node: yaml.Node) -> int:
        known = sizes.get(id(node))
        if known is not None:
            return known
        if id(node) in open_:
            raise StudyFileError(f"{node.start_mark.line + 1}: an alias refers to the mapping or list it is in")
        open_.add(id(node))
        if isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(v) for v in node.value)
        else:
            total = 1
        open_.discard(id(node))
        sizes[id(node)] = min(total, MAX_NODES + 1)
        return sizes[id(node)]

    return size(root)


def _duplicate_keys(root: yaml.Node) -> str | None:
    """'line N: key 'x' is written twice in one mapping (first at line M)' for the first such key, else None."""
    seen_nodes: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    token = (key.tag, key.value)
                    if token in first:
                        return (f"{key.start_mark.line + 1}: key {key.value[:100]!r} is written twice in one mapping "
                                f"(first at line {first[token]}); YAML would keep only the last: remove one")
                    first[token] = key.start_mark.line + 1
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return None


def _line_map(root: yaml.Node) -> dict[tuple, int]:
    """Key path (a tuple of keys and list indices) -> 1-based line. Keys that are not scalars have no path."""
    lines: dict[tuple, int] = {}
    stack: list[tuple[yaml.Node, tuple]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    p = path + (key.value,)
                    lines.setdefault(p, key.start_mark.line + 1)
                    stack.append((value, p))
        elif isinstance(node, yaml.SequenceNode):
            for i, value in enumerate(node.value):
                lines.setdefault(path + (i,), value.start_mark.line + 1)
                stack.append((value, path + (i,)))
    return lines


def load(text: str, source: str = "<string>") -> tuple[Any, dict[tuple, int]]:
    """(data, lines) of one YAML document, within the bounds of the module docstring."""
    loader = _BoundedLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except StudyFileError as e:
            raise StudyFileError(f"{source}:{e}") from None
        if node is None:
            return None, {}
        try:
            expanded = _expanded_size(node)
        except StudyFileError as e:
            raise StudyFileError(f"{source}:{e}") from None
        if expanded > MAX_NODES:
            raise StudyFileError(f"{source}: more than {MAX_NODES:,} values once its aliases (&name / *name) are "
                                 "expanded; write the study out, or use fewer aliases")
        duplicate = _duplicate_keys(node)
        if duplicate:
            raise StudyFileError(f"{source}:{duplicate}")
        try:
            data = loader.construct_document(node)
        except RecursionError:  # a merge key (<<) chain the depth bound does not see
            raise StudyFileError(f"{source}: nested too deeply") from None
        except ValueError as e:  # e.g. an integer of more than 4,300 digits
            raise StudyFileError(f"{source}: a value cannot be read ({e})") from None
    finally:
        loader.dispose()
    return data, _line_map(node)
