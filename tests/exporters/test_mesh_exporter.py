"""Mesh export pipeline: unwrap, bake, seam padding, and textures that land where they belong."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import trimesh
from PIL import Image

pytest.importorskip("lift3d.utils.rasterize_ops")

from lift3d.config import ConfigError  # noqa: E402
from lift3d.exporters.mesh_exporter import MeshExporter  # noqa: E402
from lift3d.utils.uv import bake_texture, dilate_texture, to_tangent_space, unwrap_uv  # noqa: E402
from lift3d.geometry.base import BaseGeometry, IsosurfaceError  # noqa: E402
from lift3d.materials.base import BaseMaterial  # noqa: E402
from lift3d.registry import category_of  # noqa: E402
from lift3d.utils.rasterize_ops import interpolate, rasterize  # noqa: E402
from lift3d.utils.cameras import make_cameras  # noqa: E402
from lift3d.utils.mesh import Mesh  # noqa: E402
from glb_reader import glb_accessor, glb_image, read_glb


def ramp(p: torch.Tensor) -> torch.Tensor:
    """Albedo as a colour ramp along each axis: asymmetric in x, y and z, so any flip shows."""
    return ((p * torch.tensor([0.45, 0.35, 0.5]) + 0.5)).clamp(0, 1)


class SphereGeometry(BaseGeometry):
    """An icosphere with position-based features; ``normal`` is the sphere's exact normal."""

    @dataclass
    class Config(BaseGeometry.Config):
        subdivisions: int = 2
        shape: str = "sphere"

    def isosurface(self) -> Mesh:
        if self.cfg.shape == "box":
            m = trimesh.creation.box(extents=(1.6, 1.2, 1.0))
        else:
            m = trimesh.creation.icosphere(self.cfg.subdivisions)
        return Mesh(torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces))

    def export_attributes(self, points: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": ramp(points), "normal": F.normalize(points, dim=-1)}


class EmptyGeometry(BaseGeometry):
    def isosurface(self) -> Mesh:
        raise IsosurfaceError("empty isosurface: try a lower threshold")


class PlainMaterial(BaseMaterial):
    """BaseMaterial.export's default: albedo = features[:, :3]."""


class PBRMaterial(BaseMaterial):
    def export(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"albedo": features[:, :3], "roughness": features[:, 2:3], "metallic": 1 - features[:, 0:1]}


def bilinear(img: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Sample img [H, W, C] at continuous pixel coordinates xy [N, 2] (x right, y down; centres at +0.5)."""
    h, w = img.shape[:2]
    x = np.clip(xy[:, 0] - 0.5, 0, w - 1)
    y = np.clip(xy[:, 1] - 0.5, 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    im = img.astype(np.float64)
    return (im[y0, x0] * (1 - fx) * (1 - fy) + im[y0, x1] * fx * (1 - fy)
            + im[y1, x0] * (1 - fx) * fy + im[y1, x1] * fx * fy)


def sample_obj_uv(img: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """OBJ convention: v = 0 is the bottom row."""
    h, w = img.shape[:2]
    return bilinear(img, np.stack([uv[:, 0] * w, (1.0 - uv[:, 1]) * h], -1))


def face_centroid_error(vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray, img: np.ndarray,
                        to_world=lambda p: p) -> np.ndarray:
    """|texture at each face's UV centroid - ramp at the face's 3D centroid|, per face [F]."""
    uvc = uv[faces].mean(1)
    pc = to_world(vertices[faces].mean(1))
    got = sample_obj_uv(img[..., :3], uvc) / 255.0
    want = ramp(torch.tensor(pc, dtype=torch.float32)).numpy()
    return np.abs(got - want).max(-1)


def test_registered_and_config_checked():
    assert MeshExporter.registry_name == "mesh-exporter" and category_of(MeshExporter) == "exporter"
    with pytest.raises(ValueError, match="unknown fmt"):
        MeshExporter({"fmt": ["fbx"]})
    with pytest.raises(ConfigError, match="texture_sise"):
        MeshExporter({"texture_sise": 64})


def test_unwrap_keeps_positions_and_gives_valid_uvs():
    geo = SphereGeometry({"subdivisions": 2})
    mesh = geo.isosurface()
    uv_mesh = unwrap_uv(mesh, texture_size=64)
    assert uv_mesh.v_tex.shape[0] == uv_mesh.v_pos.shape[0] >= mesh.n_vertices
    assert torch.equal(uv_mesh.t_tex_idx, uv_mesh.t_pos_idx) and uv_mesh.n_faces == mesh.n_faces
    # same triangles in space, in the same order
    torch.testing.assert_close(uv_mesh.v_pos[uv_mesh.t_pos_idx], mesh.v_pos[mesh.t_pos_idx])
    assert uv_mesh.v_tex.min() >= 0 and uv_mesh.v_tex.max() <= 1
    t = uv_mesh.v_tex[uv_mesh.t_tex_idx]
    area = 0.5 * ((t[:, 1] - t[:, 0])[:, 0] * (t[:, 2] - t[:, 0])[:, 1]
                  - (t[:, 2] - t[:, 0])[:, 0] * (t[:, 1] - t[:, 0])[:, 1])
    assert (area.abs() > 0).all() and area.abs().sum() < 1.0  # charts are packed without overlap


def test_unwrap_survives_one_xatlas_crash(tmp_path, monkeypatch):
    """xatlas segfaults on some meshes; the unwrap runs it in a child process and retries once on
    jittered positions, while the output keeps the exact input positions."""
    import lift3d.utils.uv as uv_mod

    marker = tmp_path / "crashed-once"
    crash_first = (
        "import os, signal, pathlib\n"
        f"m = pathlib.Path({str(marker)!r})\n"
        "if not m.exists():\n"
        "    m.touch()\n"
        "    os.kill(os.getpid(), signal.SIGSEGV)\n"
    )
    monkeypatch.setattr(uv_mod, "_XATLAS_WORKER", crash_first + uv_mod._XATLAS_WORKER)
    mesh = SphereGeometry({"subdivisions": 1}).isosurface()
    out = unwrap_uv(mesh, texture_size=32)
    assert marker.exists()
    torch.testing.assert_close(out.v_pos[out.t_pos_idx], mesh.v_pos[mesh.t_pos_idx], rtol=0, atol=0)

    always = "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n"
    monkeypatch.setattr(uv_mod, "_XATLAS_WORKER", always)
    with pytest.raises(RuntimeError, match="xatlas crashed"):
        unwrap_uv(mesh, texture_size=32)
    with pytest.raises(RuntimeError, match="unknown xatlas chart option"):
        monkeypatch.undo()
        unwrap_uv(mesh, texture_size=32, chart_options={"max_chart_aera": 1.0})


def test_dilate_texture_fills_neighbours_only():
    img = torch.zeros(9, 9, 3)
    mask = torch.zeros(9, 9, 1, dtype=torch.bool)
    img[4, 4] = torch.tensor([1.0, 0.5, 0.25])
    mask[4, 4] = True
    out = dilate_texture(img, mask, 2)
    yy, xx = torch.meshgrid(torch.arange(9), torch.arange(9), indexing="ij")
    ring = ((yy - 4).abs().maximum((xx - 4).abs()) <= 2)
    torch.testing.assert_close(out[ring], torch.tensor([1.0, 0.5, 0.25]).expand(int(ring.sum()), 3))
    assert (out[~ring] == 0).all()
    filled = dilate_texture(img, mask, 0, fill_rest=True)
    torch.testing.assert_close(filled[0, 0], torch.tensor([1.0, 0.5, 0.25]))


def test_bake_matches_attribute_at_texel_positions_and_pads_seams():
    mesh = unwrap_uv(SphereGeometry({"subdivisions": 2}).isosurface(), texture_size=64, padding=2)
    fn = lambda p: {"albedo": ramp(p)}  # noqa: E731
    size = 64
    padded = bake_texture(mesh, fn, size, pad_pixels=3)
    bare = bake_texture(mesh, fn, size, pad_pixels=0)
    mask = padded["mask"][..., 0]
    assert padded["albedo"].shape == (size, size, 3) and mask.dtype == torch.bool
    assert 0.3 < mask.float().mean() < 0.95
    # texels one step outside the charts get their neighbours' colours, not the background fill
    ring = F.max_pool2d(mask[None, None].float(), 3, 1, 1)[0, 0].bool() & ~mask
    assert ring.any()
    near = padded["albedo"][ring]
    gap = (bare["albedo"][ring] - near).abs().max(-1).values
    assert gap.mean() > 0.02  # the unpadded bake leaves the mean colour there
    # bilinear lookups at the UV of every vertex (chart corners and borders) read the right colour
    # only with padding
    img_p = (padded["albedo"].numpy() * 255).round()
    img_b = (bare["albedo"].numpy() * 255).round()
    want = ramp(mesh.v_pos).numpy()
    err_p = np.abs(sample_obj_uv(img_p, mesh.v_tex.numpy()) / 255 - want).max(-1)
    err_b = np.abs(sample_obj_uv(img_b, mesh.v_tex.numpy()) / 255 - want).max(-1)
    assert np.percentile(err_p, 95) < 0.06, np.percentile(err_p, 95)
    assert err_b.mean() > 2 * err_p.mean()


@pytest.mark.parametrize("shape", ["sphere", "box"])
def test_obj_texture_is_not_flipped_or_shifted(tmp_path, shape):
    geo = SphereGeometry({"subdivisions": 2, "shape": shape})
    out = MeshExporter({"fmt": ["obj"], "texture_size": 96}).export(geo, PlainMaterial(), tmp_path)
    assert {"obj", "mtl", "texture_kd"} <= set(out)
    assert out["texture_kd"].name == "texture_kd.png"
    loaded = trimesh.load(out["obj"], process=False)
    assert loaded.visual.kind == "texture"
    img = np.asarray(loaded.visual.material.image.convert("RGB"))
    assert img.shape == (96, 96, 3)
    top = loaded.vertices[:, 2].max()
    assert top == pytest.approx(geo.isosurface().v_pos[:, 2].max().item(), abs=1e-5)  # OBJ is z-up
    err = face_centroid_error(loaded.vertices, loaded.faces, loaded.visual.uv, img)
    assert err.mean() < 0.015 and err.max() < 0.06, (err.mean(), err.max())
    # the same check with v read from the top (a flipped texture) fails badly
    flipped = face_centroid_error(loaded.vertices, loaded.faces, loaded.visual.uv, img[::-1])
    assert flipped.mean() > 0.1


def test_render_of_exported_obj_matches_field_colours(tmp_path):
    """Rasterize the re-loaded OBJ from four sides and texture it: every visible pixel must show
    the colour the field has at that surface point (what the system's own render shows)."""
    geo = SphereGeometry({"subdivisions": 3})
    out = MeshExporter({"fmt": ["obj"], "texture_size": 128}).export(geo, PlainMaterial(), tmp_path)
    loaded = trimesh.load(out["obj"], process=False)
    img = np.asarray(loaded.visual.material.image.convert("RGB"))
    n = 4
    cams = make_cameras(torch.full((n,), 20.0), torch.arange(n) * 90.0, torch.full((n,), 3.0),
                        torch.full((n,), 40.0), 48, 48)
    v = torch.tensor(loaded.vertices, dtype=torch.float32)
    tri = torch.tensor(loaded.faces, dtype=torch.int32)
    clip = torch.cat([v, torch.ones_like(v[:, :1])], -1) @ cams["mvp_mtx"].transpose(1, 2)  # [B, V, 4]
    rast = rasterize(clip, tri, (48, 48))
    cover = rast[..., 3] > 0
    uv = interpolate(torch.tensor(loaded.visual.uv, dtype=torch.float32), rast, tri)[cover].numpy()
    pts = interpolate(v, rast, tri)[cover]
    got = sample_obj_uv(img, uv) / 255
    err = np.abs(got - ramp(pts).numpy()).max(-1)
    assert cover.float().mean() > 0.2
    assert err.mean() < 0.015 and np.percentile(err, 99) < 0.05, (err.mean(), np.percentile(err, 99))


def test_glb_texture_round_trip_in_y_up_frame(tmp_path):
    geo = SphereGeometry({"subdivisions": 2})
    out = MeshExporter({"fmt": ["glb"], "texture_size": 96}).export(geo, PlainMaterial(), tmp_path)
    assert set(out) == {"glb"}
    to_world = lambda g: np.stack([g[:, 0], -g[:, 2], g[:, 1]], -1)  # noqa: E731  inverse of (x, z, -y)
    # through trimesh
    scene = trimesh.load(out["glb"], process=False)
    geom = next(iter(scene.geometry.values()))
    img = np.asarray(geom.visual.material.baseColorTexture.convert("RGB"))
    err = face_centroid_error(geom.vertices, geom.faces, geom.visual.uv, img, to_world)
    assert err.mean() < 0.015 and err.max() < 0.06
    # and by hand from the raw file: glTF v measured from the top of the image
    js, blob = read_glb(out["glb"])
    prim = js["meshes"][0]["primitives"][0]
    pos = glb_accessor(js, blob, prim["attributes"]["POSITION"])
    tc = glb_accessor(js, blob, prim["attributes"]["TEXCOORD_0"])
    faces = glb_accessor(js, blob, prim["indices"]).reshape(-1, 3)
    raw = glb_image(js, blob, js["materials"][0]["pbrMetallicRoughness"]["baseColorTexture"]["index"])[..., :3]
    world = to_world(pos)
    assert np.argmax(pos[:, 1]) == np.argmax(world[:, 2])  # glTF y is world z
    tcc = tc[faces].mean(1)
    got = bilinear(raw, np.stack([tcc[:, 0] * raw.shape[1], tcc[:, 1] * raw.shape[0]], -1)) / 255
    want = ramp(torch.tensor(world[faces].mean(1), dtype=torch.float32)).numpy()
    assert np.abs(got - want).max(-1).mean() < 0.015


def test_pbr_maps_and_vertex_color_ply(tmp_path):
    geo = SphereGeometry({"subdivisions": 1})
    exp = MeshExporter({"fmt": ["obj", "glb"], "texture_size": 64, "vertex_color_ply": True})
    out = exp.export(geo, PBRMaterial(), tmp_path, name="asset")
    assert {"obj", "mtl", "texture_kd", "texture_pr", "texture_pm", "glb", "ply"} <= set(out)
    assert out["obj"].name == "asset.obj" and out["ply"].name == "asset.ply"
    mtl = out["mtl"].read_text()
    assert "map_Pr texture_pr.png" in mtl and "map_Pm texture_pm.png" in mtl
    # roughness map = ramp's blue channel (height), sampled at face centroids of the loaded OBJ
    loaded = trimesh.load(out["obj"], process=False)
    rough = np.asarray(Image.open(out["texture_pr"]))[..., None]
    uvc = loaded.visual.uv[loaded.faces].mean(1)
    want = ramp(torch.tensor(loaded.vertices[loaded.faces].mean(1), dtype=torch.float32))[:, 2].numpy()
    assert np.abs(sample_obj_uv(rough, uvc)[:, 0] / 255 - want).mean() < 0.02
    js, blob = read_glb(out["glb"])
    pbr = js["materials"][0]["pbrMetallicRoughness"]
    assert "metallicRoughnessTexture" in pbr and pbr["metallicFactor"] == 1.0
    # vertex colours of the PLY are the albedo at the (un-split) isosurface vertices
    ply = trimesh.load(out["ply"], process=False)
    np.testing.assert_allclose(ply.vertices, geo.isosurface().v_pos.numpy(), atol=1e-6)
    cols = ply.visual.vertex_colors[:, :3] / 255.0
    np.testing.assert_allclose(cols, ramp(torch.tensor(ply.vertices, dtype=torch.float32)).numpy(), atol=1 / 255)


def test_normal_map_of_exact_normals_is_flat(tmp_path):
    geo = SphereGeometry({"subdivisions": 3})
    out = MeshExporter({"fmt": ["obj"], "texture_size": 64, "save_normal_map": True}).export(
        geo, PlainMaterial(), tmp_path)
    assert "norm texture_n.png" in out["mtl"].read_text()
    nmap = np.asarray(Image.open(out["texture_n"])).astype(np.float64) / 255
    mask = bake_texture(unwrap_uv(geo.isosurface(), 64), lambda p: {"albedo": ramp(p)}, 64)["mask"][..., 0].numpy()
    assert mask.sum() > 100
    # the sphere's true normal equals the smooth mesh normal, so the tangent-space normal is +z
    dev = np.abs(nmap[mask] - [0.5, 0.5, 1.0]).max(-1)
    assert np.percentile(dev, 99) < 0.05, np.percentile(dev, 99)  # no seams or flipped charts


def test_tangent_space_axes_follow_uv_directions():
    v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]])
    f = torch.tensor([[0, 1, 2]])
    n = torch.tensor([[0.0, 0, 1]])
    mesh = Mesh(v, f, v[:, :2].clone(), f.clone())
    normals = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]])
    enc = to_tangent_space(normals, mesh, torch.zeros(3, dtype=torch.long), n.expand(3, 3))
    torch.testing.assert_close(enc, torch.tensor([[1.0, 0.5, 0.5], [0.5, 1.0, 0.5], [0.5, 0.5, 1.0]]))
    # a chart mirrored in u: +x in the world now points along -u
    mirrored = Mesh(v, f, torch.stack([1 - v[:, 0], v[:, 1]], -1), f.clone())
    enc = to_tangent_space(normals[:1], mirrored, torch.zeros(1, dtype=torch.long), n)
    torch.testing.assert_close(enc, torch.tensor([[0.0, 0.5, 0.5]]))


def test_isosurface_error_propagates_and_gaussian_ply(tmp_path):
    with pytest.raises(IsosurfaceError, match="threshold"):
        MeshExporter({"texture_size": 32}).export(EmptyGeometry(), PlainMaterial(), tmp_path)

    class Splats(EmptyGeometry):
        def export_ply(self, path):
            path.write_bytes(b"ply\n")

    out = MeshExporter({"fmt": [], "save_gaussian_ply": True}).export(Splats(), PlainMaterial(), tmp_path)
    assert out == {"gaussian_ply": tmp_path / "model_gaussians.ply"} and out["gaussian_ply"].read_bytes() == b"ply\n"


def test_export_is_deterministic(tmp_path):
    geo = SphereGeometry({"subdivisions": 1})
    cfg = {"fmt": ["obj", "glb", "ply"], "texture_size": 32}
    a = MeshExporter(cfg).export(geo, PlainMaterial(), tmp_path / "a")
    b = MeshExporter(cfg).export(geo, PlainMaterial(), tmp_path / "b")
    assert set(a) == set(b)
    for k in a:
        assert a[k].read_bytes() == b[k].read_bytes(), k


def _nvdiffrast_available() -> bool:
    from lift3d.backends import nvdiffrast_backend

    return nvdiffrast_backend.available()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not _nvdiffrast_available(),
                    reason="needs CUDA and nvdiffrast (the CUDA rasterizer path of the bake)")
def test_cuda_bake_matches_torch_bake():
    mesh = unwrap_uv(SphereGeometry({"subdivisions": 2}).isosurface(), texture_size=64)
    fn = lambda p: {"albedo": ramp(p.cpu()).to(p.device)}  # noqa: E731
    cpu = bake_texture(mesh, fn, 64, pad_pixels=2)
    gpu = bake_texture(mesh.to("cuda"), fn, 64, pad_pixels=2)
    agree = (cpu["mask"] == gpu["mask"].cpu()).float().mean()
    assert agree > 0.995  # texel centres exactly on an edge may go either way
    both = (cpu["mask"] & gpu["mask"].cpu())[..., 0]
    torch.testing.assert_close(gpu["albedo"].cpu()[both], cpu["albedo"][both], atol=1e-4, rtol=0)


class SkinnedBallGeometry(BaseGeometry):
    """A density ball whose colour changes with depth: a thin, tenuous dark skin over a bright core.

    Density ramps linearly from 0 at r = 0.52 to 200 at r = 0.48; the level-1 isosurface sits at
    r ~ 0.5198, inside the dark skin (albedo 0.2 for r > 0.51, 0.9 below), which a volume render
    mostly sees through.
    """

    def forward_density(self, points: torch.Tensor) -> torch.Tensor:
        r = points.norm(dim=-1, keepdim=True)
        return 200.0 * ((0.52 - r) / 0.04).clamp(0, 1)

    def export_attributes(self, points: torch.Tensor) -> dict[str, torch.Tensor]:
        r = points.norm(dim=-1, keepdim=True)
        return {"features": torch.where(r > 0.51, 0.2, 0.9).expand(-1, 3).clone()}


def _radial_render(geo: SkinnedBallGeometry, n: int = 20000) -> float:
    """The albedo a head-on ray sees, by brute-force compositing from r = 0.6 inwards."""
    r = torch.linspace(0.6, 0.3, n)
    pts = torch.stack([r, torch.zeros_like(r), torch.zeros_like(r)], -1)
    sigma = geo.forward_density(pts)[:, 0]
    alpha = 1 - torch.exp(-sigma * (0.3 / (n - 1)))
    w = torch.cumprod(torch.cat([torch.ones(1), 1 - alpha[:-1]]), 0) * alpha
    return float((w * geo.export_attributes(pts)["features"][:, 0]).sum() / w.sum())


def test_volume_bake_reads_colour_where_a_render_sees_it():
    geo, mat = SkinnedBallGeometry({}), PlainMaterial({})
    surface = F.normalize(torch.randn(64, 3, generator=torch.Generator().manual_seed(0)), dim=-1) * 0.5198
    at_point = MeshExporter({})
    assert torch.allclose(at_point.attribute_fn(geo, mat)(surface)["albedo"], torch.tensor(0.2))
    want = _radial_render(geo)
    assert 0.6 < want < 0.85  # the skin shows a little, the core mostly
    banded = MeshExporter({"volume_bake_band": 0.05, "volume_bake_samples": 64, "chunk_size": 640})
    got = banded.attribute_fn(geo, mat)(surface)["albedo"]
    assert got.shape == (64, 3)
    assert (got - want).abs().max() < 0.05, (got.min(), got.max(), want)


def test_volume_bake_keeps_surface_colour_for_fields_without_density_and_checks_samples():
    geo, mat = SphereGeometry({}), PlainMaterial({})
    pts = F.normalize(torch.randn(32, 3), dim=-1)
    banded = MeshExporter({"volume_bake_band": 0.05})
    assert torch.allclose(banded.attribute_fn(geo, mat)(pts)["albedo"], ramp(pts))
    with pytest.raises(ValueError, match="volume_bake_samples"):
        MeshExporter({"volume_bake_band": 0.05, "volume_bake_samples": 1}).attribute_fn(SkinnedBallGeometry({}), mat)
