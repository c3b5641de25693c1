"""Mesh file writers: Wavefront OBJ + MTL + PNG textures, binary glTF (GLB) and vertex-coloured PLY.

Frames. lift3d's world is right-handed with +z up. OBJ and PLY keep that frame unchanged. glTF
mandates +y up, so :func:`write_glb` rotates every position and normal by
``(x, y, z) -> (x, z, -y)``: a rotation of -90 degrees about +x (determinant +1, so handedness
and triangle winding are kept); the top of the object (max z) becomes max y and the front
(+x, azimuth 0) stays +x.

Textures. Every texture passed in is an image as it is stored on disk: ``uint8`` [H, W, C], row 0
the top row. UVs (``Mesh.v_tex``) use the OBJ convention: (0, 0) is the bottom-left corner of the
image, v grows upwards. glTF measures v from the top, so the GLB writer stores ``1 - v``
(trimesh does that flip when it writes TEXCOORD_0; the tests check the raw file).

Channels (keys of ``textures``) and where they go:

============  =================  ===========================  ==========================================
channel       OBJ file           MTL key                      GLB
============  =================  ===========================  ==========================================
albedo        texture_kd.png     map_Kd                       baseColorTexture
roughness     texture_pr.png     map_Pr (PBR extension)       metallicRoughnessTexture, green channel
metallic      texture_pm.png     map_Pm (PBR extension)       metallicRoughnessTexture, blue channel
normal        texture_n.png      norm (PBR extension)         normalTexture (tangent space)
============  =================  ===========================  ==========================================

All writers are deterministic (same input, same bytes) and write each file under a temporary
name in the destination folder before moving it into place.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from lift3d.utils.io import atomic_path, save_image, to_uint8
from lift3d.utils.mesh import Mesh

__all__ = ["TEXTURE_CHANNELS", "write_obj", "write_glb", "write_ply", "mesh_arrays", "to_gltf_frame"]

# channel -> (file name, MTL key)
TEXTURE_CHANNELS: dict[str, tuple[str, str]] = {
    "albedo": ("texture_kd.png", "map_Kd"),
    "roughness": ("texture_pr.png", "map_Pr"),
    "metallic": ("texture_pm.png", "map_Pm"),
    "normal": ("texture_n.png", "norm"),
}
_EXPECTED_CHANNELS = {"albedo": (3, 4), "roughness": (1,), "metallic": (1,), "normal": (3,)}


def to_gltf_frame(xyz: np.ndarray) -> np.ndarray:
    """[N, 3] lift3d world (+z up) -> glTF (+y up): (x, y, z) -> (x, z, -y)."""
    return np.stack([xyz[:, 0], xyz[:, 2], -xyz[:, 1]], axis=-1)


def _np(t: torch.Tensor | np.ndarray | None) -> np.ndarray | None:
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy()
    return np.asarray(t)


def _welded_vertex_normals(v_pos: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """[V, 3] area-weighted normals, shared by vertices at the same position.

    A UV unwrap duplicates vertices along chart seams; normals computed on the split mesh
    would differ on each side of a seam and show it as a crease in shading.
    """
    uniq, inv = np.unique(v_pos, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    f = inv[faces]
    tri = uniq[f]  # [F, 3, 3]
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # length = 2 * area
    vn = np.zeros_like(uniq)
    for k in range(3):
        np.add.at(vn, f[:, k], fn)
    vn /= np.maximum(np.linalg.norm(vn, axis=-1, keepdims=True), 1e-12)
    return vn[inv]


def mesh_arrays(mesh: Mesh) -> dict[str, np.ndarray]:
    """One vertex per (position, uv) pair, as formats with a single index buffer need.

    Returns ``positions`` [K, 3] float32, ``faces`` [F, 3] int64, ``normals`` [K, 3] float32
    (welded across seams) and, when the mesh has UVs, ``uv`` [K, 2] float32 (OBJ convention).
    """
    v_pos = _np(mesh.v_pos).astype(np.float64)
    faces = _np(mesh.t_pos_idx).astype(np.int64)
    normals_pos = _welded_vertex_normals(v_pos, faces)
    out: dict[str, np.ndarray]
    if mesh.v_tex is None or mesh.t_tex_idx is None:
        out = {"positions": v_pos, "faces": faces, "normals": normals_pos}
    else:
        v_tex = _np(mesh.v_tex).astype(np.float64)
        t_tex = _np(mesh.t_tex_idx).astype(np.int64)
        if t_tex.shape != faces.shape:
            raise ValueError(f"Mesh.t_tex_idx {t_tex.shape} must match t_pos_idx {faces.shape}")
        if np.array_equal(t_tex, faces) and len(v_tex) == len(v_pos):
            out = {"positions": v_pos, "faces": faces, "normals": normals_pos, "uv": v_tex}
        else:
            pairs = np.stack([faces.reshape(-1), t_tex.reshape(-1)], axis=-1)
            uniq, inv = np.unique(pairs, axis=0, return_inverse=True)
            out = {
                "positions": v_pos[uniq[:, 0]],
                "faces": inv.reshape(-1, 3),
                "normals": normals_pos[uniq[:, 0]],
                "uv": v_tex[uniq[:, 1]],
            }
    return {k: (v if k == "faces" else v.astype(np.float32)) for k, v in out.items()}


def _check_textures(textures: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for key, img in textures.items():
        if key not in TEXTURE_CHANNELS:
            raise ValueError(f"unknown texture channel {key!r}; known channels: {', '.join(TEXTURE_CHANNELS)}")
        a = to_uint8(img)
        if a.ndim == 2:
            a = a[:, :, None]
        if a.ndim != 3 or a.shape[-1] not in _EXPECTED_CHANNELS[key]:
            raise ValueError(
                f"texture {key!r} must be [H, W, C] with C in {_EXPECTED_CHANNELS[key]}, got {tuple(a.shape)}"
            )
        out[key] = a
    return out


def _fmt_rows(prefix: str, arr: np.ndarray, fmt: str, n_fields: int | None = None) -> str:
    """One line per row of ``arr``: ``prefix`` then ``n_fields`` copies of ``fmt`` (default: one per column)."""
    if len(arr) == 0:
        return ""
    row = prefix + " " + " ".join([fmt] * (n_fields or arr.shape[1])) + "\n"
    return (row * len(arr)) % tuple(arr.reshape(-1).tolist())


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)


def write_obj(
    path: str | os.PathLike,
    mesh: Mesh,
    textures: Mapping[str, np.ndarray] | None = None,
    mtl_name: str = "material_0",
) -> dict[str, Path]:
    """Write ``path`` (.obj), its ``.mtl`` beside it and one PNG per texture channel.

    The OBJ keeps lift3d's frame (+z up). With textures, the mesh must have UVs; the MTL (named
    after the OBJ, e.g. ``model.mtl``) holds one material ``mtl_name`` that references
    ``texture_kd.png`` (and ``texture_pr.png``, ``texture_pm.png``, ``texture_n.png`` when given).
    Returns kind -> path for every file written: ``obj``, ``mtl`` and ``texture_kd`` etc. (the
    PNG names without suffix).
    """
    path = Path(path)
    tex = _check_textures(textures or {})
    arrays = mesh_arrays(mesh)
    if tex and "uv" not in arrays:
        raise ValueError("write_obj got textures but the mesh has no UVs (v_tex, t_tex_idx); unwrap it first")
    written: dict[str, Path] = {}
    mtl_path = path.with_suffix(".mtl")
    parts = ["# lift3d export: +z up, right-handed\n"]
    if tex:
        parts.append(f"mtllib {mtl_path.name}\n")
    parts.append(_fmt_rows("v", arrays["positions"], "%.6f"))
    has_uv = "uv" in arrays
    if has_uv:
        parts.append(_fmt_rows("vt", arrays["uv"], "%.6f"))
    parts.append(_fmt_rows("vn", arrays["normals"], "%.6f"))
    if tex:
        parts.append(f"usemtl {mtl_name}\n")
    f1 = arrays["faces"] + 1
    if has_uv:
        parts.append(_fmt_rows("f", np.repeat(f1, 3, axis=1), "%d/%d/%d", 3))
    else:
        parts.append(_fmt_rows("f", np.repeat(f1, 2, axis=1), "%d//%d", 3))
    _write_text(path, "".join(parts))
    written["obj"] = path

    if tex:
        mtl = [
            f"newmtl {mtl_name}\n",
            "Ka 1.000000 1.000000 1.000000\n",
            "Kd 1.000000 1.000000 1.000000\n",
            "Ks 0.000000 0.000000 0.000000\n",
            "Ns 0.000000\n",
            "d 1.000000\n",
            "illum 1\n",
        ]
        for key, img in tex.items():
            fname, mtl_key = TEXTURE_CHANNELS[key]
            tex_path = path.parent / fname
            save_image(tex_path, img)
            written[Path(fname).stem] = tex_path
            mtl.append(f"{mtl_key} {fname}\n")
        _write_text(mtl_path, "".join(mtl))
        written["mtl"] = mtl_path
    return written


def write_glb(path: str | os.PathLike, mesh: Mesh, textures: Mapping[str, np.ndarray] | None = None) -> Path:
    """Write a binary glTF with a PBR material (through trimesh), converted to glTF's +y up.

    ``albedo`` becomes baseColorTexture; ``roughness`` / ``metallic`` are packed into one
    metallicRoughnessTexture (G = roughness, B = metallic, as glTF requires). glTF multiplies
    the map by a factor, so a channel without a map gets 255 in the map and its default in the
    factor (roughness 1, metallic 0). ``normal`` becomes normalTexture. Without textures the
    mesh is written untextured. Vertex normals are written too (welded across UV seams).
    """
    import trimesh
    from PIL import Image
    from trimesh.visual.material import PBRMaterial
    from trimesh.visual.texture import TextureVisuals

    path = Path(path)
    tex = _check_textures(textures or {})
    arrays = mesh_arrays(mesh)
    if tex and "uv" not in arrays:
        raise ValueError("write_glb got textures but the mesh has no UVs (v_tex, t_tex_idx); unwrap it first")
    tm = trimesh.Trimesh(
        vertices=to_gltf_frame(arrays["positions"]),
        faces=arrays["faces"],
        vertex_normals=to_gltf_frame(arrays["normals"]),
        process=False,
    )
    if tex:
        kw: dict = {"name": "material_0", "doubleSided": False}
        if "albedo" in tex:
            a = tex["albedo"]
            kw["baseColorTexture"] = Image.fromarray(np.ascontiguousarray(a), "RGBA" if a.shape[-1] == 4 else "RGB")
            kw["baseColorFactor"] = [1.0, 1.0, 1.0, 1.0]
        if "roughness" in tex or "metallic" in tex:
            ref = tex.get("roughness", tex.get("metallic"))
            mr = np.zeros(ref.shape[:2] + (3,), np.uint8)
            # Without a map, the factor alone carries the value, so the map channel must be 1.
            mr[..., 1] = tex["roughness"][..., 0] if "roughness" in tex else 255
            mr[..., 2] = tex["metallic"][..., 0] if "metallic" in tex else 255
            kw["metallicRoughnessTexture"] = Image.fromarray(mr, "RGB")
            kw["roughnessFactor"] = 1.0
            kw["metallicFactor"] = 1.0 if "metallic" in tex else 0.0
        else:
            kw["roughnessFactor"] = 1.0
            kw["metallicFactor"] = 0.0
        if "normal" in tex:
            kw["normalTexture"] = Image.fromarray(np.ascontiguousarray(tex["normal"]), "RGB")
        tm.visual = TextureVisuals(uv=arrays["uv"], material=PBRMaterial(**kw))
    data = tm.export(file_type="glb", include_normals=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_ply(
    path: str | os.PathLike, mesh: Mesh, vertex_colors: torch.Tensor | np.ndarray | None = None
) -> Path:
    """Write a binary little-endian PLY in lift3d's frame (+z up), with per-vertex RGB if given.

    ``vertex_colors`` [V, 3] (or [V, 4]; alpha kept) is float in [0, 1] or uint8, one row per
    ``mesh.v_pos`` row. Faces are written as given (UVs are ignored).
    """
    path = Path(path)
    v = _np(mesh.v_pos).astype(np.float32)
    f = _np(mesh.t_pos_idx).astype(np.int32)
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    cols = None
    if vertex_colors is not None:
        cols = to_uint8(vertex_colors)
        if cols.ndim != 2 or cols.shape[0] != len(v) or cols.shape[1] not in (3, 4):
            raise ValueError(f"vertex_colors must be [{len(v)}, 3 or 4], got {tuple(cols.shape)}")
        fields += [(n, "u1") for n in ("red", "green", "blue", "alpha")[: cols.shape[1]]]
    vert = np.empty(len(v), dtype=fields)
    vert["x"], vert["y"], vert["z"] = v[:, 0], v[:, 1], v[:, 2]
    if cols is not None:
        for k, n in enumerate(("red", "green", "blue", "alpha")[: cols.shape[1]]):
            vert[n] = cols[:, k]
    face = np.empty(len(f), dtype=[("n", "u1"), ("idx", "<i4", (3,))])
    face["n"] = 3
    face["idx"] = f
    header = ["ply", "format binary_little_endian 1.0", "comment lift3d export: +z up, right-handed",
              f"element vertex {len(v)}"]
    header += [f"property {'float' if t == '<f4' else 'uchar'} {n}" for n, t in fields]
    header += [f"element face {len(f)}", "property list uchar int vertex_indices", "end_header"]
    buf = io.BytesIO()
    buf.write(("\n".join(header) + "\n").encode("ascii"))
    buf.write(vert.tobytes())
    buf.write(face.tobytes())
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return path
