"""The renderer and geometry contracts, checked on every built-in renderer and geometry.

One case per built-in: a small geometry, the material it is rendered with and a renderer that draws
it. A new built-in geometry or renderer fails the coverage tests until it gets a case here.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import trimesh

from lift3d.config import ConfigError
from lift3d.registry import builtin_index, find
from lift3d.utils.cameras import make_cameras

HASH = {"n_levels": 4, "log2_hashmap_size": 10, "base_resolution": 8, "per_level_scale": 1.5}
MLP = {"n_neurons": 16, "n_hidden_layers": 1}


def _box(tmp_path) -> dict:
    path = tmp_path / "box.obj"
    trimesh.creation.box((0.8, 0.6, 0.7)).export(str(path))
    return {"mesh_path": str(path), "normalize": False}


#: geometry name -> config factory (given a tmp folder).
GEOMETRIES: dict[str, Callable[[Any], dict]] = {
    "implicit-volume": lambda tmp: {"radius": 1.0, "n_feature_dims": 3, "density_bias": "blob_magic3d",
                                    "pos_encoding_config": HASH, "mlp_network_config": MLP, "backend": "torch"},
    "implicit-sdf": lambda tmp: {"radius": 1.0, "n_feature_dims": 3, "sdf_bias": "sphere", "sdf_bias_params": 0.5,
                                 "pos_encoding_config": HASH, "mlp_network_config": MLP, "backend": "torch"},
    "tetrahedra-sdf-grid": lambda tmp: {"radius": 1.0, "n_feature_dims": 3, "isosurface_resolution": 12},
    "gaussian-splatting": lambda tmp: {"init": "ball:0.4", "n_init": 100, "init_opacity": 0.5, "seed": 0},
    "mesh": _box,
}

#: renderer name -> (geometry, material, renderer config).
RENDERERS: dict[str, tuple[str, str, dict]] = {
    "nerf-volume-renderer": ("implicit-volume", "diffuse-with-point-light-material",
                             {"num_samples_per_ray": 16, "backend": "torch"}),
    "neus-volume-renderer": ("implicit-sdf", "neural-radiance-material", {"num_samples_per_ray": 16}),
    "mesh-rasterizer": ("tetrahedra-sdf-grid", "neural-radiance-material", {"backend": "torch"}),
    "gaussian-splatting-renderer": ("gaussian-splatting", "neural-radiance-material", {"backend": "torch"}),
}
MESH_RENDERER = ("mesh", "neural-radiance-material", {"backend": "torch"})


def builtins(package: str) -> list[str]:
    return sorted(n for n, e in builtin_index().names.items() if e.module.startswith(f"lift3d.{package}."))


def scene(name: str, tmp_path, geometry: str | None = None) -> tuple[Any, Any, Any]:
    geo_name, mat_name, rcfg = RENDERERS[name] if geometry is None else MESH_RENDERER
    torch.manual_seed(0)
    geo = find(geo_name, "geometry")(GEOMETRIES[geo_name](tmp_path))
    mat = find(mat_name, "material")({})
    bg = find("solid-color-background", "background")({"color": [0.0, 0.0, 0.0]})
    return find(name, "renderer")(rcfg, geometry=geo, material=mat, background=bg), geo, mat


def cameras(B: int = 2, res: int = 12) -> dict:
    return make_cameras(torch.tensor([15.0, 30.0][:B]), torch.tensor([0.0, 120.0][:B]), torch.full((B,), 2.0),
                        torch.full((B,), 40.0), res, res)


def test_every_builtin_renderer_and_geometry_has_a_case():
    assert set(builtins("renderers")) == set(RENDERERS)
    assert set(builtins("geometry")) == set(GEOMETRIES)


@pytest.mark.parametrize("name", sorted(RENDERERS) + ["mesh-rasterizer/mesh"])
def test_render_has_the_contract_keys_shapes_and_ranges(name, tmp_path):
    renderer, geo, mat = scene(name.split("/")[0], tmp_path, geometry="mesh" if "/" in name else None)
    out = renderer(**cameras())
    assert out["comp_rgb"].shape == (2, 12, 12, 3)
    assert out["opacity"].shape == (2, 12, 12, 1) and out["depth"].shape == (2, 12, 12, 1)
    assert 0.0 <= float(out["opacity"].min()) and float(out["opacity"].max()) <= 1.0 + 1e-5
    assert float(out["opacity"].max()) > 0.05, "the test scene is not in view"
    assert torch.isfinite(out["comp_rgb"]).all() and torch.isfinite(out["depth"]).all()
    # What the renderer declares at start-up is what it returns.
    declared = type(renderer).provides_normals(renderer.cfg, type(mat))
    assert declared == (out.get("comp_normal") is not None)
    if declared:
        assert out["comp_normal"].shape == (2, 12, 12, 3)


@pytest.mark.parametrize("name", sorted(RENDERERS))
def test_gradients_reach_the_geometry(name, tmp_path):
    renderer, geo, _ = scene(name, tmp_path)
    out = renderer(**cameras())
    (out["comp_rgb"].sum() + out["opacity"].sum()).backward()
    grads = [p.grad for p in geo.parameters() if p.requires_grad]
    assert grads and any(g is not None and float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("name", sorted(RENDERERS))
def test_renderer_config_is_strict(name):
    with pytest.raises(ConfigError, match="no_such_option"):
        find(name, "renderer")({"no_such_option": 1})


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_geometry_config_is_strict(name, tmp_path):
    with pytest.raises(ConfigError, match="no_such_option"):
        find(name, "geometry")({**GEOMETRIES[name](tmp_path), "no_such_option": 1})


@pytest.mark.parametrize("name", sorted(RENDERERS))
def test_a_geometry_rebuilt_from_its_state_dict_renders_the_same(name, tmp_path):
    renderer, geo, _ = scene(name, tmp_path)
    with torch.no_grad():
        for p in geo.parameters():  # move away from the initial values, so the copy must carry them
            p.add_(0.01 * torch.randn_like(p))
    renderer.eval()
    ref = renderer(**cameras())["comp_rgb"]
    geo_name = RENDERERS[name][0]
    torch.manual_seed(123)  # a different initialisation: only the state dict can make them agree
    clone = find(geo_name, "geometry")(GEOMETRIES[geo_name](tmp_path))
    clone.load_state_dict(geo.state_dict())
    renderer.set_scene(geometry=clone)
    torch.testing.assert_close(renderer(**cameras())["comp_rgb"], ref)
