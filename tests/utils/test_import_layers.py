"""The package layers stay acyclic: no import cycle between packages, none inside the plugin layers.

The graph is read from source with ``ast`` (lift3d.utils.import_graph), imports inside functions
included: a deferred import that only dodges a cycle is still a cycle. Shared pieces live below
both users: Gaussian maths, PLY and mesh I/O, UV baking and the rasterization primitives in
``lift3d.utils``; the feature field of DMTet and the fixed mesh in ``lift3d.geometry.feature_field``.
"""

from __future__ import annotations

from lift3d.utils.import_graph import (Edge, import_edges, module_graph, package_graph, package_of,
                                       strongly_connected)

EDGES = import_edges()
PACKAGE_SCCS = strongly_connected(package_graph(EDGES))
MODULE_SCCS = strongly_connected(module_graph(EDGES))


def _edges_between(a: set[str], b: set[str], level: str) -> list[str]:
    key = package_of if level == "package" else (lambda m: m)
    return [f"{e.src}:{e.line} -> {e.dst}{' (inside a function)' if e.deferred else ''}"
            for e in EDGES if (key(e.src) in a and key(e.dst) in b) or (key(e.src) in b and key(e.dst) in a)]


def _same_component(sccs: list[list[str]], a: str, b: str) -> bool:
    return any(a in comp and b in comp for comp in sccs)


def test_the_graph_sees_deferred_imports(tmp_path):
    pkg = tmp_path / "lift3d"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("from lift3d.a import y\n")
    (pkg / "a" / "y.py").write_text("def f():\n    from .x import g\n    return g\n")
    edges = import_edges(pkg)
    assert Edge("lift3d.a.x", "lift3d.a.y", 1, False) in edges
    assert Edge("lift3d.a.y", "lift3d.a.x", 2, True) in edges
    assert strongly_connected(module_graph(edges)) == [["lift3d.a.x", "lift3d.a.y"]]


def test_no_package_level_cycle():
    assert PACKAGE_SCCS == [], "import cycle between packages: " + "; ".join(
        f"{comp}: {_edges_between(set(comp), set(comp), 'package')}" for comp in PACKAGE_SCCS)


def test_geometry_renderers_exporters_do_not_import_each_other_in_a_loop():
    for a, b in (("geometry", "renderers"), ("geometry", "exporters"), ("renderers", "exporters")):
        assert not _same_component(PACKAGE_SCCS, a, b), f"{a} <-> {b}: {_edges_between({a}, {b}, 'package')}"


def test_geometry_imports_neither_renderers_nor_exporters():
    # Renderers and exporters consume geometries; what both need lives in utils.
    bad = [f"{e.src}:{e.line} -> {e.dst}" for e in EDGES
           if package_of(e.src) == "geometry" and package_of(e.dst) in ("renderers", "exporters")]
    assert bad == [], bad


def test_utils_and_backends_sit_below_the_plugins():
    plugins = {"geometry", "renderers", "exporters", "materials", "backgrounds", "guidance", "prompts", "data",
               "systems", "priors", "launch"}
    bad = [f"{e.src}:{e.line} -> {e.dst}" for e in EDGES
           if package_of(e.src) in ("utils", "backends") and package_of(e.dst) in plugins]
    assert bad == [], bad


def test_named_module_cycles_stay_broken():
    pairs = [
        ("lift3d.geometry.gaussians", "lift3d.geometry.gaussian_strategy"),
        ("lift3d.geometry.mesh", "lift3d.geometry.tetrahedra_sdf_grid"),
    ]
    for a, b in pairs:
        assert not _same_component(MODULE_SCCS, a, b), f"{a} <-> {b}: {_edges_between({a}, {b}, 'module')}"


def test_no_module_cycle_in_the_plugin_layers():
    layers = {"geometry", "renderers", "exporters", "materials", "backgrounds", "utils", "backends"}
    bad = [comp for comp in MODULE_SCCS if any(package_of(m) in layers for m in comp)]
    assert bad == [], bad
