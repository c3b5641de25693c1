"""Autoregressive multi-view sampling with a trained ViewDiff model.

``python -m lift3d.priors.viewdiff sample --prompt "a teddy bear" --views 8 --base-model <SD> --weights <file> --out <folder>``

The cameras are an orbit around the origin (``--views`` of them, evenly spaced in azimuth at one
elevation, distance and field of view). ViewDiff generates them in groups of ``--group`` views
(the group size it was trained on):

1. the first group: ``group`` new views denoised jointly (DDIM with classifier-free guidance,
   ``e_u + s (e_c - e_u)``);
2. every later group: ``known`` views already generated (those whose cameras are nearest the new
   ones) followed by up to ``group - known`` new views. The known views' latents are the ones
   generated before, never re-encoded; at every step they enter the group either
   * ``renoise`` (the default; inpainting-style): noised afresh to the current timestep, so the group
     looks like the groups the model was trained on while the new views are denoised; or
   * ``clean``: as they are, at timestep 0 (what training with ``p_known`` teaches);
   after each step only the new views' latents are kept.

A view's image intensity (the scalar the model is conditioned on) is ``--intensity`` for the first
group, and the mean brightness of the known views for later ones. Each group draws its noise from
its own generator seeded by (seed, group), so the first group of a longer run is the run of that
group alone. The output folder is an object in the training layout of
:mod:`lift3d.priors.viewdiff.data` (``images/NNN.png`` and ``cameras.json``), plus ``grid.png``, one
row of all views.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from torch import Tensor

from lift3d.priors.viewdiff.cameras import intrinsics_from_fovy, orbit_c2w
from lift3d.priors.viewdiff.model import ViewDiffUNet, encode_texts, load_base, resolve_base, resolve_viewdiff_weights


@dataclass
class Components:
    """What sampling needs: the ViewDiff network, the VAE, the text encoder and the noise schedule."""

    model: ViewDiffUNet
    vae: Any
    tokenizer: Any
    text_encoder: Any
    scheduler_config: Any

    @classmethod
    def load(cls, base_model: str, weights: str, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> "Components":
        """From the base Stable Diffusion (folder or cached id) and a ViewDiff weights file; local files only."""
        folder = resolve_base(base_model, key="base_model")
        path = resolve_viewdiff_weights(weights, key="weights")
        parts = load_base(folder, ("unet", "vae", "scheduler", "text_encoder", "tokenizer"), key="base_model", dtype=dtype)
        model = ViewDiffUNet.from_weights(parts["unet"], path).to(device).eval()
        return cls(model, parts["vae"].to(device), parts["tokenizer"], parts["text_encoder"].to(device),
                   parts["scheduler"].config)

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def group_plan(n: int, group: int, known: int, centres: Tensor) -> list[tuple[list[int], list[int]]]:
    """(known views, new views) per group for ``n`` views: the first group ``min(group, n)`` new views,
    then the ``known`` generated views nearest (by camera centre) the next new ones, in view order."""
    if group < 1 or not 0 < known < group and n > group:
        raise ValueError(f"groups of {group} views with {known} known views: need 1 <= known < group")
    plan = [([], list(range(min(group, n))))]
    done = min(group, n)
    while done < n:
        new = list(range(done, min(n, done + group - known)))
        k = min(group - len(new), done)
        d = torch.cdist(centres[:done].float(), centres[new].float()).amin(dim=1)
        nearest = sorted(sorted(range(done), key=lambda i: (float(d[i]), i))[:k])
        plan.append((nearest, new))
        done += len(new)
    return plan


@torch.no_grad()
def sample_views(comp: Components, prompt: str, c2w: Tensor, intrinsics: Tensor, group: int = 4, known: int = 2,
                 steps: int = 50, guidance_scale: float = 7.5, negative_prompt: str = "", seed: int = 0,
                 intensity: float = 0.5, mode: Literal["renoise", "clean"] = "renoise") -> dict[str, Any]:
    """Generate one image per camera (``c2w`` ``[N, 4, 4]``, normalised ``intrinsics`` ``[N, 3, 3]``).

    Returns ``images`` ``[N, H, W, 3]`` in [0, 1], ``latents`` ``[N, 4, h, w]`` and the ``plan``
    (:func:`group_plan`)."""
    from diffusers import DDIMScheduler

    if mode not in ("renoise", "clean"):
        raise ValueError(f"mode must be 'renoise' or 'clean', got {mode!r}")
    model, vae = comp.model, comp.vae
    dev, dt = model.unet.conv_in.weight.device, model.dtype
    N = c2w.shape[0]
    c2w, intrinsics = c2w.to(dev, torch.float32), intrinsics.to(dev, torch.float32)
    cfg = model.unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    shape = (int(cfg.in_channels), int(size), int(size))
    cond, uncond = encode_texts(comp.tokenizer, comp.text_encoder, [prompt, negative_prompt]).to(dev, dt).split(1)
    sched = DDIMScheduler.from_config(comp.scheduler_config)
    scaling = float(vae.config.scaling_factor)
    latents = torch.zeros(N, *shape, device=dev, dtype=torch.float32)
    images = torch.zeros(N, shape[1] * comp.vae_factor, shape[2] * comp.vae_factor, 3, device=dev)
    inten = torch.full((N,), float(intensity), device=dev)
    plan = group_plan(N, group, known, c2w[:, :3, 3])
    for gi, (kn, new) in enumerate(plan):
        g = torch.Generator().manual_seed(seed * 1_000_003 + gi)
        idx = kn + new
        f, k = len(idx), len(kn)
        if kn:
            inten[new] = inten[kn].mean()
        sched.set_timesteps(steps)
        x = (torch.randn(f, *shape, generator=g) * sched.init_noise_sigma).to(dev)
        clean = latents[kn]
        text = torch.cat([cond.expand(f, -1, -1), uncond.expand(f, -1, -1)])
        cams = torch.cat([c2w[idx]] * 2), torch.cat([intrinsics[idx]] * 2), torch.cat([inten[idx]] * 2)
        for t in sched.timesteps:
            tt = torch.full((f,), int(t), device=dev, dtype=torch.long)
            if k:
                if mode == "renoise":
                    x[:k] = sched.add_noise(clean, torch.randn(clean.shape, generator=g).to(dev), tt[:k])
                else:
                    x[:k] = clean
                    tt[:k] = 0
            out = model(torch.cat([x, x]), torch.cat([tt, tt]), text, *cams, n_views=f).float()
            e_c, e_u = out.chunk(2)
            guided = e_u + guidance_scale * (e_c - e_u)
            x = sched.step(guided, t, x).prev_sample
        latents[new] = x[k:]
        decoded = vae.decode((x[k:] / scaling).to(vae.dtype)).sample.float()
        images[new] = (decoded * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        if not kn:
            inten[new] = images[new].mean(dim=(1, 2, 3))
    return {"images": images.cpu(), "latents": latents.cpu(), "plan": plan}


def orbit_cameras(n: int, elevation: float = 15.0, distance: float = 2.5, fovy: float = 40.0,
                  start_azimuth: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """(c2w ``[n, 4, 4]``, normalised intrinsics ``[n, 3, 3]``, fovy ``[n]``) of an orbit around the origin."""
    az = start_azimuth + torch.arange(n, dtype=torch.float32) * (360.0 / n)
    az = torch.remainder(az + 180, 360) - 180
    full = lambda v: torch.full((n,), float(v))  # noqa: E731
    return orbit_c2w(full(elevation), az, full(distance)), intrinsics_from_fovy(full(fovy)), full(fovy)


def write_outputs(out: str | Path, images: Tensor, c2w: Tensor, fovy: Tensor, prompt: str) -> dict[str, Path]:
    """``<out>/images/NNN.png``, ``<out>/cameras.json`` (the training layout) and ``<out>/grid.png``."""
    from lift3d.priors.viewdiff.data import write_object
    from lift3d.utils.io import save_image_grid

    out = Path(out)
    cams = write_object(out, images, c2w, fovy=fovy, prompt=prompt)
    grid = save_image_grid(out / "grid.png", [list(images)], gap=2)
    return {"cameras": cams, "grid": grid, "images": out / "images"}


def sample_command(prompt: str, views: int, base_model: str, weights: str, out: str, group: int = 4,
                   known: Optional[int] = None, steps: int = 50, guidance_scale: float = 7.5, negative_prompt: str = "",
                   seed: int = 0, elevation: float = 15.0, distance: float = 2.5, fovy: float = 40.0,
                   intensity: float = 0.5, mode: str = "renoise", device: Optional[str] = None) -> dict[str, Path]:
    """What ``python -m lift3d.priors.viewdiff sample`` does; returns the written paths."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    comp = Components.load(base_model, weights, device, dtype)
    c2w, K, fov = orbit_cameras(views, elevation, distance, fovy)
    known = max(1, group // 2) if known is None else known
    res = sample_views(comp, prompt, c2w, K, group=group, known=known, steps=steps, guidance_scale=guidance_scale,
                       negative_prompt=negative_prompt, seed=seed, intensity=intensity, mode=mode)  # type: ignore[arg-type]
    return write_outputs(out, res["images"], c2w, fov, prompt)


__all__ = ["Components", "group_plan", "sample_views", "orbit_cameras", "write_outputs", "sample_command"]
