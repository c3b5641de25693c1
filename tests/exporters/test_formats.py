"""OBJ/MTL/PNG, GLB and PLY writers (lift3d.exporters.formats): frames, UV conventions, round trips."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from lift3d.exporters.formats import mesh_arrays, to_gltf_frame, write_glb, write_obj, write_ply
from lift3d.utils.mesh import Mesh
from glb_reader import glb_accessor, glb_image, read_glb


def quad_mesh() -> tuple[Mesh, np.ndarray]:
    """A unit square in the x-z plane (standing up, facing -y) with UVs u = x, v = z, and a texture
    whose top half (v > 0.5, high z) is red and whose left half (u < 0.5) is brighter in green."""
    v = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 0, 1], [0, 0, 1]], dtype=torch.float32)
    f = torch.tensor([[0, 1, 2], [0, 2, 3]])
    uv = v[:, [0, 2]].clone()
    img = np.zeros((16, 16, 3), np.uint8)
    img[:8, :, 0] = 255  # image rows 0..7 = top of the picture = v in (0.5, 1]
    img[:, :8, 1] = 200  # columns 0..7 = u in [0, 0.5)
    return Mesh(v, f, uv, f.clone()), img


def sample_obj_convention(img: np.ndarray, uv: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    x = np.clip((uv[:, 0] * w).astype(int), 0, w - 1)
    y = np.clip(((1.0 - uv[:, 1]) * h).astype(int), 0, h - 1)
    return img[y, x]


def test_obj_round_trip_frame_and_texture(tmp_path):
    mesh, img = quad_mesh()
    written = write_obj(tmp_path / "model.obj", mesh, {"albedo": img})
    assert set(written) == {"obj", "mtl", "texture_kd"}
    assert (tmp_path / "texture_kd.png").is_file()
    mtl = (tmp_path / "model.mtl").read_text()
    assert "map_Kd texture_kd.png" in mtl and "mtllib model.mtl" in (tmp_path / "model.obj").read_text()
    loaded = trimesh.load(tmp_path / "model.obj", process=False)
    assert loaded.visual.kind == "texture"
    np.testing.assert_allclose(loaded.vertices.max(0), [1, 0, 1], atol=1e-6)  # z up kept
    tex = np.asarray(loaded.visual.material.image.convert("RGB"))
    np.testing.assert_array_equal(tex, img)
    # A point high on the quad (z = 0.9) must read the red top of the picture; low (z = 0.1) not.
    uv = np.array([[0.25, 0.9], [0.75, 0.1]])
    np.testing.assert_array_equal(sample_obj_convention(tex, uv), [[255, 200, 0], [0, 0, 0]])
    # every vertex keeps its UV (u = x, v = z)
    np.testing.assert_allclose(loaded.visual.uv, loaded.vertices[:, [0, 2]], atol=1e-6)


def test_glb_is_y_up_and_uses_gltf_uv_origin(tmp_path):
    mesh, img = quad_mesh()
    path = write_glb(tmp_path / "model.glb", mesh, {"albedo": img})
    js, blob = read_glb(path)
    prim = js["meshes"][0]["primitives"][0]
    pos = glb_accessor(js, blob, prim["attributes"]["POSITION"])
    tc = glb_accessor(js, blob, prim["attributes"]["TEXCOORD_0"])
    # (x, y, z) -> (x, z, -y): the quad's top edge (world z = 1) is at glTF y = 1
    np.testing.assert_allclose(pos.max(0), [1, 1, 0], atol=1e-6)
    # glTF v runs down from the top of the image: world height z = glTF y must equal 1 - v
    np.testing.assert_allclose(tc[:, 1], 1.0 - pos[:, 1], atol=1e-6)
    base = js["materials"][0]["pbrMetallicRoughness"]["baseColorTexture"]["index"]
    stored = glb_image(js, blob, base)[..., :3]
    np.testing.assert_array_equal(stored, img)
    # sampling the stored image the glTF way (row = v * H) at a high point gives red
    high = np.array([[0.25, 1.0 - 0.9]])
    y, x = int(high[0, 1] * 16), int(high[0, 0] * 16)
    np.testing.assert_array_equal(stored[y, x], [255, 200, 0])
    # normals rotate with the positions: the quad faces -y in the world, +z in glTF
    nrm = glb_accessor(js, blob, prim["attributes"]["NORMAL"])
    np.testing.assert_allclose(nrm, np.tile([0, 0, 1], (4, 1)), atol=1e-6)


def test_glb_loads_in_trimesh_with_texture(tmp_path):
    mesh, img = quad_mesh()
    write_glb(tmp_path / "model.glb", mesh, {"albedo": img})
    scene = trimesh.load(tmp_path / "model.glb", process=False)
    geom = next(iter(scene.geometry.values()))
    assert geom.visual.kind == "texture"
    tex = np.asarray(geom.visual.material.baseColorTexture.convert("RGB"))
    np.testing.assert_array_equal(tex, img)
    assert geom.vertices[:, 1].max() == pytest.approx(1.0)
    # trimesh turns glTF v back into the OBJ convention: v equals the height (glTF y)
    np.testing.assert_allclose(geom.visual.uv[:, 1], geom.vertices[:, 1], atol=1e-6)


def test_gltf_frame_is_a_proper_rotation():
    r = to_gltf_frame(np.eye(3))
    assert np.linalg.det(r) == pytest.approx(1.0)
    np.testing.assert_allclose(to_gltf_frame(np.array([[1.0, 2.0, 3.0]])), [[1.0, 3.0, -2.0]])


def test_pbr_channels_in_mtl_and_glb(tmp_path):
    mesh, img = quad_mesh()
    rough = np.full((16, 16, 1), 50, np.uint8)
    metal = np.full((16, 16, 1), 200, np.uint8)
    nmap = np.tile(np.array([128, 128, 255], np.uint8), (16, 16, 1))
    tex = {"albedo": img, "roughness": rough, "metallic": metal, "normal": nmap}
    written = write_obj(tmp_path / "model.obj", mesh, tex)
    assert {"texture_pr", "texture_pm", "texture_n"} <= set(written)
    mtl = (tmp_path / "model.mtl").read_text()
    for line in ("map_Pr texture_pr.png", "map_Pm texture_pm.png", "norm texture_n.png"):
        assert line in mtl
    np.testing.assert_array_equal(np.asarray(Image.open(written["texture_pr"])), rough[..., 0])
    js, blob = read_glb(write_glb(tmp_path / "model.glb", mesh, tex))
    mat = js["materials"][0]
    mr = glb_image(js, blob, mat["pbrMetallicRoughness"]["metallicRoughnessTexture"]["index"])
    assert (mr[..., 1] == 50).all() and (mr[..., 2] == 200).all()  # G = roughness, B = metallic
    assert "normalTexture" in mat


def test_unknown_channel_and_missing_uv_are_errors(tmp_path):
    mesh, img = quad_mesh()
    with pytest.raises(ValueError, match="unknown texture channel"):
        write_obj(tmp_path / "a.obj", mesh, {"sheen": img})
    bare = Mesh(mesh.v_pos, mesh.t_pos_idx)
    with pytest.raises(ValueError, match="no UVs"):
        write_glb(tmp_path / "a.glb", bare, {"albedo": img})
    # untextured export still works
    write_obj(tmp_path / "b.obj", bare)
    assert trimesh.load(tmp_path / "b.obj", process=False).vertices.shape == (4, 3)


def test_split_uv_vertices_when_indices_differ():
    # a cube: 8 positions, but each face its own UV square, indexed separately
    box = trimesh.creation.box()
    faces = torch.tensor(box.faces)
    v_tex = torch.rand(36, 2)
    t_tex = torch.arange(36).reshape(12, 3)
    mesh = Mesh(torch.tensor(box.vertices, dtype=torch.float32), faces, v_tex, t_tex)
    arr = mesh_arrays(mesh)
    assert len(arr["positions"]) == 36
    np.testing.assert_allclose(arr["positions"][arr["faces"]], box.vertices[box.faces], atol=1e-6)
    np.testing.assert_allclose(arr["uv"][arr["faces"]], v_tex[t_tex].numpy(), atol=1e-6)


def test_ply_round_trip_with_vertex_colors(tmp_path):
    sphere = trimesh.creation.icosphere(1)
    mesh = Mesh(torch.tensor(sphere.vertices, dtype=torch.float32), torch.tensor(sphere.faces))
    colors = (mesh.v_pos + 1) / 2
    path = write_ply(tmp_path / "sub" / "m.ply", mesh, colors)
    loaded = trimesh.load(path, process=False)
    np.testing.assert_allclose(loaded.vertices, sphere.vertices, atol=1e-6)
    np.testing.assert_array_equal(loaded.faces, sphere.faces)
    got = loaded.visual.vertex_colors[:, :3].astype(np.float32) / 255
    np.testing.assert_allclose(got, colors.numpy(), atol=0.5 / 255 + 1e-6)


def test_writers_are_deterministic(tmp_path):
    mesh, img = quad_mesh()
    for d in ("a", "b"):
        write_obj(tmp_path / d / "model.obj", mesh, {"albedo": img})
        write_glb(tmp_path / d / "model.glb", mesh, {"albedo": img})
        write_ply(tmp_path / d / "model.ply", mesh, np.full((4, 3), 0.5))
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["model.glb", "model.mtl", "model.obj", "model.ply", "texture_kd.png"]
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
