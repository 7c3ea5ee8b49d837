"""The flat method registry: base class checked, duplicates refused, typos answered."""

import pytest

from harness.plugin import METHODS, Method
from harness.registry import Registry, RegistryError


def test_builtin_methods_are_registered():
    assert {"baseline", "pmg"} <= set(METHODS.names())
    for name in METHODS.names():
        cls = METHODS.get(name)
        assert issubclass(cls, Method) and cls.registry_name == name
        assert cls.primary_head and cls.Params().name == name  # every knob has a default


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
