"""Image-based lighting for the PBR material: equirect maps, prefiltering, split-sum BRDF table.

Fantasia3D (Chen et al., 2023, "Fantasia3D: Disentangling Geometry and Appearance for
High-quality Text-to-3D Content Creation") shades its PBR appearance with a fixed HDR
environment through the split-sum approximation of Karis (2013, "Real Shading in Unreal
Engine 4"):

    L_spec(v) ~= prefiltered(reflect(v, n), roughness) * (F0 * A(n.v, roughness) + B(n.v, roughness))
    L_diff    = albedo * irradiance(n) / pi

Everything here runs in torch on any device. The environment is an equirectangular map with
+z up (row 0 is the zenith; the +x direction is the centre column, +y a quarter from the left,
so a panorama seen from inside is not mirrored). At construction :class:`EnvLight` precomputes,
once, (1) a few copies of the map prefiltered with the GGX lobe of increasing roughness, by
direct summation over the texels of a downsampled map (cheap at these sizes), and (2) a
cosine-convolved irradiance map. Lookups are bilinear ``grid_sample`` calls. The BRDF table
(A, B) is integrated by GGX importance sampling on first use and cached: no downloaded LUT.

Maps come from an HDR file (Radiance ``.hdr`` read by our own RGBE decoder, since imageio needs
a downloaded plugin for it; ``.exr`` when imageio can read it; ``.npy`` float arrays; LDR
``.png``/``.jpg`` converted from sRGB to linear), or from :func:`procedural_sky` (a sky gradient
with a sun, the default).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# Equirectangular mapping (+z up)


def dir_to_equirect_uv(dirs: Float[Tensor, "... 3"]) -> Float[Tensor, "... 2"]:
    """Unit directions -> (s, t) in [0, 1]: s across the width, t down the height (t=0: +z).

    s = 0.5 - atan2(y, x) / (2 pi), t = acos(z) / pi. Safe (finite gradients) at the poles.
    """
    d = F.normalize(dirs, dim=-1)
    x, y, z = d.unbind(-1)
    # atan2 and acos have infinite derivatives at the poles; substitute harmless values there.
    off_axis = x * x + y * y > 1e-12
    xs = torch.where(off_axis, x, torch.ones_like(x))
    ys = torch.where(off_axis, y, torch.zeros_like(y))
    s = 0.5 - torch.atan2(ys, xs) / (2.0 * math.pi)
    t = torch.acos(z.clamp(-1.0 + 1e-6, 1.0 - 1e-6)) / math.pi
    return torch.stack([s, t], dim=-1)


def equirect_dirs(height: int, width: int, device=None, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """Directions of texel centres [H, W, 3] and the solid angle of each row's texels [H]."""
    t = (torch.arange(height, device=device, dtype=torch.float64) + 0.5) / height
    s = (torch.arange(width, device=device, dtype=torch.float64) + 0.5) / width
    theta = t * math.pi  # polar angle from +z
    phi = (0.5 - s) * 2.0 * math.pi
    th, ph = torch.meshgrid(theta, phi, indexing="ij")
    dirs = torch.stack([torch.sin(th) * torch.cos(ph), torch.sin(th) * torch.sin(ph), torch.cos(th)], dim=-1)
    # Exact solid angle of a texel: dphi * (cos(theta0) - cos(theta1)).
    t0 = torch.arange(height, device=device, dtype=torch.float64) / height * math.pi
    t1 = t0 + math.pi / height
    solid = (2.0 * math.pi / width) * (torch.cos(t0) - torch.cos(t1))
    return dirs.to(dtype), solid.to(dtype)


def _equirect_grid(dirs: Float[Tensor, "N 3"], width: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """grid_sample x, y [N] for a texture padded with one wrapped column on each side."""
    uv = dir_to_equirect_uv(dirs).to(dtype)  # [N, 2]
    gx = (uv[:, 0] * width + 1.0) / (width + 2) * 2.0 - 1.0
    gy = uv[:, 1] * 2.0 - 1.0
    return gx, gy


def _wrap_pad(tex: Tensor) -> Tensor:
    """One wrapped column on each side (last dim), so bilinear filtering is seamless at s = 0 / 1."""
    return torch.cat([tex[..., -1:], tex, tex[..., :1]], dim=-1)


def sample_equirect(tex: Float[Tensor, "C H W"], dirs: Float[Tensor, "... 3"]) -> Float[Tensor, "... C"]:
    """Bilinear lookup of an equirect texture in directions ``dirs``, wrapping around in azimuth."""
    C, H, W = tex.shape
    lead = dirs.shape[:-1]
    gx, gy = _equirect_grid(dirs.reshape(-1, 3), W, tex.dtype)
    grid = torch.stack([gx, gy], dim=-1)[None, None]  # [1, 1, N, 2]
    out = F.grid_sample(_wrap_pad(tex)[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, :, 0].transpose(0, 1).reshape(*lead, C)


def sample_equirect_levels(
    volume: Float[Tensor, "C K H W"], dirs: Float[Tensor, "N 3"], level: Float[Tensor, "N 1"]
) -> Float[Tensor, "N C"]:
    """Trilinear lookup in a stack of K equirect maps: bilinear in direction, linear in ``level``
    (a fractional index in [0, K-1]). One ``grid_sample`` call for all levels."""
    C, K, H, W = volume.shape
    gx, gy = _equirect_grid(dirs, W, volume.dtype)
    gz = (level[:, 0].to(volume.dtype) + 0.5) / K * 2.0 - 1.0
    grid = torch.stack([gx, gy, gz], dim=-1)[None, None, None]  # [1, 1, 1, N, 3]
    out = F.grid_sample(_wrap_pad(volume)[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, :, 0, 0].transpose(0, 1)  # [N, C]


def resize_equirect(img: Float[Tensor, "H W C"], height: int) -> Float[Tensor, "h w C"]:
    """Resize to ``height`` x ``2 height``: area averaging when shrinking, bilinear when growing."""
    x = img.permute(2, 0, 1)[None]
    size = (height, 2 * height)
    if img.shape[0] == height and img.shape[1] == 2 * height:
        return img
    if img.shape[0] >= height and img.shape[1] >= 2 * height:
        x = F.interpolate(x, size=size, mode="area")
    else:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x[0].permute(1, 2, 0)


# ---------------------------------------------------------------------------------------------
# Loading maps


def read_radiance_hdr(path: str | Path) -> np.ndarray:
    """Decode a Radiance RGBE ``.hdr`` file (flat or run-length encoded) to float32 [H, W, 3]."""
    data = Path(path).read_bytes()
    if not (data.startswith(b"#?RADIANCE") or data.startswith(b"#?RGBE")):
        raise ValueError(f"{path} is not a Radiance .hdr file (no '#?RADIANCE' header)")
    end = data.find(b"\n\n")
    if end < 0:
        raise ValueError(f"{path}: .hdr header does not end with an empty line")
    header = data[:end].decode("ascii", "replace")
    if "FORMAT=" in header and "32-bit_rle_rgbe" not in header:
        raise ValueError(f"{path}: only the 32-bit_rle_rgbe .hdr format is supported (not XYZE)")
    res_end = data.find(b"\n", end + 2)
    res = data[end + 2:res_end].decode("ascii").split()
    if len(res) != 4 or res[0] != "-Y" or res[2] != "+X":
        raise ValueError(f"{path}: unsupported .hdr orientation {' '.join(res)!r} (expected '-Y H +X W')")
    H, W = int(res[1]), int(res[3])
    buf = np.frombuffer(data, dtype=np.uint8, offset=res_end + 1)
    out = np.empty((H, W, 4), dtype=np.uint8)
    pos = 0
    for row in range(H):
        rle = 8 <= W < 32768 and buf[pos] == 2 and buf[pos + 1] == 2 and (buf[pos + 2] << 8 | buf[pos + 3]) == W
        if not rle:  # flat scanline (old-style RLE is not produced by any current writer)
            out[row] = buf[pos:pos + 4 * W].reshape(W, 4)
            pos += 4 * W
            continue
        pos += 4
        for ch in range(4):
            col = 0
            while col < W:
                count = int(buf[pos])
                pos += 1
                if count > 128:  # a run of one value
                    count -= 128
                    out[row, col:col + count, ch] = buf[pos]
                    pos += 1
                else:  # literal values
                    out[row, col:col + count, ch] = buf[pos:pos + count]
                    pos += count
                col += count
    e = out[..., 3].astype(np.int32)
    scale = np.where(e > 0, np.ldexp(1.0, e - 136), 0.0).astype(np.float32)
    return out[..., :3].astype(np.float32) * scale[..., None]


def srgb_to_linear(x: Tensor) -> Tensor:
    return torch.where(x <= 0.04045, x / 12.92, ((x.clamp(min=0.0) + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: Tensor) -> Tensor:
    x = x.clamp(min=0.0)
    return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x.clamp(min=0.0031308) ** (1.0 / 2.4) - 0.055)


def load_environment(path: str | Path) -> Float[Tensor, "H W 3"]:
    """An equirect environment as linear radiance [H, W, 3] (float32)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"environment_texture {str(path)!r} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".hdr":
        arr = read_radiance_hdr(p)
    elif suffix == ".npy":
        arr = np.load(p).astype(np.float32)
    else:
        import imageio.v3 as iio

        try:
            img = iio.imread(p)
        except Exception as exc:
            raise ValueError(
                f"cannot read environment_texture {str(p)!r} ({exc}); supported: .hdr, .npy, and what imageio reads "
                "(.png, .jpg; .exr only with an imageio plugin for it)"
            ) from exc
        img = np.asarray(img)
        if np.issubdtype(img.dtype, np.integer):
            # 8/16-bit images are display-referred sRGB.
            lin = srgb_to_linear(torch.from_numpy(img.astype(np.float32) / np.iinfo(img.dtype).max))
            arr = lin.numpy()
        else:
            arr = img.astype(np.float32)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] < 3:
        raise ValueError(f"environment_texture {str(p)!r} must be an [H, W, 3] image, got shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr[..., :3]))


def procedural_sky(
    height: int = 64,
    sun_elevation_deg: float = 45.0,
    sun_azimuth_deg: float = 30.0,
    sun_radius_deg: float = 4.0,
    sun_strength: float = 0.5,
    zenith: tuple[float, float, float] = (0.5, 0.55, 0.65),
    horizon: tuple[float, float, float] = (0.8, 0.8, 0.8),
    ground: tuple[float, float, float] = (0.3, 0.28, 0.25),
) -> Float[Tensor, "H W 3"]:
    """A sky gradient with a sun disc, [height, 2 height, 3] linear radiance.

    ``sun_strength`` is the sun's irradiance on a surface facing it, divided by pi (its added
    brightness on a white diffuse surface), made exact on the grid whatever the resolution.
    Defaults: a soft, nearly neutral sky so albedo reads true, and a sun from the front-left-top.
    """
    dirs, solid = equirect_dirs(height, 2 * height, dtype=torch.float64)
    z = dirs[..., 2:]
    zen, hor, gnd = (torch.tensor(c, dtype=torch.float64) for c in (zenith, horizon, ground))
    sky = hor + (zen - hor) * z.clamp(min=0.0).sqrt()
    # Ground darkens quickly below the horizon, like a diffuse floor seen at grazing angles.
    floor = hor + (gnd - hor) * (1.0 - torch.exp(-8.0 * (-z).clamp(min=0.0)))
    env = torch.where(z >= 0, sky, floor)
    e, a = math.radians(sun_elevation_deg), math.radians(sun_azimuth_deg)
    sun_dir = torch.tensor([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)], dtype=torch.float64)
    ang = torch.acos((dirs @ sun_dir).clamp(-1.0, 1.0))  # [H, W]
    rad = math.radians(sun_radius_deg)
    disc = ((1.5 * rad - ang) / rad).clamp(0.0, 1.0)  # soft edge: 1 inside 0.5 rad, 0 beyond 1.5 rad
    if sun_strength > 0 and disc.sum() > 0:
        cos_to_sun = (dirs @ sun_dir).clamp(min=0.0)
        irr = (disc * cos_to_sun * solid[:, None]).sum()
        env = env + (sun_strength * math.pi / irr) * disc[..., None]
    return env.float()


# ---------------------------------------------------------------------------------------------
# Prefiltering


def _convolve(env: Tensor, out_height: int, weight_fn, chunk: int = 1 << 22) -> Tensor:
    """out(R) = sum_L w(R.L) env(L) dOmega / sum_L w(R.L) dOmega over the texels of ``env`` [h, w, 3]."""
    h, w = env.shape[:2]
    L, solid = equirect_dirs(h, w, device=env.device, dtype=env.dtype)
    L = L.reshape(-1, 3)  # [P, 3]
    dw = solid[:, None].expand(h, w).reshape(-1)  # [P]
    rad = env.reshape(-1, 3)  # [P, 3]
    R, _ = equirect_dirs(out_height, 2 * out_height, device=env.device, dtype=env.dtype)
    R = R.reshape(-1, 3)  # [M, 3]
    rows = max(1, chunk // L.shape[0])
    out = []
    for i in range(0, R.shape[0], rows):
        wts = weight_fn(R[i:i + rows] @ L.T) * dw  # [m, P]
        out.append((wts @ rad) / wts.sum(-1, keepdim=True).clamp(min=1e-20))
    return torch.cat(out).reshape(out_height, 2 * out_height, 3)


def ggx_lobe_weight(cos_rl: Tensor, alpha: float) -> Tensor:
    """Split-sum prefilter weight with n = v = r: D_GGX(n.h) * (n.l), h halfway between r and l."""
    nh2 = ((1.0 + cos_rl) * 0.5).clamp(min=0.0)  # cos^2 of half the angle between r and l
    a2 = alpha * alpha
    return a2 / (nh2 * (a2 - 1.0) + 1.0).clamp(min=1e-12) ** 2 * cos_rl.clamp(min=0.0)


def prefilter_specular(env: Float[Tensor, "H W 3"], roughness: float, max_height: int) -> Float[Tensor, "h w 3"]:
    """The environment blurred by the GGX lobe of ``roughness`` (alpha = roughness^2)."""
    alpha = max(roughness * roughness, 1e-3)
    # Source texels about a quarter of the lobe's width (~2 alpha radians) resolve the lobe; the
    # result is smoother than its source, so half that resolution holds it (and costs 4x less).
    height = int(min(max_height, max(16, 2 ** math.ceil(math.log2(2.0 * math.pi / alpha)))))
    src = resize_equirect(env, height)
    return _convolve(src, height // 2, lambda c: ggx_lobe_weight(c, alpha))


def irradiance_map(env: Float[Tensor, "H W 3"], height: int = 16) -> Float[Tensor, "h w 3"]:
    """Cosine-weighted average of the environment over the hemisphere of each normal (= E / pi)."""
    src = resize_equirect(env, min(2 * height, env.shape[0]))
    return _convolve(src, height, lambda c: c.clamp(min=0.0))


# ---------------------------------------------------------------------------------------------
# Split-sum BRDF table


def _hammersley(n: int, dtype=torch.float64) -> tuple[Tensor, Tensor]:
    i = torch.arange(n, dtype=torch.int64)
    bits = torch.zeros(n, dtype=torch.float64)
    scale = 0.5
    j = i.clone()
    for _ in range(32):
        bits += (j & 1).to(torch.float64) * scale
        j = j >> 1
        scale *= 0.5
    return (i.to(torch.float64) / n).to(dtype), bits.to(dtype)


def compute_brdf_lut(size: int = 32, samples: int = 512) -> Float[Tensor, "2 S S"]:
    """(A, B) of the split-sum GGX/Smith/Schlick BRDF, indexed [channel, roughness, n.v].

    Texel (i, j) holds roughness (i + 0.5) / size and n.v (j + 0.5) / size; integrated by GGX
    importance sampling with a Hammersley set, in float64.
    """
    c = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    rough, nov = torch.meshgrid(c, c, indexing="ij")  # [S, S]
    alpha = (rough * rough)[..., None]  # [S, S, 1]
    nov = nov[..., None]
    u1, u2 = _hammersley(samples)
    phi = 2.0 * math.pi * u1  # [K]
    cos_h = torch.sqrt((1.0 - u2) / (1.0 + (alpha * alpha - 1.0) * u2))  # [S, S, K]
    sin_h = torch.sqrt((1.0 - cos_h * cos_h).clamp(min=0.0))
    hx, hy, hz = sin_h * torch.cos(phi), sin_h * torch.sin(phi), cos_h
    vx, vz = torch.sqrt(1.0 - nov * nov), nov  # view in the xz plane, normal +z
    voh = (vx * hx + vz * hz).clamp(min=0.0)
    nol = (2.0 * voh * hz - vz).clamp(min=0.0)  # z of l = 2 (v.h) h - v
    k = alpha / 2.0  # Smith-Schlick k for image-based lighting (Karis 2013)
    g = (nov / (nov * (1.0 - k) + k)) * (nol / (nol * (1.0 - k) + k))
    g_vis = torch.where(nol > 0, g * voh / (hz * nov).clamp(min=1e-12), torch.zeros_like(g))
    fc = (1.0 - voh) ** 5
    a = ((1.0 - fc) * g_vis).mean(-1)
    b = (fc * g_vis).mean(-1)
    return torch.stack([a, b]).float()


_LUT_CACHE: dict[tuple[str, torch.dtype], Tensor] = {}


def brdf_lut(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """The cached split-sum table [2, S, S] on ``device``."""
    key = (str(device), dtype)
    if key not in _LUT_CACHE:
        base = _LUT_CACHE.get(("cpu", torch.float32))
        if base is None:
            base = _LUT_CACHE[("cpu", torch.float32)] = compute_brdf_lut()
        _LUT_CACHE[key] = base.to(device=device, dtype=dtype)
    return _LUT_CACHE[key]


def env_brdf(n_dot_v: Float[Tensor, "N 1"], roughness: Float[Tensor, "N 1"]) -> tuple[Tensor, Tensor]:
    """Bilinear lookup of the split-sum scale A and bias B, each [N, 1]."""
    lut = brdf_lut(n_dot_v.device, n_dot_v.dtype)
    grid = torch.stack([n_dot_v[:, 0] * 2.0 - 1.0, roughness[:, 0] * 2.0 - 1.0], dim=-1)[None, None]  # [1,1,N,2]
    ab = F.grid_sample(lut[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0]
    return ab[0][:, None], ab[1][:, None]


# ---------------------------------------------------------------------------------------------
# The light


# (source key, height, n_levels, irradiance height) -> CPU maps: prefiltering is a convolution over
# the whole map per level, too slow to repeat for every material built on the same environment.
_PREFILTER_CACHE: dict[tuple, list[Tensor]] = {}


class EnvLight(nn.Module):
    """A fixed environment, prefiltered once: ``diffuse(n)``, ``specular(r, roughness)``, ``radiance(d)``.

    Args:
        env: [H, W, 3] linear radiance, equirect with +z up (see the module docstring).
        height: working height of the mirror level (the map is resized to height x 2 height).
        n_levels: prefiltered levels at roughness 0, 1/(n-1), ..., 1 (level 0 is the map itself).
        irradiance_height: height of the irradiance map.
        cache_key: hashable name of the source; maps prefiltered under the same key (and sizes) are
            reused, and ``env`` may then be None.
    """

    def __init__(self, env: Float[Tensor, "H W 3"] | None = None, height: int = 64, n_levels: int = 6,
                 irradiance_height: int = 16, *, cache_key: tuple | None = None):
        super().__init__()
        if n_levels < 2:
            raise ValueError(f"EnvLight needs n_levels >= 2, got {n_levels}")
        self.n_levels = n_levels
        self.roughness_levels = [k / (n_levels - 1) for k in range(n_levels)]
        key = None if cache_key is None else (cache_key, height, n_levels, irradiance_height)
        maps = _PREFILTER_CACHE.get(key) if key is not None else None
        if maps is None:
            if env is None:
                raise ValueError("EnvLight needs an environment map (env) unless its cache_key was built before")
            if env.ndim != 3 or env.shape[-1] != 3:
                raise ValueError(f"EnvLight needs an [H, W, 3] equirect map, got shape {tuple(env.shape)}")
            base = resize_equirect(env.detach().float().cpu().clamp(min=0.0), height)
            levels = [base if k == 0 else resize_equirect(prefilter_specular(base, r, height), height)
                      for k, r in enumerate(self.roughness_levels)]
            # One [3, K, H, W] stack (blurred levels upsampled to the mirror's size, losing nothing
            # since they are smooth) so a lookup is a single trilinear grid_sample.
            maps = [torch.stack(levels).permute(3, 0, 1, 2).contiguous(),
                    irradiance_map(base, irradiance_height).permute(2, 0, 1).contiguous()]
            if key is not None:
                _PREFILTER_CACHE[key] = maps
        # Non-persistent: derived from config, rebuilt at construction, kept out of checkpoints.
        self.register_buffer("specular_levels", maps[0].clone(), persistent=False)  # [3, K, H, W]
        self.register_buffer("irradiance", maps[1].clone(), persistent=False)  # [3, h, w]

    @classmethod
    def from_file(cls, path: str | Path, height: int = 64, n_levels: int = 6) -> "EnvLight":
        """From an image file; prefiltered maps are cached per (resolved path, mtime, sizes)."""
        p = Path(path).expanduser().resolve()
        key = ("file", str(p), p.stat().st_mtime_ns) if p.is_file() else None
        if key is not None and (key, height, n_levels, 16) in _PREFILTER_CACHE:
            return cls(None, height, n_levels, cache_key=key)
        return cls(load_environment(p), height, n_levels, cache_key=key)

    @classmethod
    def procedural(cls, height: int = 64, n_levels: int = 6, **sky_kwargs) -> "EnvLight":
        """From :func:`procedural_sky`; prefiltered maps are cached per arguments."""
        key = ("sky", tuple(sorted(sky_kwargs.items())))
        if (key, height, n_levels, 16) in _PREFILTER_CACHE:
            return cls(None, height, n_levels, cache_key=key)
        return cls(procedural_sky(height, **sky_kwargs), height, n_levels, cache_key=key)

    def level(self, k: int) -> Float[Tensor, "3 H W"]:
        """Prefiltered map number ``k`` (roughness k / (n_levels - 1))."""
        return self.specular_levels[:, k]

    def radiance(self, dirs: Float[Tensor, "N 3"]) -> Float[Tensor, "N 3"]:
        """The unfiltered environment in directions ``dirs``."""
        return sample_equirect(self.level(0), dirs).to(dirs.dtype)

    def diffuse(self, normals: Float[Tensor, "N 3"]) -> Float[Tensor, "N 3"]:
        """Irradiance / pi: the colour of a white Lambertian surface with normal ``normals``."""
        return sample_equirect(self.irradiance, normals).to(normals.dtype)

    def specular(self, dirs: Float[Tensor, "N 3"], roughness: Float[Tensor, "N 1"]) -> Float[Tensor, "N 3"]:
        """The environment prefiltered for ``roughness`` in [0, 1], seen in reflected directions ``dirs``;
        linear interpolation between the two nearest levels."""
        level = roughness.clamp(0.0, 1.0) * (self.n_levels - 1)  # [N, 1]
        return sample_equirect_levels(self.specular_levels, dirs, level).to(dirs.dtype)
