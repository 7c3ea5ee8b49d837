"""The flat method registry: base class checked, duplicates refused, typos answered."""

import pytest

from harness.plugin.method import METHODS, Method
from harness.core.registry import Registry, RegistryError


def test_builtin_methods_are_registered():
    assert {"baseline", "pmg"} <= set(METHODS.names())
    for name in METHODS.names():
        cls = METHODS.get(name)
        assert issubclass(cls, Method) and cls.registry_name == name
        assert cls.Params().name == name  # every knob has a default, the name written once (the decorator)


def test_duplicates_and_wrong_types_are_refused():
    reg = Registry("thing", Method, "methods", "fgvc_harness.none")

    @reg.register("a")
    class A(Method):
        pass

    with pytest.raises(RegistryError, match="duplicate thing name 'a'"):
        @reg.register("a")
        class B(Method):
            pass

    with pytest.raises(TypeError, match="must subclass Method"):
        reg.register("c")(int)


def test_unknown_name_suggests_the_closest():
    with pytest.raises(RegistryError, match="unknown method 'baseln': did you mean 'baseline'"):
        METHODS.get("baseln")


def test_third_party_methods_come_in_through_entry_points(tmp_path, monkeypatch):
    """A package outside the repo registers a method through the entry point group, not a YAML import path."""
    (tmp_path / "my_fgvc_plugin.py").write_text(
        "from harness.plugin.method import Method\n"
        "from tests.test_registry import PLUGIN_REGISTRY\n"
        "@PLUGIN_REGISTRY.register('my_method')\n"
        "class MyMethod(Method):\n"
        "    pass\n")
    dist = tmp_path / "my_fgvc_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-fgvc-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[fgvc_harness.test_methods]\nmy_method = my_fgvc_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert PLUGIN_REGISTRY.get("my_method").__name__ == "MyMethod"


PLUGIN_REGISTRY = Registry("method", Method, "methods", "fgvc_harness.test_methods")


def test_only_the_orchestrator_imports_ray():
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1]
    orchestrate = root / "harness" / "orchestrate"
    imports_ray = {str(p.relative_to(root)) for folder in ("harness", "methods") for p in (root / folder).rglob("*.py")
                   if any(line.strip().startswith(("import ray", "from ray")) for line in p.read_text().splitlines())}
    assert imports_ray and all(p.startswith(str(orchestrate.relative_to(root))) for p in imports_ray), imports_ray
