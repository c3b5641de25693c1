from __future__ import annotations

import pytest

from lift3d.registry import RegistryError, category_of, find, register, registered
from lift3d.utils.base import BaseModule


class _Guid(BaseModule):
    category = "guidance-test-cat"


def test_register_and_find_by_name_and_category():
    @register("reg-test-alpha")
    class Alpha(_Guid):
        pass

    assert find("reg-test-alpha") is Alpha
    assert find("reg-test-alpha", "guidance-test-cat") is Alpha
    assert category_of(Alpha) == "guidance-test-cat"
    assert "reg-test-alpha" in registered("guidance-test-cat")


def test_duplicate_name_names_both_classes_and_modules():
    @register("reg-test-dup")
    class First(_Guid):
        pass

    with pytest.raises(RegistryError) as err:

        @register("reg-test-dup")
        class Second(_Guid):
            pass

    msg = str(err.value)
    assert "First" in msg and "Second" in msg and __name__ in msg and "reg-test-dup" in msg


def test_unknown_name_lists_category_and_closest_match():
    @register("reg-test-volume-renderer")
    class R(_Guid):
        pass

    with pytest.raises(RegistryError) as err:
        find("reg-test-volum-renderer", "guidance-test-cat")
    msg = str(err.value)
    assert "Did you mean 'reg-test-volume-renderer'" in msg
    assert "Registered in category 'guidance-test-cat'" in msg


def test_wrong_category_is_explained():
    @register("reg-test-wrongcat")
    class W(_Guid):
        pass

    with pytest.raises(RegistryError, match="registered, but as a 'guidance-test-cat', not a 'geometry'"):
        find("reg-test-wrongcat", "geometry")


@pytest.mark.parametrize("bad", ["CamelCase", "snake_case", "trailing-", "", "two--dashes"])
def test_names_must_be_kebab_case(bad):
    with pytest.raises(RegistryError, match="kebab-case"):
        register(bad)


# ---------------------------------------------------------------------------------------------
# Built-ins are indexed from source and imported one module at a time.

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import lift3d.registry as registry  # noqa: E402
from lift3d.registry import BuiltinImportError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("diffusers", "transformers", "peft")


def test_find_imports_only_the_module_that_defines_the_name():
    script = textwrap.dedent("""
        import json, sys
        import lift3d
        from lift3d.registry import RegistryError, register
        from lift3d.utils.base import BaseModule

        out = {}
        index = lift3d.registry.builtin_index()
        out["vsd_module"] = index.names["toyworld-vsd-guidance"].module
        guidance_modules = {e.module for n, e in index.names.items() if e.module.startswith("lift3d.guidance.")}
        out["geometry"] = lift3d.find("implicit-volume", "geometry").__name__
        out["heavy_after_geometry"] = [m for m in %r if m in sys.modules]
        out["guidance_modules_after_geometry"] = sorted(m for m in guidance_modules if m in sys.modules)

        # A plugin cannot take a built-in name, even before the built-in module is imported.
        try:
            @register("toyworld-guidance")
            class Impostor(BaseModule):
                pass
            out["clash"] = None
        except RegistryError as exc:
            out["clash"] = str(exc)
        out["toyworld_after_clash"] = "lift3d.guidance.toyworld" in sys.modules

        out["guidance"] = lift3d.find("toyworld-vsd-guidance", "guidance").__name__
        out["vsd_after_guidance"] = out["vsd_module"] in sys.modules
        print(json.dumps(out))
    """ % (HEAVY,))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["geometry"] == "ImplicitVolume"
    assert out["heavy_after_geometry"] == []
    # No registering guidance module (toy-world VSD included) comes along with a geometry.
    assert out["vsd_module"].startswith("lift3d.guidance.")
    assert out["guidance_modules_after_geometry"] == []
    assert "lift3d.guidance.toyworld.ToyWorldGuidance" in out["clash"] and "Impostor" in out["clash"]
    assert out["toyworld_after_clash"] is False
    assert out["guidance"] == "ToyWorldVSDGuidance"
    assert out["vsd_after_guidance"] is True


def test_index_matches_what_a_full_import_registers():
    index = registry.builtin_index()
    registered()  # imports every built-in module
    builtin = {
        n: registry.IndexEntry(c.__module__, c.__qualname__)
        for n, c in registry._REGISTRY.items()
        if registry._is_builtin_module(c.__module__)
    }
    assert builtin == index.names
    assert len(index.names) >= 20  # the scan found the real packages, not nothing


def test_index_scan_reads_decorator_spellings_and_ignores_docstrings(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text(textwrap.dedent('''
        """Example for readers:

            @register("in-a-docstring")
            class Example: ...
        """
        import lift3d
        from lift3d import registry
        from lift3d.registry import register

        NAME = "computed-name"

        @register("plain-name")
        class Plain:
            pass

        @lift3d.register(
            "multi-line-name",
        )
        class MultiLine(
            object,
        ):
            pass

        @registry.register("attr-name")  # a comment
        @staticmethod_like
        class Attr: pass

        if True:
            @register(name="indented-name")
            class Indented:
                pass

        @register(NAME)
        class Computed:
            pass

        @other.register("not-ours")
        class NotOurs:
            pass
    '''))
    found = registry._registered_in(src)
    assert found == [
        ("plain-name", "Plain"),
        ("multi-line-name", "MultiLine"),
        ("attr-name", "Attr"),
        ("indented-name", "Indented"),
    ]
    assert registry._registered_in_tree(src.read_text(), src) == found


@pytest.fixture
def fake_builtins(tmp_path, monkeypatch, request):
    """A throw-away built-in package (unique per test); returns a writer for its modules."""
    pkg_name = f"fake_builtins_{request.node.name.replace('[', '_').replace(']', '_').replace('-', '_')}"
    pkg = tmp_path / pkg_name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_BUILTIN_PACKAGES", (pkg_name,))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    header = "from lift3d.registry import register\nfrom lift3d.utils.base import BaseModule\n\n"

    def write(module: str, body: str) -> str:
        (pkg / f"{module}.py").write_text(header + textwrap.dedent(body))
        return f"{pkg_name}.{module}"

    yield write
    for mod in [m for m in sys.modules if m == pkg_name or m.startswith(pkg_name + ".")]:
        del sys.modules[mod]


def test_broken_builtin_module_is_named_every_time_and_others_keep_working(fake_builtins):
    broken = fake_builtins("broken", """
        @register("fake-broken-thing")
        class Broken(BaseModule):
            category = "fake-cat"

        import nonexistent_module_for_registry_test  # noqa: E402
    """)
    fine = fake_builtins("fine", """
        @register("fake-fine-thing")
        class Fine(BaseModule):
            category = "fake-cat"
    """)
    for _ in range(2):
        with pytest.raises(BuiltinImportError) as err:
            find("fake-broken-thing", "fake-cat")
        msg = str(err.value)
        assert broken in msg and "fake-broken-thing" in msg and "nonexistent_module_for_registry_test" in msg
        assert isinstance(err.value.__cause__, ModuleNotFoundError)
        assert isinstance(err.value, ImportError) and isinstance(err.value, RegistryError)
        # The class registered before the failure does not linger as half a module.
        assert "fake-broken-thing" not in registry._REGISTRY

    assert find("fake-fine-thing", "fake-cat").__module__ == fine

    # A listing needs every module: it fails, naming the broken one, rather than leave holes.
    with pytest.raises(BuiltinImportError, match=broken):
        registered("fake-cat")
    # An unknown name still gets its suggestion, plus a note on the module that failed.
    with pytest.raises(RegistryError) as err:
        find("fake-fine-thin", "fake-cat")
    msg = str(err.value)
    assert "Did you mean 'fake-fine-thing'" in msg and broken in msg
    assert not isinstance(err.value, BuiltinImportError)


def test_stale_index_falls_back_to_a_full_import(fake_builtins):
    fake_builtins("dynamic", """
        NAME = "fake-" + "dynamic-thing"

        if False:
            @register("fake-stale-thing")  # the index sees this; the import never registers it
            class Stale(BaseModule):
                pass

        @register(NAME)
        class Dynamic(BaseModule):
            category = "fake-cat"
    """)
    assert "fake-stale-thing" in registry.builtin_index().names
    assert "fake-dynamic-thing" not in registry.builtin_index().names
    with pytest.raises(RegistryError, match="unknown module name 'fake-stale-thing'.*Registered.*fake-dynamic-thing"):
        find("fake-stale-thing")
    assert find("fake-dynamic-thing", "fake-cat").__name__ == "Dynamic"


def test_duplicate_names_between_builtin_modules_are_caught_by_the_index(fake_builtins):
    one = fake_builtins("one", """
        @register("fake-twice")
        class One(BaseModule):
            pass
    """)
    two = fake_builtins("two", """
        @register("fake-twice")
        class Two(BaseModule):
            pass
    """)
    with pytest.raises(RegistryError, match="'fake-twice' is registered twice") as err:
        find("fake-twice")
    assert f"{one}.One" in str(err.value) and f"{two}.Two" in str(err.value)
