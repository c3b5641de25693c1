"""Command line for Point-E (Nichol et al. 2022): sample a point cloud from text and write it as a PLY.

    python -m lift3d.priors.point_e sample --prompt "a red motorcycle" --out cloud.ply \
        [--base base_40m_textvec.pt] [--upsampler upsample_40m.pt] [--clip openai/clip-vit-large-patch14] \
        [--steps 64] [--guidance-scale 3] [--seed 0] [--no-upsample] [--device cpu]

The PLY holds float x,y,z in lift3d's world frame (+z up, front +x) and uchar colours.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lift3d.config import ConfigError
from lift3d.utils.devices import best_device

from .checkpoint import BASE_FILE, UPSAMPLER_FILE
from .diffusion import BASE_SAMPLER
from .text import DEFAULT_CLIP_MODEL


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lift3d.priors.point_e", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="text -> point cloud PLY")
    s.add_argument("--prompt", required=True)
    s.add_argument("--out", required=True, type=Path, help="the PLY to write")
    s.add_argument("--base", default=BASE_FILE, help=f"base model file (default: ./{BASE_FILE})")
    s.add_argument("--upsampler", default=UPSAMPLER_FILE,
                   help=f"upsampler file (default: ./{UPSAMPLER_FILE}); skipped with --no-upsample")
    s.add_argument("--no-upsample", action="store_true", help="write the base model's cloud only")
    s.add_argument("--clip", default=DEFAULT_CLIP_MODEL, help="CLIP ViT-L/14 folder or cached hub id")
    s.add_argument("--steps", type=int, default=BASE_SAMPLER.steps, help="Karras/Heun steps of each stage (base, upsampler)")
    s.add_argument("--guidance-scale", type=float, default=BASE_SAMPLER.guidance_scale)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--heads", type=int, default=None, help="attention heads (default: width / 64, as Point-E)")
    s.add_argument("--points", type=int, default=1024, help="points of the base model's cloud (Point-E: 1024)")
    s.add_argument("--upsampler-points", type=int, default=3072, help="points the upsampler adds (Point-E: 3072)")
    s.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    return p


def sample(args: argparse.Namespace) -> Path:
    import torch

    from lift3d.utils.point_cloud_io import write_point_cloud_ply

    from .prior import PointEPrior

    upsampler = None if args.no_upsample else args.upsampler
    prior = PointEPrior.from_pretrained(args.base, args.clip, upsampler=upsampler, heads=args.heads,
                                       n_ctx=args.points, upsampler_n_ctx=args.upsampler_points)
    dev = best_device(args.device)
    prior.to(dev)
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    xyz, rgb = prior.sample([args.prompt], steps=args.steps, guidance_scale=args.guidance_scale,
                            upsampler_steps=args.steps, generator=gen)
    return write_point_cloud_ply(args.out, xyz[0].cpu(), rgb[0].cpu())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "sample":
            out = sample(args)
            print(f"wrote {out}")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
