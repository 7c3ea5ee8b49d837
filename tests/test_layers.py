"""The house's layers (docs/architecture.md): who may import whom, checked on the code itself.

    core  <-  data  <-  plugin  <-  study  <-  engine  <-  results  <-  orchestrate, report, gate  <-  run, cli, api

A module imports only modules of its own package or of a lower layer (imports inside functions count; those under
`if TYPE_CHECKING:` do not run and do not count), packages of one layer never import each other, methods/ import only
core, plugin and data, and the import graph of harness/ has no circle. Ray stays in harness/orchestrate/ (its own
test, test_contract.py's test_only_the_orchestrator_imports_ray)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"core": 0, "data": 1, "plugin": 1.5, "study": 2, "engine": 3, "results": 4, "orchestrate": 5, "report": 5,
          "gate": 5}
TOP = 6  # harness/run.py, cli.py, api.py, __init__.py: the command line and the Python API


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module(p): p for d in ("harness", "methods") for p in (ROOT / d).rglob("*.py")}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines |= set(range(child.lineno, child.end_lineno + 1))
    return lines


def imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The harness/methods modules a file imports (`from pkg import submodule` counts as the submodule)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
    return {m for m in found if m.split(".")[0] in ("harness", "methods") and m in modules}


def layer(module: str) -> tuple[int, str]:
    parts = module.split(".")
    if parts[0] == "methods":
        return LAYERS["plugin"], "methods"
    if len(parts) == 1 or parts[1] not in LAYERS:
        return TOP, "top"  # harness/run.py, api.py, cli.py, __init__.py: one layer, one "package"
    return LAYERS[parts[1]], parts[1]


def test_no_module_imports_a_higher_layer_or_a_peer_package():
    modules = _modules()
    wrong = []
    for module, path in modules.items():
        mine, package = layer(module)
        for target in imports(path, modules):
            theirs, other = layer(target)
            if package == "methods" and other not in ("core", "plugin", "data", "methods"):
                wrong.append(f"{module} -> {target} (methods import core, plugin and data only)")
            elif theirs > mine or (theirs == mine and other != package and package != "methods"):
                wrong.append(f"{module} (layer {mine}) -> {target} (layer {theirs})")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_import_graph_has_no_circle():
    modules = _modules()
    # What each module names: a submodule that imports its own package's face while the face imports it is a circle;
    # Python's own import of a package before its submodule is not.
    graph = {m: imports(p, modules) - {m} for m, p in modules.items()}
    state, stack, circles = {}, [], []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                circles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not circles, "\n".join(circles[:20])
