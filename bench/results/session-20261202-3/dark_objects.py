"""Two one-step denoising checks of the toy-world prior behind the dark-object study (bench/README.md).

``shadow``: does the prior complete the shadowed half of a primitive? Each primitive is rendered at
8 azimuths (elevation 20) lit from the camera's right, every pixel facing away from the light is
blacked out (the half a NeRF loses when a dim surface fades), and that image is noised to t and
denoised once at guidance 7.5. Score: the shape pull of the prediction, IoU with the whole object's
mask minus IoU with the lit half's (positive: the prior fills the dark half in).

``keep``: how well one guided step keeps a ground-truth render. 16 renders per prompt (lights as in
the training data), noised to t, denoised once at guidance 7.5. b: the prediction's summed
brightness inside the object's mask over the render's; iou: mask IoU of the prediction's foreground.

    python bench/results/session-20261202-3/dark_objects.py shadow|keep WEIGHTS.safetensors [MORE ...]
"""
import sys

import torch

from lift3d.priors.toyworld.data import FOVY, camera_vector, light_in_upper_hemisphere
from lift3d.priors.toyworld.evaluate import foreground, pull_from_x0
from lift3d.priors.toyworld.model import ToyWorldPrior, make_scheduler, predict_eps_x0
from lift3d.priors.toyworld.render import render
from lift3d.priors.toyworld.shapes import get_object
from lift3d.priors.toyworld.vocab import pad_tokens, tokenize
from lift3d.utils.cameras import make_cameras

SHADOW_PROMPTS = ["a green sphere", "a blue cylinder", "a red cube", "a purple torus", "a yellow cone"]
KEEP_PROMPTS = SHADOW_PROMPTS + ["a green cube"]


def guided_x0(model, sched, x, t, prompt, elev, azim, dist, g, scale=7.5):
    """Noise ``x`` [n, 3, H, W] in [-1, 1] to ``t`` and return the guided one-step estimate of it."""
    n = x.shape[0]
    a = sched.alphas_cumprod[t]
    x_t = a.sqrt() * x + (1 - a).sqrt() * torch.randn(x.shape, generator=g)
    tt = torch.full((n,), t, dtype=torch.long)
    tokens, cam = pad_tokens([tokenize(prompt)] * n), camera_vector(elev, azim, dist)
    drop = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])
    with torch.no_grad():
        both = model(torch.cat([x_t, x_t]), torch.cat([tt, tt]), torch.cat([tokens, tokens]), torch.cat([cam, cam]), drop)
    c, u = both.chunk(2)
    return predict_eps_x0(model.cfg, u + scale * (c - u), x_t, a.expand(n))[1]


def orbit(n, res):
    elev, azim, dist = torch.full((n,), 20.0), torch.arange(n) * (360.0 / n), torch.full((n,), 2.0)
    return elev, azim, dist, make_cameras(elev, azim, dist, torch.full((n,), FOVY), res, res)


def shadow_row(model, sched, prompt, n=8):
    g = torch.Generator().manual_seed(0)
    elev, azim, dist, cams = orbit(n, model.cfg.resolution)
    light = torch.nn.functional.normalize(cams["c2w"][:, :3, 0] + 0.3 * cams["c2w"][:, :3, 1], dim=-1)
    r = render(get_object(prompt), cams, light)
    full = r["mask"][..., 0] > 0.5
    lit = full & ((r["normal"] * light[:, None, None, :]).sum(-1) > 0.0)
    x = (r["rgb"] * lit[..., None]).permute(0, 3, 1, 2) * 2 - 1
    ts = (300, 500, 700, 900)
    pulls = [pull_from_x0(guided_x0(model, sched, x, t, prompt, elev, azim, dist, g), full, lit) for t in ts]
    return "  ".join(f"t{t}:{v:+.3f}" for t, v in zip(ts, pulls))


def keep_row(model, sched, prompt, n=16):
    g = torch.Generator().manual_seed(0)
    elev, azim, dist, cams = orbit(n, model.cfg.resolution)
    r = render(get_object(prompt), cams, light_in_upper_hemisphere(cams, g))
    m = r["mask"][..., 0] > 0.5
    x = r["rgb"].permute(0, 3, 1, 2) * 2 - 1
    cells = []
    for t in (200, 400, 600, 800, 950):
        img = ((guided_x0(model, sched, x, t, prompt, elev, azim, dist, g).clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
        ratio = img[m].sum() / r["rgb"][m].sum()
        fg = foreground(img)
        iou = ((fg & m).flatten(1).sum(1).float() / (fg | m).flatten(1).sum(1).float().clamp_min(1)).mean()
        cells.append(f"t{t}: b{ratio:.2f} iou{iou:.2f}")
    return "  ".join(cells)


def main():
    torch.set_num_threads(1)
    mode, weights = sys.argv[1], sys.argv[2:]
    row, prompts = {"shadow": (shadow_row, SHADOW_PROMPTS), "keep": (keep_row, KEEP_PROMPTS)}[mode]
    for w in weights:
        model = ToyWorldPrior.load(w).eval()
        sched = make_scheduler(model.cfg)
        print(w)
        for prompt in prompts:
            print(f"  {prompt:18s} {row(model, sched, prompt)}")


if __name__ == "__main__":
    main()
