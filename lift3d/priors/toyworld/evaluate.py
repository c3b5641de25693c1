"""Quality of the toy-world prior, scored against ground truth renders of the same cameras.

For every prompt, samples at random training-distribution cameras are compared with the exact
render of the object at the same camera:

* **mask IoU**: sample foreground (max channel above ``FG_THRESHOLD``; the background is black and
  no shaded albedo of the world comes near it) against the ground-truth silhouette;
* **colour error**: mean absolute difference of *normalised* colour (each pixel divided by its
  largest channel) between the sample and the ground-truth albedo, over pixels both call
  foreground. Normalising removes shading, which the prior is not conditioned on;
* **front check** (snowman, chair, mug): the object turned 180 degrees about z (its Janus twin) is
  rendered at the same camera; over the pixels where either render shows the front feature (nose,
  chair back, handle), the sample must be closer to the true render than to the twin. Views where
  the two renders agree there (the feature hidden both ways) are not counted.
* **corner check** (the six cubes): the same test with the cube turned 45 degrees (its most
  different view) as the twin, over the pixels where the two silhouettes differ: does the sample put
  the cube's corners where the camera says? A rounded box matches neither and scores at chance.
* **azimuth use** (the same objects): how much worse the model denoises ground-truth renders at a
  high noise level when it is told the camera turned 180 degrees (45 for a cube) (:func:`azimuth_use`).
  0 means the network ignores the azimuth, the cause of a check at chance; it is deterministic and
  needs no sampling, so it moves before the checks' counts do.
* **shape pull** (the primitives): how far the prompt moves the denoised image towards its own shape
  at a high noise level, starting from renders of the other primitives in the same colour
  (:func:`shape_pull`). Score distillation forms a shape from these high-noise predictions, so a
  prompt with no pull there yields no shape, whatever its samples look like.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

FG_THRESHOLD = 0.1


@dataclass
class PromptScore:
    prompt: str
    iou: float
    colour_error: float
    front_correct: int
    front_counted: int
    azimuth_use: float | None = None
    check: str | None = None
    """"front" (snowman, chair, mug), "corner" (cubes) or None: what front_correct / front_counted count."""
    shape_pull: float | None = None
    """:func:`shape_pull` for a primitive, else None."""


def foreground(img: Tensor) -> Tensor:
    """[B, H, W, 3] in [0, 1] -> [B, H, W] bool."""
    return img.max(dim=-1).values > FG_THRESHOLD


def chromaticity(c: Tensor) -> Tensor:
    """Colours [..., 3] with each pixel divided by its largest channel: what shading leaves unchanged."""
    return c / c.max(dim=-1, keepdim=True).values.clamp_min(1e-3)


def score_samples(samples: Tensor, gt: dict[str, Tensor], twin: dict[str, Tensor] | None = None,
                  min_feature_pixels: int = 3, region: str = "feature") -> dict[str, Tensor]:
    """Per-sample scores. samples [B, H, W, 3]; gt/twin: outputs of ``render.render``.

    The view check compares the sample with ``gt`` and ``twin`` over the pixels where either shows
    the front feature (``region="feature"``) or where their silhouettes differ (``"silhouette"``).
    """
    fg = foreground(samples)
    gmask = gt["mask"][..., 0] > 0.5
    inter = (fg & gmask).flatten(1).sum(1).float()
    union = (fg | gmask).flatten(1).sum(1).float()
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    both = (fg & gmask)[..., None].float()
    diff = (chromaticity(samples) - chromaticity(gt["albedo"])).abs().mean(-1, keepdim=True)
    colour = (diff * both).flatten(1).sum(1) / both.flatten(1).sum(1).clamp_min(1)
    out = {"iou": iou, "colour_error": colour}
    if twin is not None:
        if region == "feature":
            where = (gt["feature_mask"] > 0.5) | (twin["feature_mask"] > 0.5)
        elif region == "silhouette":
            where = (gt["mask"] > 0.5) ^ (twin["mask"] > 0.5)
        else:
            raise ValueError(f"region must be 'feature' or 'silhouette', got {region!r}")
        region = where.expand_as(samples).float()
        d_true = ((samples - gt["rgb"]).abs() * region).flatten(1).sum(1)
        d_twin = ((samples - twin["rgb"]).abs() * region).flatten(1).sum(1)
        gap = ((gt["rgb"] - twin["rgb"]).abs() * region).flatten(1).sum(1)
        counted = (region[..., 0].flatten(1).sum(1) >= min_feature_pixels) & (gap > 1e-3 * region.flatten(1).sum(1))
        out["front_correct"] = (d_true < d_twin) & counted
        out["front_counted"] = counted
    return out


@torch.no_grad()
def azimuth_use(model, prompt: str, n: int = 48, t: int = 850, turn_deg: float = 180.0, seed: int = 0) -> float:
    """Relative increase of the x0 error when the model is given the camera turned by ``turn_deg``.

    ``n`` ground-truth renders of ``prompt`` at training cameras are noised to timestep ``t`` (one
    noise draw, shared by both passes) and denoised twice: with their true camera and with the
    azimuth turned. Returns ``err_turned / err_true - 1``: 0 for a model blind to the azimuth; for a
    catalogue object symmetric under the turn (a cube under 180 degrees) only noise.
    """
    from lift3d.priors.toyworld.data import FOVY, camera_vector, light_in_upper_hemisphere, sample_cameras
    from lift3d.priors.toyworld.model import make_scheduler, predict_eps_x0
    from lift3d.priors.toyworld.render import render
    from lift3d.priors.toyworld.shapes import get_object
    from lift3d.priors.toyworld.vocab import pad_tokens, tokenize
    from lift3d.utils.cameras import make_cameras

    g = torch.Generator().manual_seed(seed)
    res = model.cfg.resolution
    elev, azim, dist = sample_cameras(n, g)
    cams = make_cameras(elev, azim, dist, torch.full((n,), FOVY), res, res)
    x0 = render(get_object(prompt), cams, light_in_upper_hemisphere(cams, g))["rgb"].permute(0, 3, 1, 2) * 2 - 1
    a = make_scheduler(model.cfg).alphas_cumprod[t]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g)
    dev = next(model.parameters()).device
    tt = torch.full((n,), t, dtype=torch.long)
    tokens = pad_tokens([tokenize(prompt)] * n)
    errs = []
    for turn in (0.0, turn_deg):
        out = model(x_t.to(dev), tt.to(dev), tokens.to(dev), camera_vector(elev, azim + turn, dist).to(dev)).cpu()
        x0_pred = predict_eps_x0(model.cfg, out, x_t, a.expand(n))[1]
        errs.append(float((x0_pred - x0).pow(2).mean()))
    return errs[1] / max(errs[0], 1e-12) - 1.0


def pull_from_x0(x0: Tensor, target_mask: Tensor, source_mask: Tensor) -> float:
    """Mean of IoU(foreground of x0, target) - IoU(foreground of x0, source) over a batch.

    x0 [B, 3, H, W] in [-1, 1]; masks [B, H, W] bool. +(1 - IoU(target, source)) when x0 is the
    target's render, -(1 - IoU(target, source)) when it is the source's.
    """
    fg = foreground(((x0.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1))

    def iou(a: Tensor, b: Tensor) -> Tensor:
        return (a & b).flatten(1).sum(1).float() / (a | b).flatten(1).sum(1).float().clamp_min(1)

    return float((iou(fg, target_mask) - iou(fg, source_mask)).mean())


@torch.no_grad()
def shape_pull(model, prompt: str, t: int = 900, guidance_scale: float = 7.5, n: int = 8, seed: int = 0) -> float:
    """How far ``prompt`` (a primitive) pulls a denoised image towards its own shape at timestep ``t``.

    Renders of each other primitive in the prompt's colour, at ``n`` cameras (elevation 20, azimuths
    evenly spaced, distance 2), are noised to ``t`` and denoised once with classifier-free guidance
    ``guidance_scale`` under ``prompt`` (the SDS setting); the score is :func:`pull_from_x0` of the
    prediction, averaged over the sources. Positive: the prediction looks more like the prompt's
    shape than like the image it came from, which is what lets SDS turn an initial blob into that
    shape. Deterministic for a seed.
    """
    from lift3d.priors.toyworld.data import FOVY, camera_vector, light_in_upper_hemisphere
    from lift3d.priors.toyworld.model import make_scheduler, predict_eps_x0
    from lift3d.priors.toyworld.render import render
    from lift3d.priors.toyworld.shapes import PRIMITIVES, get_object
    from lift3d.priors.toyworld.vocab import pad_tokens, tokenize
    from lift3d.utils.cameras import make_cameras

    obj = get_object(prompt)
    if obj.shape not in PRIMITIVES:
        raise ValueError(f"shape_pull: {prompt!r} is not a primitive ({', '.join(PRIMITIVES)})")
    g = torch.Generator().manual_seed(seed)
    res = model.cfg.resolution
    elev, azim, dist = torch.full((n,), 20.0), torch.arange(n) * (360.0 / n), torch.full((n,), 2.0)
    cams = make_cameras(elev, azim, dist, torch.full((n,), FOVY), res, res)
    light = light_in_upper_hemisphere(cams, g)
    target_mask = render(obj, cams, light)["mask"][..., 0] > 0.5
    a = make_scheduler(model.cfg).alphas_cumprod[t]
    dev = next(model.parameters()).device
    tt = torch.full((n,), t, dtype=torch.long, device=dev)
    tokens = pad_tokens([tokenize(prompt)] * n).to(dev)
    cam = camera_vector(elev, azim, dist).to(dev)
    pulls = []
    for shape in PRIMITIVES:
        if shape == obj.shape:
            continue
        src = render(get_object(f"a {obj.colour} {shape}"), cams, light)
        x = src["rgb"].permute(0, 3, 1, 2) * 2 - 1
        x_t = a.sqrt() * x + (1 - a).sqrt() * torch.randn(x.shape, generator=g)
        both = model(torch.cat([x_t, x_t]).to(dev), torch.cat([tt, tt]), torch.cat([tokens, tokens]),
                     torch.cat([cam, cam]), torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)]).to(dev))
        cond, uncond = both.cpu().chunk(2)
        x0 = predict_eps_x0(model.cfg, uncond + guidance_scale * (cond - uncond), x_t, a.expand(n))[1]
        pulls.append(pull_from_x0(x0, target_mask, src["mask"][..., 0] > 0.5))
    return sum(pulls) / len(pulls)


def evaluate(model, prompts: list[str] | None = None, n_per_prompt: int = 8, steps: int = 50,
             guidance_scale: float = 3.0, seed: int = 0, grid_path: str | None = None) -> list[PromptScore]:
    """Sample, render ground truth, score; optionally write a grid (sample next to ground truth)."""
    from lift3d.priors.toyworld.data import (
        CORNER_TURNS,
        FOVY,
        RESOLUTION,
        camera_vector,
        light_in_upper_hemisphere,
        sample_cameras,
    )
    from lift3d.priors.toyworld.model import sample
    from lift3d.priors.toyworld.render import render
    from lift3d.priors.toyworld.shapes import PRIMITIVES, get_object, list_prompts
    from lift3d.priors.toyworld.vocab import pad_tokens, tokenize
    from lift3d.utils.cameras import make_cameras

    prompts = prompts or list_prompts()
    g = torch.Generator().manual_seed(seed)
    scores, rows = [], []
    for prompt in prompts:
        obj = get_object(prompt)
        elev, azim, dist = sample_cameras(n_per_prompt, g)
        fovy = torch.full((n_per_prompt,), FOVY)
        cams = make_cameras(elev, azim, dist, fovy, RESOLUTION, RESOLUTION)
        light = light_in_upper_hemisphere(cams, g)
        gt = render(obj, cams, light)
        twin, check = None, None
        turn = 180.0 if obj.has_feature else CORNER_TURNS.get(obj.shape)
        if turn is not None:
            # The object turned about z, seen from this camera = the object seen from the camera (and
            # the light) turned the other way; a cube turned by -45 and +45 degrees looks the same.
            check = "front" if obj.has_feature else "corner"
            cams_t = make_cameras(elev, azim + turn, dist, fovy, RESOLUTION, RESOLUTION)
            c, s_ = math.cos(math.radians(turn)), math.sin(math.radians(turn))
            rot = torch.tensor([[c, -s_, 0.0], [s_, c, 0.0], [0.0, 0.0, 1.0]])
            twin = render(obj, cams_t, light @ rot.T)
        tokens = pad_tokens([tokenize(prompt)] * n_per_prompt)
        imgs = sample(model, tokens, camera_vector(elev, azim, dist), steps=steps, guidance_scale=guidance_scale,
                      generator=g).permute(0, 2, 3, 1).cpu()
        s = score_samples(imgs, gt, twin, region="feature" if check == "front" else "silhouette")
        scores.append(PromptScore(
            prompt, float(s["iou"].mean()), float(s["colour_error"].mean()),
            int(s["front_correct"].sum()) if twin is not None else 0,
            int(s["front_counted"].sum()) if twin is not None else 0,
            azimuth_use(model, prompt, seed=seed, turn_deg=turn) if twin is not None else None,
            check,
            shape_pull(model, prompt, seed=seed) if obj.shape in PRIMITIVES else None,
        ))
        rows.append([x for i in range(n_per_prompt) for x in (imgs[i].numpy(), gt["rgb"][i].numpy())])
    if grid_path:
        from lift3d.utils.io import save_image_grid

        save_image_grid(grid_path, rows)
    return scores


def format_table(scores: list[PromptScore]) -> str:
    """One row per prompt, a mean row (its view column: the front check) and the corner check's total."""
    lines = [f"{'prompt':<20} {'mask IoU':>8} {'colour err':>10} {'view ok':>9} {'az use':>7} {'pull':>6}"]
    for s in scores:
        front = f"{s.front_correct}/{s.front_counted}" if s.front_counted else "-"
        use = f"{100 * s.azimuth_use:+6.1f}%" if s.azimuth_use is not None else "-"
        pull = f"{s.shape_pull:+6.2f}" if s.shape_pull is not None else "-"
        lines.append(f"{s.prompt:<20} {s.iou:8.3f} {s.colour_error:10.3f} {front:>9} {use:>7} {pull:>6}")
    n = max(len(scores), 1)
    fronts = [s for s in scores if s.check != "corner"]
    fc, ft = sum(s.front_correct for s in fronts), sum(s.front_counted for s in fronts)
    lines.append(f"{'mean':<20} {sum(s.iou for s in scores) / n:8.3f} "
                 f"{sum(s.colour_error for s in scores) / n:10.3f} {(f'{fc}/{ft}' if ft else '-'):>9}")
    pulls = [s.shape_pull for s in scores if s.shape_pull is not None]
    if pulls:
        lines.append(f"shape pull (t = 900, guidance 7.5; primitives): mean {sum(pulls) / len(pulls):+.3f}, "
                     f"lowest {min(pulls):+.3f}")
    cubes = [s for s in scores if s.check == "corner"]
    cc, ct = sum(s.front_correct for s in cubes), sum(s.front_counted for s in cubes)
    if ct:
        lines.append(f"view ok: front check {fc}/{ft}" + (f" = {100 * fc / ft:.0f}%" if ft else "")
                     + f"; corner check (cubes) {cc}/{ct} = {100 * cc / ct:.0f}%")
    return "\n".join(lines)
