"""Exports are all or nothing, and an empty model is refused instead of exported as a junk mesh.

``BaseExporter.export_checked`` is what the system's ``export`` runs: the files are written into a
hidden folder beside the destination and renamed into place only when every one exists; a model
whose renders are empty (a NeRF whose density collapsed) stops with an ``IsosurfaceError`` that
launch reports in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import trimesh

from lift3d.config import ConfigError
from lift3d.exporters import mesh_exporter
from lift3d.exporters.base import (BaseExporter, EmptyModelError, IncompleteExportError, render_coverage,
                                   staged_folder)
from lift3d.exporters.mesh_exporter import MeshExporter
from lift3d.geometry.base import BaseGeometry, IsosurfaceError
from lift3d.materials.base import BaseMaterial
from lift3d.registry import find
from lift3d.utils.mesh import Mesh


class Ball(BaseGeometry):
    """An icosphere with position features: enough for the mesh exporter to write real files."""

    def isosurface(self) -> Mesh:
        m = trimesh.creation.icosphere(1, radius=0.5)
        return Mesh(torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces))

    def export_attributes(self, points: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": (points + 0.5).clamp(0, 1)}


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_an_export_that_fails_partway_leaves_no_folder_and_no_temporary_one(tmp_path, monkeypatch, failure):
    """The OBJ, MTL and PNG are written, then the GLB fails: none of it may appear at the destination."""
    seen = {}

    def failing_glb(path, *args, **kwargs):
        seen["files"] = _listing(Path(path).parent)
        raise failure

    monkeypatch.setattr(mesh_exporter, "write_glb", failing_glb)
    save = tmp_path / "save"
    save.mkdir()
    exporter = MeshExporter({"fmt": ["obj", "glb"], "texture_size": 16})
    with pytest.raises(type(failure)):
        exporter.export_checked(Ball(), BaseMaterial(), save / "it10-export")
    assert {"model.obj", "model.mtl", "texture_kd.png"} <= set(seen["files"])  # it did fail partway
    assert _listing(save) == [], "a failed export left files behind"


def test_a_finished_export_is_in_place_with_paths_pointing_into_it(tmp_path):
    save = tmp_path / "save"
    out = MeshExporter({"fmt": ["obj", "ply"], "texture_size": 16}).export_checked(Ball(), BaseMaterial(),
                                                                                 save / "it10-export")
    assert set(out) == {"obj", "mtl", "texture_kd", "ply"}
    for kind, path in out.items():
        assert path.parent == save / "it10-export" and path.is_file(), (kind, path)
    assert _listing(save) == ["it10-export"]  # no temporary folder left beside it


def test_exporting_again_replaces_the_folder_and_a_failed_retry_keeps_the_old_one(tmp_path, monkeypatch):
    dest = tmp_path / "it10-export"
    dest.mkdir()
    (dest / "stale.txt").write_text("from an earlier export")
    MeshExporter({"fmt": ["obj"], "texture_size": 16}).export_checked(Ball(), BaseMaterial(), dest)
    assert "stale.txt" not in _listing(dest) and "model.obj" in _listing(dest)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}

    def failing_obj(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(mesh_exporter, "write_obj", failing_obj)
    with pytest.raises(OSError):
        MeshExporter({"fmt": ["obj"], "texture_size": 16}).export_checked(Ball(), BaseMaterial(), dest)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert _listing(tmp_path) == ["it10-export"]


def test_a_file_reported_but_not_written_makes_the_export_incomplete(tmp_path):
    class Forgetful(BaseExporter):
        def export(self, geometry: Any, material: Any, out_dir: Path, name: str = "model") -> dict[str, Path]:
            (Path(out_dir) / f"{name}.obj").write_text("o model\n")
            return {"obj": Path(out_dir) / f"{name}.obj", "glb": Path(out_dir) / f"{name}.glb"}

    with pytest.raises(IncompleteExportError, match=r"glb: .*model\.glb"):
        Forgetful().export_checked(Ball(), BaseMaterial(), tmp_path / "export")
    assert _listing(tmp_path) == []


def test_staged_folder_cleans_up_after_an_error(tmp_path):
    with pytest.raises(ValueError):
        with staged_folder(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"12")
            raise ValueError("stop")
    assert _listing(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# Empty models


def _flat_scene(opacity: float) -> tuple[Any, Any]:
    """The conftest's one-colour scene; its renderer reports ``opacity`` everywhere."""
    geo = find("test-param-geometry")({})
    mat = find("test-identity-material")({})
    bg = find("test-black-background")({})
    return geo, find("test-flat-renderer")({"opacity": opacity}, geometry=geo, material=mat, background=bg)


def test_an_empty_model_is_refused_before_anything_is_written(tmp_path):
    geo, renderer = _flat_scene(0.0)
    exporter = find("test-json-exporter")({}, cfg_key="system.exporter")
    with pytest.raises(EmptyModelError, match=r"renders empty.*system\.exporter\.min_coverage=0") as err:
        exporter.export_checked(geo, None, tmp_path / "export", renderer=renderer)
    assert isinstance(err.value, IsosurfaceError)  # launch prints it as one line, exit status 1
    assert _listing(tmp_path) == []
    # The threshold is a setting: 0 exports anyway; a visible model passes with the default.
    off = find("test-json-exporter")({"min_coverage": 0.0})
    assert off.export_checked(geo, None, tmp_path / "forced", renderer=renderer)["json"].is_file()
    geo, renderer = _flat_scene(1.0)
    assert exporter.export_checked(geo, None, tmp_path / "visible", renderer=renderer)["json"].is_file()
    with pytest.raises(ConfigError, match=r"system\.exporter\.min_coverage must be in \[0, 1\)"):
        find("test-json-exporter")({"min_coverage": 1.5}, cfg_key="system.exporter")


def test_coverage_renders_in_eval_mode_and_restores_the_modes(tmp_path):
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, rays_o: torch.Tensor, **batch: Any) -> dict[str, torch.Tensor]:
            seen.append(self.training)
            B, H, W, _ = rays_o.shape
            return {"opacity": torch.full((B, H, W, 1), 0.25)}

    spy = Spy().train()
    assert render_coverage(spy) == pytest.approx(0.25)
    assert seen == [False] and spy.training


NERF = {"radius": 0.8, "isosurface_resolution": 48, "backend": "torch",
        "pos_encoding_config": {"n_levels": 4, "log2_hashmap_size": 10, "base_resolution": 8},
        "mlp_network_config": {"n_neurons": 16, "n_hidden_layers": 1}}


@dataclass
class _Nerf:
    geometry: Any
    renderer: Any


def _nerf(density_bias: Any) -> _Nerf:
    torch.manual_seed(0)
    geo = find("implicit-volume")({**NERF, "density_bias": density_bias})
    mat = find("diffuse-with-point-light-material")({})
    bg = find("solid-color-background")({})
    renderer = find("nerf-volume-renderer")({"num_samples_per_ray": 32, "grid_prune": False},
                                            geometry=geo, material=mat, background=bg)
    return _Nerf(geo, renderer)


def test_a_nerf_with_no_density_is_refused_instead_of_exported_as_noise(tmp_path):
    """Zero density everywhere: marching cubes still finds a mesh (noise at the box's edge), which
    the plain exporter writes; the checked export refuses. The initial density blob passes."""
    empty = _nerf(-20.0)
    assert empty.geometry.isosurface().t_pos_idx.shape[0] > 0  # the junk mesh an export would write
    exporter = MeshExporter({"fmt": ["obj"], "texture_size": 16}, cfg_key="system.exporter")
    with pytest.raises(EmptyModelError, match=r"mean opacity 0 "):
        exporter.export_checked(empty.geometry, BaseMaterial(), tmp_path / "empty", renderer=empty.renderer)
    assert not (tmp_path / "empty").exists()
    blob = _nerf("blob_magic3d")
    assert render_coverage(blob.renderer, 0.8) > 0.05
    exporter.check_not_empty(blob.renderer, blob.geometry)
