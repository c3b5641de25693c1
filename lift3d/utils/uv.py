"""UV unwrapping with xatlas and texture baking by rasterizing the mesh in UV space.

Baking follows the recipe of Magic3D / Fantasia3D exports (Lin et al. 2023, "Magic3D: High-Resolution
Text-to-3D Content Creation"; Chen et al. 2023, "Fantasia3D"): unwrap the extracted mesh into
charts (xatlas), draw every triangle at its UV position with a rasterizer, interpolate the
3D position of each covered texel, query the field's material there, and write the result into
the texture. Texels just outside the charts are then filled by dilation ("seam padding"), so
bilinear filtering and mipmapping at chart borders read chart colours instead of background.

Texture layout. The rasterizer writes row i at clip y = 2 (i + 0.5) / H - 1, and a UV vertex is
placed at clip (2u - 1, 2v - 1); so rasterized row i holds v = (i + 0.5) / H, row 0 at v = 0.
OBJ (and trimesh) put v = 0 on the bottom row of the image, so :func:`bake_texture` returns
images flipped vertically: row 0 is the top of the picture (v = 1), ready to save as PNG and to
use with the UVs unchanged. glTF's top-left origin is handled by the GLB writer (``1 - v``).

Both the exporter and the fixed-mesh geometry (``texture: uv``, baked at a stage switch) unwrap
and bake, so this lives in ``utils``, next to the rasterization primitives it draws with.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Integer
from torch import Tensor

from lift3d.utils.mesh import Mesh
from lift3d.utils.rasterize_ops import interpolate, rasterize

__all__ = ["unwrap_uv", "bake_texture", "dilate_texture", "to_tangent_space", "welded_vertex_normals"]


# xatlas runs in a child process: on some meshes (even a plain icosphere of 80k faces) it
# segfaults, which would otherwise kill a training run at its very last step. The child imports
# only numpy and xatlas, so it starts fast.
_XATLAS_WORKER = r"""
import json, sys
import numpy as np
import xatlas
src, dst, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
data = np.load(src)
atlas = xatlas.Atlas()
atlas.add_mesh(data["v"], data["f"])
chart, pack = xatlas.ChartOptions(), xatlas.PackOptions()
for obj, key in ((chart, "chart"), (pack, "pack")):
    for k, v in opts[key].items():
        if not hasattr(obj, k):
            sys.stderr.write("unknown xatlas %s option %r" % (key, k))
            sys.exit(2)
        setattr(obj, k, v)
atlas.generate(chart, pack)
if atlas.atlas_count != 1:
    sys.stderr.write("xatlas packed the charts into %d atlases; expected one" % atlas.atlas_count)
    sys.exit(3)
vmapping, indices, uvs = atlas[0]
np.savez(dst, vmapping=vmapping, indices=indices, uvs=uvs)
"""


def _run_xatlas(v: np.ndarray, f: np.ndarray, opts: dict, timeout: float | None) -> tuple[np.ndarray, ...] | int:
    """(vmapping, indices, uvs), or the child's signal number (> 0) when xatlas crashed."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="lift3d-xatlas-") as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(src, v=v, f=f)
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _XATLAS_WORKER, str(src), str(dst), json.dumps(opts)],
                capture_output=True, text=True, timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"xatlas did not finish unwrapping {len(f)} faces within {timeout} s; export a coarser "
                "isosurface (lower isosurface resolution) or limit chart sizes (xatlas max_chart_area)"
            ) from None
        if proc.returncode < 0:
            return -proc.returncode
        if proc.returncode != 0:
            raise RuntimeError(f"xatlas failed (exit code {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        with np.load(dst) as out:
            return out["vmapping"], out["indices"], out["uvs"]


def unwrap_uv(
    mesh: Mesh,
    texture_size: int = 1024,
    padding: int = 2,
    chart_options: dict | None = None,
    pack_options: dict | None = None,
    timeout: float | None = None,
) -> Mesh:
    """Cut ``mesh`` into charts and pack them into one [0, 1]^2 atlas with xatlas.

    Returns a new Mesh whose vertices are re-indexed as xatlas returns them (``vmapping``):
    ``v_pos [T, 3] = mesh.v_pos[vmapping]``, ``t_pos_idx = t_tex_idx [F, 3]``, ``v_tex [T, 2]``
    (OBJ convention, v up); per-vertex ``extras`` with V rows are re-indexed the same way.
    Faces keep their order. ``padding`` is the gap, in atlas texels, xatlas leaves around each
    chart (seam padding later fills it); ``texture_size`` sets the packing resolution.
    ``chart_options`` / ``pack_options`` set fields of xatlas's ChartOptions / PackOptions
    (e.g. ``{"max_chart_area": 0.05}``, which makes large noisy isosurfaces much faster).

    xatlas runs in a child process (``timeout`` seconds at most). If it crashes, which it does on
    some very regular meshes, it is run once more on positions jittered by 1e-4 of the bounding
    box diagonal: that only moves chart boundaries, since the output positions are looked up in
    the original mesh through ``vmapping``.
    """
    if mesh.n_faces == 0:
        raise ValueError("unwrap_uv: the mesh has no faces")
    v = mesh.v_pos.detach().cpu().numpy().astype(np.float32)
    f = mesh.t_pos_idx.detach().cpu().numpy().astype(np.uint32)
    pack = {"resolution": int(texture_size), "padding": int(padding), "bilinear": True, "blockAlign": False}
    pack.update(pack_options or {})
    opts = {"chart": dict(chart_options or {}), "pack": pack}
    result = _run_xatlas(v, f, opts, timeout)
    if isinstance(result, int):
        diag = float(np.linalg.norm(v.max(0) - v.min(0))) or 1.0
        jitter = np.random.default_rng(0).standard_normal(v.shape).astype(np.float32) * (1e-4 * diag)
        first = result
        result = _run_xatlas(v + jitter, f, opts, timeout)
        if isinstance(result, int):
            raise RuntimeError(
                f"xatlas crashed (signal {first}, then {result} on jittered positions) unwrapping a mesh of "
                f"{mesh.n_vertices} vertices and {mesh.n_faces} faces; try other xatlas chart options "
                "or a different isosurface resolution"
            )
    vmapping, indices, uvs = result
    dev = mesh.v_pos.device
    vmap = torch.from_numpy(vmapping.astype(np.int64)).to(dev)
    idx = torch.from_numpy(indices.astype(np.int64)).to(dev)
    extras = {k: (t[vmap] if t.shape[:1] == (mesh.n_vertices,) else t) for k, t in mesh.extras.items()}
    return Mesh(
        v_pos=mesh.v_pos[vmap],
        t_pos_idx=idx,
        v_tex=torch.from_numpy(np.ascontiguousarray(uvs, dtype=np.float32)).to(dev),
        t_tex_idx=idx.clone(),
        extras=extras,
    )


def _first(x: Tensor | tuple) -> Tensor:
    # nvdiffrast-shaped ops return (result, derivatives); accept a bare tensor too.
    return x[0] if isinstance(x, (tuple, list)) else x


def rasterize_uv(mesh: Mesh, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rasterize the UV layout: returns (rast [1, S, S, 4], corner tri [F, 3] int32, corner uv [3F, 2]).

    Triangles are drawn as independent corners (3 per face) so attributes indexed by
    ``t_pos_idx`` and UVs indexed by ``t_tex_idx`` can both be interpolated with one index
    buffer. Rows are in rasterizer order (row 0 at v = 0).
    """
    if mesh.v_tex is None or mesh.t_tex_idx is None:
        raise ValueError("bake_texture needs a mesh with UVs (v_tex, t_tex_idx); call unwrap_uv first")
    dev = mesh.v_pos.device
    n_f = mesh.n_faces
    uv = mesh.v_tex[mesh.t_tex_idx.long()].reshape(-1, 2).float()  # [3F, 2]
    clip = torch.cat([uv * 2.0 - 1.0, torch.zeros_like(uv[:, :1]), torch.ones_like(uv[:, :1])], dim=-1)
    tri = torch.arange(3 * n_f, device=dev, dtype=torch.int32).reshape(n_f, 3)
    rast = _first(rasterize(clip[None].contiguous(), tri, (size, size)))
    return rast, tri, uv


def welded_vertex_normals(mesh: Mesh) -> Float[Tensor, "V 3"]:
    """Area-weighted vertex normals shared by all copies of a position.

    The unwrap splits vertices along seams; the writers export normals welded the same way
    (see :mod:`lift3d.exporters.formats`), and a normal map must be baked against the normals
    a viewer will interpolate, or seams show in the lighting.
    """
    uniq, inv = torch.unique(mesh.v_pos, dim=0, return_inverse=True)
    welded = Mesh(uniq, inv[mesh.t_pos_idx.long()])
    return welded.vertex_normals()[inv]


def to_tangent_space(
    normal: Float[Tensor, "N 3"], mesh: Mesh, face_id: Integer[Tensor, "N"], bary_normal: Float[Tensor, "N 3"]
) -> Float[Tensor, "N 3"]:
    """World-space unit normals [N, 3] -> tangent-space normal-map values in [0, 1] [N, 3].

    The frame of each texel is (T, B, N): N the interpolated (smooth) mesh normal
    ``bary_normal`` [N, 3], T and B the directions of increasing u and v on its face
    ``face_id`` [N], orthogonalised against N (Gram-Schmidt; B keeps its side so mirrored charts
    are right). This is the OpenGL / glTF convention (green = +v).
    """
    v = mesh.v_pos[mesh.t_pos_idx.long()]  # [F, 3, 3]
    t = mesh.v_tex[mesh.t_tex_idx.long()]  # [F, 3, 2]
    e1, e2 = v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]
    d1, d2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
    det = d1[:, 0] * d2[:, 1] - d2[:, 0] * d1[:, 1]
    r = torch.where(det.abs() > 1e-12, 1.0 / det, torch.zeros_like(det))[:, None]
    tan = (e1 * d2[:, 1:2] - e2 * d1[:, 1:2]) * r  # [F, 3] dP/du
    bit = (e2 * d1[:, 0:1] - e1 * d2[:, 0:1]) * r  # [F, 3] dP/dv
    n = F.normalize(bary_normal, dim=-1)
    tn = tan[face_id]
    tn = F.normalize(tn - (tn * n).sum(-1, keepdim=True) * n, dim=-1)
    bn = torch.cross(n, tn, dim=-1)
    bn = torch.where(((bn * bit[face_id]).sum(-1, keepdim=True) < 0), -bn, bn)
    local = torch.stack([(normal * tn).sum(-1), (normal * bn).sum(-1), (normal * n).sum(-1)], dim=-1)
    return (F.normalize(local, dim=-1) * 0.5 + 0.5).clamp(0, 1)


@torch.no_grad()
def bake_texture(
    mesh: Mesh,
    attribute_fn: Callable[[Tensor], dict[str, Tensor]],
    size: int,
    pad_pixels: int = 4,
    chunk_size: int = 262144,
    tangent_normals: bool = True,
) -> dict[str, Tensor]:
    """Bake ``attribute_fn`` into [size, size] textures over the UV layout of ``mesh``.

    Args:
        mesh: a Mesh with UVs (``unwrap_uv``).
        attribute_fn: world points [N, 3] -> dict channel -> [N, C] values (e.g. ``albedo`` [N, 3],
            ``roughness`` [N, 1]); called in chunks of ``chunk_size`` points, without gradients.
            A ``normal`` channel is taken as world-space unit normals and, with
            ``tangent_normals``, stored as a tangent-space normal map in [0, 1].
        size: texture resolution.
        pad_pixels: iterations of seam-padding dilation (:func:`dilate_texture`).

    Returns:
        dict channel -> [size, size, C] float tensors (image layout: row 0 is the top, v = 1;
        OBJ UV convention), plus ``mask`` [size, size, 1] bool: texels covered by a triangle
        before padding. Texels neither covered nor padded hold the channel's mean value.
    """
    rast, tri, _ = rasterize_uv(mesh, size)
    rast = rast[0]  # [S, S, 4]
    mask = rast[..., 3] > 0  # [S, S]
    pos_corner = mesh.v_pos[mesh.t_pos_idx.long()].reshape(-1, 3).float()  # [3F, 3]
    pos = _first(interpolate(pos_corner[None].contiguous(), rast[None].contiguous(), tri))[0]  # [S, S, 3]
    pts = pos[mask]  # [N, 3]
    face_id = rast[..., 3][mask].long() - 1  # [N]
    if pts.shape[0] == 0:
        raise ValueError(f"bake_texture: no texel of the {size}x{size} texture is covered by a triangle")

    chans: dict[str, Tensor] = {}
    for start in range(0, pts.shape[0], chunk_size):
        out = attribute_fn(pts[start : start + chunk_size])
        for k, val in out.items():
            if val.ndim != 2 or val.shape[0] != min(chunk_size, pts.shape[0] - start):
                raise ValueError(f"attribute_fn channel {k!r} must be [N, C] for N points, got {tuple(val.shape)}")
            chans.setdefault(k, []).append(val.detach().float())
    values = {k: torch.cat(v, dim=0) for k, v in chans.items()}

    if "normal" in values and tangent_normals:
        vn_corner = welded_vertex_normals(mesh)[mesh.t_pos_idx.long()].reshape(-1, 3).float()
        vn = _first(interpolate(vn_corner[None].contiguous(), rast[None].contiguous(), tri))[0][mask]
        values["normal"] = to_tangent_space(F.normalize(values["normal"], dim=-1), mesh, face_id, vn)

    result: dict[str, Tensor] = {}
    for k, val in values.items():
        img = torch.zeros(size, size, val.shape[-1], dtype=val.dtype, device=val.device)
        img[mask.to(val.device)] = val
        img = dilate_texture(img, mask.to(val.device)[..., None], pad_pixels, fill_rest=True)
        result[k] = img.flip(0)
    result["mask"] = mask[..., None].flip(0)
    return result


def dilate_texture(
    img: Float[Tensor, "H W C"], mask: Bool[Tensor, "H W 1"], n_iters: int, fill_rest: bool = False
) -> Float[Tensor, "H W C"]:
    """Seam padding: grow covered texels into uncovered neighbours, ``n_iters`` texels deep.

    ``img`` [H, W, C], ``mask`` [H, W, 1] bool (covered). Each pass gives every uncovered texel
    that touches covered ones (8-neighbourhood) the mean of those neighbours, then counts it as
    covered. With ``fill_rest``, texels still uncovered afterwards get the mean of the covered
    ones, so low mipmap levels do not fade to black. Returns a new [H, W, C] tensor.
    """
    x = (img * mask).permute(2, 0, 1)[None]  # [1, C, H, W]
    m = mask.to(img.dtype).permute(2, 0, 1)[None]  # [1, 1, H, W]
    c = x.shape[1]
    k = torch.ones(1, 1, 3, 3, dtype=img.dtype, device=img.device)
    for _ in range(int(n_iters)):
        count = F.conv2d(m, k, padding=1)
        total = F.conv2d(x, k.expand(c, 1, 3, 3), padding=1, groups=c)
        grow = (count > 0) & (m == 0)
        if not grow.any():
            break
        x = torch.where(grow, total / count.clamp_min(1), x)
        m = torch.where(grow, torch.ones_like(m), m)
    if fill_rest:
        covered = m[0, 0] > 0
        if covered.any():
            mean = x[0][:, covered].mean(dim=1)[None, :, None, None]
            x = torch.where(m > 0, x, mean)
    return x[0].permute(1, 2, 0).contiguous()
