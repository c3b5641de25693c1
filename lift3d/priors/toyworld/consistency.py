"""Multi-view consistency of a group of views of a known toy object, from its exact geometry.

In the spirit of MVDiffusion's consistency score (Tang et al. 2023, "MVDiffusion: Enabling Holistic
Multi-view Image Generation with Correspondence-Aware Diffusion"): views of one object are
consistent when the pixels that see the same surface point agree. In the toy world the surface is
known exactly, so the correspondences need no matcher:

1. the toy renderer gives every view's depth (distance along the pixel's ray) and coverage;
2. each covered pixel of view ``i`` is unprojected to its surface point and projected into view
   ``j``; the pixel there (nearest) sees the same point when it is covered and its own depth agrees
   with the point's distance from camera ``j`` within ``depth_tol`` (otherwise the point is hidden
   from ``j``, behind another part or on the far side, or outside its image);
3. for each ordered pair ``(i, j)`` of views of a group with at least ``min_pixels`` such pixels,
   the PSNR between view ``i``'s colours there and view ``j``'s colours at the corresponding
   pixels. Pixels seen by one view only never enter.

Exact renders are not perfectly consistent by this measure (nearest-pixel resampling, and shading
where the views are lit differently), so the score of a group of images is reported as a ratio to
the same measure on ground-truth renders at the same cameras (:func:`consistency_ratio`): 1 is as
consistent as the real thing, lower is less. Geometry comes from the known object, not from the
images, so a view that draws the object in the wrong place or shape also scores low. Consistency
is not fidelity: images of one flat colour agree everywhere and can score above 1 (a render of a
3D result is consistent by construction, apart from its view-dependent shading), so read the ratio
beside a fidelity score (mask IoU, the mesh metrics).

Usable on (a) samples of a multi-view prior (:func:`evaluate_multiview`), and (b) renders of a
trained 3D result: any images at known cameras, e.g. the frames of a trial's test turntable
(:func:`trial_consistency`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from lift3d.priors.toyworld.shapes import ToyObject, get_object


@dataclass
class Correspondences:
    """Pixel correspondences within groups of views. B = groups * n_views, views of a group consecutive."""

    covisible: Tensor
    """[B, n_views, H, W] bool: pixel of view b whose surface point view k of b's group also sees."""
    target: Tensor
    """[B, n_views, H, W] long: the flat pixel index (row * W + col) in view k where it sees it."""
    n_views: int


@dataclass
class ConsistencyScore:
    pair_psnr: Tensor
    """[G, n, n] PSNR (dB) of each ordered pair of views (NaN on the diagonal and where fewer than
    min_pixels pixels are co-visible). A pair that agrees exactly scores 100 dB (the MSE is floored
    at 1e-10): in chromaticity, exact renders of a one-colour object do, so compare PSNRs there
    rather than ratios."""
    psnr: float
    """Mean of pair_psnr over the pairs that count (NaN when none does)."""
    used: Tensor
    """[B, H, W] bool: the pixels of each view that entered some pair (either side)."""


@dataclass
class ConsistencyResult:
    ratio: float
    """psnr / gt_psnr over the pairs that count in both."""
    psnr: float
    gt_psnr: float
    score: ConsistencyScore
    gt_score: ConsistencyScore


def _as_object(obj: ToyObject | str) -> ToyObject:
    return get_object(obj) if isinstance(obj, str) else obj


def group_cameras(elevation: Tensor, azimuth: Tensor, distance: Tensor, fovy: float | Tensor, resolution: int) -> dict:
    """``make_cameras`` for square images at ``resolution``; every argument [B] (fovy may be a float)."""
    from lift3d.utils.cameras import make_cameras

    B = elevation.shape[0]
    fov = torch.as_tensor(fovy, dtype=torch.float32).expand(B).clone()
    return make_cameras(elevation.float(), azimuth.float(), distance.float(), fov, resolution, resolution)


def view_pairs(n_groups: int, n_views: int) -> Iterator[tuple[int, int, int, int, int]]:
    """Every ordered pair of distinct views within each group: ``(group, i, k, a, b)`` with views ``i``
    and ``k`` of the group at batch rows ``a`` and ``b`` (a group's views are consecutive rows)."""
    for g in range(n_groups):
        for i in range(n_views):
            for k in range(n_views):
                if k != i:
                    yield g, i, k, g * n_views + i, g * n_views + k


@torch.no_grad()
def correspondences(obj: ToyObject | str, cameras: dict, n_views: int, depth_tol: float = 0.05) -> Correspondences:
    """Which pixels of each view see a surface point that another view of its group sees, and where.

    ``cameras``: ``make_cameras`` of B = groups * n_views views (height == width not required).
    """
    from lift3d.priors.toyworld.render import render
    from lift3d.utils.cameras import focal_from_fovy

    obj = _as_object(obj)
    B, H, W = cameras["rays_o"].shape[:3]
    if n_views < 1 or B % n_views:
        raise ValueError(f"{B} views are not whole groups of n_views={n_views}")
    out = render(obj, cameras, None)
    hit = out["mask"][..., 0] > 0.5  # [B, H, W]
    depth = out["depth"][..., 0]
    d = torch.nn.functional.normalize(cameras["rays_d"].float(), dim=-1)
    points = cameras["rays_o"].float() + depth[..., None] * d  # [B, H, W, 3]
    c2w = cameras["c2w"].float()
    focal = focal_from_fovy(cameras["fovy"].float(), H)  # [B]
    G = B // n_views
    covisible = torch.zeros(B, n_views, H, W, dtype=torch.bool)
    target = torch.zeros(B, n_views, H, W, dtype=torch.long)
    for _, _, k, a, b in view_pairs(G, n_views):
        rel = points[a] - c2w[b, :3, 3]  # [H, W, 3] from camera b
        cam = rel @ c2w[b, :3, :3]  # camera b's axes: right, up, back
        z = -cam[..., 2]  # distance along the viewing axis
        safe_z = z.clamp_min(1e-6)
        col = cam[..., 0] / safe_z * focal[b] + 0.5 * W - 0.5
        row = -cam[..., 1] / safe_z * focal[b] + 0.5 * H - 0.5
        ci, ri = col.round().long(), row.round().long()
        inside = (z > 1e-6) & (ci >= 0) & (ci < W) & (ri >= 0) & (ri < H)
        ci, ri = ci.clamp(0, W - 1), ri.clamp(0, H - 1)
        seen = hit[b][ri, ci] & ((depth[b][ri, ci] - rel.norm(dim=-1)).abs() < depth_tol)
        covisible[a, k] = hit[a] & inside & seen
        target[a, k] = ri * W + ci
    return Correspondences(covisible, target, n_views)


SPACES = ("rgb", "chromaticity")


def to_space(images: Tensor, space: str) -> Tensor:
    """``images`` [..., 3] in the colour space the PSNR is taken in: "rgb" as they are, "chromaticity"
    each pixel divided by its largest channel. Lambertian shading scales a pixel's channels alike,
    so chromaticity compares albedo (and where the object is) whatever the lighting of each view."""
    if space == "rgb":
        return images.float()
    if space == "chromaticity":
        from lift3d.priors.toyworld.evaluate import chromaticity

        return chromaticity(images.float())
    raise ValueError(f"space must be one of {SPACES}, got {space!r}")


def view_consistency(images: Tensor, corr: Correspondences, min_pixels: int = 20,
                     space: str = "rgb") -> ConsistencyScore:
    """Pairwise PSNR of ``images`` [B, H, W, 3] in [0, 1] over the co-visible pixels of ``corr``
    (in ``space``: see :func:`to_space`; chromaticity lies in [0, 1] too)."""
    B, H, W, C = images.shape
    n = corr.n_views
    G = B // n
    flat = to_space(images, space).reshape(B, H * W, C)
    pair = torch.full((G, n, n), float("nan"))
    used = torch.zeros(B, H * W, dtype=torch.bool)
    for g, i, k, a, b in view_pairs(G, n):
        m = corr.covisible[a, k].reshape(-1)
        if int(m.sum()) < min_pixels:
            continue
        src = flat[a][m]
        dst_idx = corr.target[a, k].reshape(-1)[m]
        mse = float((src - flat[b][dst_idx]).pow(2).mean())
        pair[g, i, k] = 10.0 * math.log10(1.0 / max(mse, 1e-10))
        used[a] |= m
        used[b, dst_idx] = True
    valid = ~torch.isnan(pair)
    mean = float(pair[valid].mean()) if bool(valid.any()) else float("nan")
    return ConsistencyScore(pair, mean, used.reshape(B, H, W))


def consistency_ratio(images: Tensor, obj: ToyObject | str, elevation: Tensor, azimuth: Tensor, distance: Tensor,
                      fovy: float | Tensor = 40.0, n_views: int = 4, lights: Tensor | None = None,
                      depth_tol: float = 0.05, min_pixels: int = 20, space: str = "rgb", ambient: float = 0.35,
                      diffuse: float = 0.65) -> ConsistencyResult:
    """Consistency of ``images`` [B, H, W, 3] in [0, 1] relative to exact renders at the same cameras.

    ``lights`` [B, 3]: directions towards the light of the ground-truth renders (None: a headlight per
    view, the light of the test turntable); give the reference the lighting the images had, or drew
    from (a prior trained on one random light per view: lights drawn the same way). ``space``
    "chromaticity" takes the shading out of both (:func:`to_space`).
    """
    from lift3d.priors.toyworld.render import render

    obj = _as_object(obj)
    B, H, W, _ = images.shape
    if H != W:
        raise ValueError(f"consistency_ratio: square images expected, got {H}x{W}")
    cams = group_cameras(elevation, azimuth, distance, fovy, H)
    corr = correspondences(obj, cams, n_views, depth_tol)
    gt = render(obj, cams, lights, ambient=ambient, diffuse=diffuse)["rgb"]
    score = view_consistency(images, corr, min_pixels, space)
    gt_score = view_consistency(gt, corr, min_pixels, space)
    both = ~torch.isnan(score.pair_psnr) & ~torch.isnan(gt_score.pair_psnr)
    psnr = float(score.pair_psnr[both].mean()) if bool(both.any()) else float("nan")
    gt_psnr = float(gt_score.pair_psnr[both].mean()) if bool(both.any()) else float("nan")
    return ConsistencyResult(psnr / gt_psnr, psnr, gt_psnr, score, gt_score)


# ---------------------------------------------------------------------------------------------
# (b) a trained 3D result: its test turntable


def turntable_groups(n_frames: int, n_views: int = 4) -> Tensor:
    """[n_frames / n_views, n_views] frame indices of a turntable grouped into views 360 / n_views apart."""
    if n_frames % n_views:
        raise ValueError(f"a turntable of {n_frames} frames cannot be split into groups of {n_views} "
                         "evenly spaced views")
    step = n_frames // n_views
    return torch.arange(step)[:, None] + step * torch.arange(n_views)[None]


def turntable_consistency(frames: Tensor, obj: ToyObject | str, elevation: float, distance: float,
                          fovy: float = 40.0, n_views: int = 4, start_azimuth: float = 0.0,
                          **kw: Any) -> ConsistencyResult:
    """:func:`consistency_ratio` of a turntable's frames [N, H, W, 3] (frame k at azimuth
    ``start_azimuth + k * 360 / N``), in groups of ``n_views`` frames evenly spaced in azimuth; the
    reference renders use a headlight, as the turntable does."""
    N = frames.shape[0]
    idx = turntable_groups(N, n_views).reshape(-1)
    az = start_azimuth + idx.float() * (360.0 / N)
    full = lambda v: torch.full((len(idx),), float(v))  # noqa: E731
    return consistency_ratio(frames[idx], obj, full(elevation), az, full(distance), fovy, n_views, **kw)


def trial_consistency(trial: str | Path, prompt: str | None = None, n_views: int = 4, **kw: Any) -> ConsistencyResult:
    """:func:`turntable_consistency` of a trial folder's latest test turntable (``save/it<N>-test/``).

    The cameras come from the trial's ``configs/parsed.yaml`` (``data.eval_*``, the data module's
    defaults where it sets none), the object from
    ``prompt`` (default: the trial's prompt); each frame's first panel is its RGB render.
    """
    import imageio.v3 as iio
    from omegaconf import OmegaConf

    from lift3d.config import parse_structured
    from lift3d.registry import find

    trial = Path(trial)
    cfg = OmegaConf.load(trial / "configs" / "parsed.yaml")
    # the data module's own defaults fill what the recipe left unset
    data_cls = find(str(cfg.get("data_type", "random-camera-datamodule")), "data")
    data = parse_structured(data_cls.Config, OmegaConf.to_container(cfg.get("data", {}), resolve=True), key="data")
    folders = sorted(trial.glob("save/it*-test"), key=lambda p: int(p.name[2:].split("-")[0]))
    folders = [f for f in folders if f.is_dir()]
    if not folders:
        raise FileNotFoundError(f"{trial}: no save/it<N>-test/ folder (run --test first)")
    files = sorted(folders[-1].glob("*.png"))
    h, w = int(data.eval_height), int(data.eval_width)
    frames = torch.stack([torch.from_numpy(iio.imread(f)[:h, :w, :3].copy()) for f in files]).float() / 255.0
    return turntable_consistency(frames, prompt if prompt is not None else str(cfg.prompt),
                                 float(data.eval_elevation_deg), float(data.eval_camera_distance),
                                 float(data.eval_fovy_deg), n_views, **kw)


# ---------------------------------------------------------------------------------------------
# (a) samples of a multi-view prior


@dataclass
class GroupScore:
    prompt: str
    ratio: float
    """Consistency ratio of the jointly sampled groups."""
    iou: float
    """Mean mask IoU of the sampled views against their exact renders."""
    front_correct: int
    front_counted: int
    chroma_psnr: float = float("nan")
    """Mean pairwise PSNR (dB) of the groups in chromaticity (shading removed: albedo and placement)."""
    baseline_ratio: float | None = None
    """The consistency ratio of views sampled one by one by a single-view prior at the same cameras."""
    baseline_chroma_psnr: float | None = None
    """Their chromaticity PSNR."""


@torch.no_grad()
def evaluate_multiview(model: Any, prompts: list[str] | None = None, n_groups: int = 4, steps: int = 50,
                       guidance_scale: float = 1.0, seed: int = 0, baseline: Any = None,
                       grid_path: str | None = None, min_pixels: int = 20) -> list[GroupScore]:
    """Sample ``n_groups`` groups per prompt at training-distribution cameras and score them.

    Ground truth for each view: the exact render, with one random light per view drawn as the
    training data's (so the reference is as consistent as the data the prior learned from). With
    ``baseline`` (a single-view prior) the same cameras are also sampled view by view, for the
    ratio a prior without joint attention gets. ``min_pixels``: see :func:`view_consistency`.
    """
    from lift3d.priors.toyworld.data import FOVY, camera_vector, light_in_upper_hemisphere, sample_cameras
    from lift3d.priors.toyworld.evaluate import score_samples
    from lift3d.priors.toyworld.model import sample
    from lift3d.priors.toyworld.multiview import sample_groups
    from lift3d.priors.toyworld.multiview_train import group_azimuths
    from lift3d.priors.toyworld.render import render
    from lift3d.priors.toyworld.shapes import list_prompts
    from lift3d.priors.toyworld.vocab import pad_tokens, tokenize

    n = model.mv_cfg.n_views
    res = model.cfg.resolution
    prompts = prompts or list_prompts()
    g = torch.Generator().manual_seed(seed)
    scores, rows = [], []
    for prompt in prompts:
        obj = get_object(prompt)
        elev, base, dist = sample_cameras(n_groups, g)
        elev, dist = elev.repeat_interleave(n), dist.repeat_interleave(n)
        azim = group_azimuths(base, n)
        cams = group_cameras(elev, azim, dist, FOVY, res)
        lights = light_in_upper_hemisphere(cams, g)
        tokens = pad_tokens([tokenize(prompt)] * (n_groups * n))
        cam_vec = camera_vector(elev, azim, dist)
        imgs = sample_groups(model, tokens, cam_vec, n, steps=steps, guidance_scale=guidance_scale,
                             generator=g).permute(0, 2, 3, 1).cpu()
        kw = {"min_pixels": min_pixels}
        result = consistency_ratio(imgs, obj, elev, azim, dist, FOVY, n, lights, **kw)
        chroma = consistency_ratio(imgs, obj, elev, azim, dist, FOVY, n, lights, space="chromaticity", **kw).psnr
        gt = render(obj, cams, lights)
        twin = None
        if obj.has_feature:
            turned = group_cameras(elev, azim + 180.0, dist, FOVY, res)
            rot = torch.diag(torch.tensor([-1.0, -1.0, 1.0]))
            twin = render(obj, turned, lights @ rot.T)
        s = score_samples(imgs, gt, twin)
        base_ratio = base_chroma = None
        if baseline is not None:
            single = sample(baseline, tokens, cam_vec, steps=steps, guidance_scale=guidance_scale,
                            generator=g).permute(0, 2, 3, 1).cpu()
            base_ratio = consistency_ratio(single, obj, elev, azim, dist, FOVY, n, lights, **kw).ratio
            base_chroma = consistency_ratio(single, obj, elev, azim, dist, FOVY, n, lights, space="chromaticity",
                                            **kw).psnr
        scores.append(GroupScore(prompt, result.ratio, float(s["iou"].mean()),
                                 int(s["front_correct"].sum()) if twin is not None else 0,
                                 int(s["front_counted"].sum()) if twin is not None else 0, chroma, base_ratio,
                                 base_chroma))
        rows += [[x for i in range(n) for x in (imgs[k * n + i].numpy(), gt["rgb"][k * n + i].numpy())]
                 for k in range(n_groups)]
    if grid_path:
        from lift3d.utils.io import save_image_grid

        save_image_grid(grid_path, rows)
    return scores


def format_group_table(scores: list[GroupScore]) -> str:
    """One row per prompt and a mean row: consistency ratio and chromaticity PSNR of the jointly sampled
    groups and (when scored) of the single-view baseline, mask IoU and the front check of the views."""
    def opt(v: float | None, fmt: str) -> str:
        return format(v, fmt) if v is not None else "-"

    def mean(vals: list[float | None]) -> float | None:
        vals = [v for v in vals if v is not None and not math.isnan(v)]
        return sum(vals) / len(vals) if vals else None

    lines = [f"{'prompt':<20} {'ratio':>6} {'ratio 1v':>8} {'chroma dB':>9} {'chroma 1v':>9} {'mask IoU':>8} "
             f"{'view ok':>8}"]

    def row(name: str, ratio, base, chroma, base_chroma, iou, front: str) -> str:
        return (f"{name:<20} {opt(ratio, '6.3f'):>6} {opt(base, '8.3f'):>8} {opt(chroma, '9.2f'):>9} "
                f"{opt(base_chroma, '9.2f'):>9} {opt(iou, '8.3f'):>8} {front:>8}")

    for s in scores:
        front = f"{s.front_correct}/{s.front_counted}" if s.front_counted else "-"
        lines.append(row(s.prompt, s.ratio, s.baseline_ratio, s.chroma_psnr, s.baseline_chroma_psnr, s.iou, front))
    fc, ft = sum(s.front_correct for s in scores), sum(s.front_counted for s in scores)
    lines.append(row("mean", mean([s.ratio for s in scores]), mean([s.baseline_ratio for s in scores]),
                     mean([s.chroma_psnr for s in scores]), mean([s.baseline_chroma_psnr for s in scores]),
                     mean([s.iou for s in scores]), f"{fc}/{ft}" if ft else "-"))
    return "\n".join(lines)


__all__ = ["Correspondences", "ConsistencyScore", "ConsistencyResult", "GroupScore", "SPACES", "to_space",
           "group_cameras", "view_pairs", "correspondences", "view_consistency", "consistency_ratio",
           "turntable_groups", "turntable_consistency", "trial_consistency", "evaluate_multiview",
           "format_group_table"]
