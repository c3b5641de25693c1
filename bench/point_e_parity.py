"""Parity of lift3d's Point-E (networks, diffusion, sampler) with the original implementation, on random weights.

Builds the original ``CLIPImagePointDiffusionTransformer`` (the ``base40M-textvec`` class) and
``CLIPImageGridUpsamplePointDiffusionTransformer`` (the ``upsample`` class) from a checkout of
openai/point-e (``--point-e-repo PATH``, imported from that path only, never vendored), with seeded random
weights (every parameter, the zero-initialised output projection included, gets noise), saves their
``state_dict()`` as ``.pt`` files in the original key layout, and loads those through lift3d's key map
(``lift3d.priors.point_e.checkpoint``). Then, on the same inputs, it compares:

* base model output (conditional, with CLIP-like unit vectors, and unconditional: zero embeddings);
* upsampler output (low-res cloud in raw units, no image grid: the text path);
* the schedules (``alphas_cumprod`` cosine and linear; learned-range posterior mean and log variance for one
  model output);
* the whole two-stage text-to-point-cloud sampler (Karras/Heun, guidance 3 on the base, unguided upsampler)
  from the same global seed: the reference's ``PointCloudSampler`` against ``PointEPrior.sample``.

What is stubbed, and only here: the reference's CLIP wrapper (it needs OpenAI's ``clip`` package and its
weights) is replaced by a stand-in that returns the given embeddings (zeros for missing ones) and reports
the feature sizes; so the text encoder itself is not part of this check.

    python bench/point_e_parity.py --point-e-repo /path/to/point-e [--size tiny|full] [--seed 0]

``tiny``: width 32, 2 layers, 2 heads, 64 + 192 points, condition 16-d, grid 8 x 16 tokens.
``full``: Point-E's real architectures (width 512, 12 layers, 8 heads, 1024 + 3072 points, 768-d, 1024 x 256),
the sampler at 4 steps per stage.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {
    "tiny": dict(width=32, layers=2, heads=2, n_ctx=64, up_ctx=192, cond_dim=16, grid_dim=8, grid_size=4, steps=8),
    "full": dict(width=512, layers=12, heads=8, n_ctx=1024, up_ctx=3072, cond_dim=768, grid_dim=1024, grid_size=16,
                 steps=4),
}


def _import_reference(path: Path, dims: dict):
    if not (path / "point_e" / "models" / "transformer.py").is_file():
        print(f"SKIP: no Point-E checkout at {path} (expected point_e/models/transformer.py); fetch "
              "https://github.com/openai/point-e and pass --point-e-repo")
        sys.exit(0)
    sys.path.insert(0, str(path))
    import point_e.models.transformer as ref_tf

    class ClipStandIn:
        """Returns the given embeddings (zeros where None), like the frozen wrapper on precomputed vectors."""

        def __init__(self, device, **kwargs):
            self.device = device

        feature_dim = dims["cond_dim"]
        grid_size = dims["grid_size"]
        grid_feature_dim = dims["grid_dim"]

        def __call__(self, batch_size, images=None, texts=None, embeddings=None):
            embs = [None] * batch_size if embeddings is None else list(embeddings)
            return torch.stack([torch.zeros(self.feature_dim) if e is None else e.float() for e in embs])

    ref_tf.FrozenImageCLIP = ClipStandIn
    ref_tf.ImageCLIP = ClipStandIn
    return ref_tf


def _randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            elif "ln" in name or ".0." in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a.double() - b.double()).abs().max().item()
    return d, d / max(b.double().abs().max().item(), 1e-30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--point-e-repo", type=Path, required=True)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    dims = SIZES[args.size]
    ref_tf = _import_reference(args.point_e_repo, dims)
    from point_e.diffusion.configs import DIFFUSION_CONFIGS, diffusion_from_config
    from point_e.diffusion.sampler import PointCloudSampler

    from lift3d.priors.point_e.checkpoint import load_base_model, load_upsampler_model
    from lift3d.priors.point_e.diffusion import PointDiffusionSchedule
    from lift3d.priors.point_e.prior import PointEPrior

    torch.manual_seed(args.seed)
    cpu = torch.device("cpu")
    common = dict(device=cpu, dtype=torch.float32, input_channels=6, output_channels=12, width=dims["width"],
                  layers=dims["layers"], heads=dims["heads"], init_scale=0.25, time_token_cond=True)
    ref_base = ref_tf.CLIPImagePointDiffusionTransformer(n_ctx=dims["n_ctx"], token_cond=True, cond_drop_prob=0.1,
                                                         **common).eval()
    ref_up = ref_tf.CLIPImageGridUpsamplePointDiffusionTransformer(
        n_ctx=dims["up_ctx"], cond_ctx=dims["n_ctx"], cond_drop_prob=0.1,
        channel_scales=[2.0, 2.0, 2.0, 0.007843137255, 0.007843137255, 0.007843137255],
        channel_biases=[0.0, 0.0, 0.0, -1.0, -1.0, -1.0], **common).eval()
    _randomise(ref_base, args.seed)
    _randomise(ref_up, args.seed + 1)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(ref_base.state_dict(), Path(tmp) / "base.pt")
        torch.save(ref_up.state_dict(), Path(tmp) / "up.pt")
        base = load_base_model(Path(tmp) / "base.pt", heads=dims["heads"], n_ctx=dims["n_ctx"])
        up = load_upsampler_model(Path(tmp) / "up.pt", heads=dims["heads"], n_ctx=dims["up_ctx"],
                                  cond_ctx=dims["n_ctx"], grid_tokens=dims["grid_size"] ** 2)
    print(f"loaded through the key map: base {len(ref_base.state_dict())} keys, upsampler {len(ref_up.state_dict())} keys")

    g = torch.Generator().manual_seed(args.seed + 2)
    b = 2
    x = torch.randn(b, 6, dims["n_ctx"], generator=g)
    t = torch.tensor([10, 900])
    emb = torch.randn(b, dims["cond_dim"], generator=g)
    emb = emb / emb.norm(dim=-1, keepdim=True)  # what the CLIP wrapper returns
    with torch.no_grad():
        ref_c = ref_base(x, t, embeddings=list(emb))
        ref_u = ref_base(x, t, embeddings=[None] * b)
        ours_c = base(x, t, emb * math.sqrt(dims["cond_dim"]))
        ours_u = base(x, t, torch.zeros(b, dims["cond_dim"]))
    rows.append(("base model, conditional", *_maxdiff(ours_c, ref_c)))
    rows.append(("base model, unconditional (zero embedding)", *_maxdiff(ours_u, ref_u)))

    xu = torch.randn(b, 6, dims["up_ctx"], generator=g)
    low = torch.cat([torch.rand(b, 3, dims["n_ctx"], generator=g) - 0.5,
                     torch.rand(b, 3, dims["n_ctx"], generator=g) * 255], dim=1)
    with torch.no_grad():
        ref_o = ref_up(xu, t, low_res=low)
        ours_o = up(xu, t, low)
    rows.append(("upsampler (no image grid)", *_maxdiff(ours_o, ref_o)))

    ref_diff = diffusion_from_config(DIFFUSION_CONFIGS["base40M-textvec"])
    ref_up_diff = diffusion_from_config(DIFFUSION_CONFIGS["upsample"])
    sched, up_sched = PointDiffusionSchedule(), PointDiffusionSchedule(schedule="linear")
    rows.append(("alphas_cumprod, cosine (float64)",
                 *_maxdiff(sched.alphas_cumprod(), torch.from_numpy(ref_diff.alphas_cumprod))))
    rows.append(("alphas_cumprod, linear (float64)",
                 *_maxdiff(up_sched.alphas_cumprod(), torch.from_numpy(ref_up_diff.alphas_cumprod))))
    x_t = sched.scale_channels(low)
    ts = torch.tensor([0, 517])
    with torch.no_grad():
        ref_pmv = ref_diff.p_mean_variance(lambda xx, tt: base(xx, tt, None), x_t, ts, clip_denoised=True)
        ours_pmv = sched.p_mean_variance(base(x_t, ts, None), x_t, ts, clip_denoised=True)
    rows.append(("one DDPM step: posterior mean (learned range)", *_maxdiff(ours_pmv["mean"], ref_pmv["mean"])))
    rows.append(("one DDPM step: log variance (learned range)",
                 *_maxdiff(ours_pmv["log_variance"], ref_pmv["log_variance"])))
    rows.append(("one DDPM step: x0 prediction", *_maxdiff(ours_pmv["pred_x0"], ref_pmv["pred_xstart"])))

    # Whole two-stage sampler from the same global seed (both draw from torch's global generator in the same order).
    steps = dims["steps"]
    sampler = PointCloudSampler(device=cpu, models=[ref_base, ref_up], diffusions=[ref_diff, ref_up_diff],
                                num_points=[dims["n_ctx"], dims["up_ctx"]], aux_channels=["R", "G", "B"],
                                guidance_scale=[3.0, 0.0], model_kwargs_key_filter=("embeddings", ""),
                                karras_steps=(steps, steps))
    torch.manual_seed(args.seed + 3)
    with torch.no_grad():
        ref_samples = sampler.sample_batch(batch_size=1, model_kwargs=dict(embeddings=[emb[0]]))
    prior = PointEPrior(base, sched, upsampler=up, upsampler_schedule=up_sched, rotate=False)
    torch.manual_seed(args.seed + 3)
    xyz, rgb = prior.sample(cond=emb[:1] * math.sqrt(dims["cond_dim"]), steps=steps, upsampler_steps=steps)
    ref_xyz = ref_samples[:, :3].transpose(1, 2)
    ref_rgb = ref_samples[:, 3:].clamp(0, 255).round().transpose(1, 2) / 255
    rows.append((f"sampler xyz ({steps}+{steps} Heun steps, guidance 3)", *_maxdiff(xyz, ref_xyz)))
    rows.append((f"sampler rgb (8-bit, in [0, 1])", *_maxdiff(rgb, ref_rgb)))

    print(f"\nPoint-E parity, size={args.size}, seed={args.seed}, float32 on CPU (torch {torch.__version__})\n")
    print("| quantity | max abs diff | relative to max abs |")
    print("|---|---|---|")
    for name, d, r in rows:
        print(f"| {name} | {d:.3g} | {r:.3g} |")


if __name__ == "__main__":
    main()
