"""``python -m lift3d.priors.syncdreamer sample --image IN.png --elevation 30 --out DIR``: SyncDreamer's 16 views.

Writes ``DIR/view_00.png`` .. ``view_15.png`` (azimuths 0, 22.5, ... degrees from the input view,
elevation 30), ``grid.png`` (the views side by side), ``input.png`` (the conditioning image as
the model saw it) and ``cameras.json`` in lift3d's convention (:mod:`lift3d.priors.zero123pp.views`):
a folder ``configs/syncdreamer.yaml`` (or ``configs/zero123pp.yaml``) reconstructs with
``system.guidance.views_dir=DIR``. ``convert`` copies a checkpoint that holds pickled objects into a
tensors-only ``.safetensors`` (it unpickles only with ``--trust-pickle``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from lift3d.config import ConfigError
from lift3d.utils.devices import best_device


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lift3d.priors.syncdreamer",
                                description="SyncDreamer: 16 views of an object from one image.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="sample the 16 views of an image into a views folder")
    s.add_argument("--image", required=True, help="input image: RGBA (alpha = the object), or RGB on white")
    s.add_argument("--elevation", type=float, required=True,
                   help="elevation of the input view in degrees (a rough value in [-10, 40] is fine)")
    s.add_argument("--out", required=True, help="folder to write (created)")
    s.add_argument("--model", default="ckpt/syncdreamer-pretrain.ckpt",
                   help="syncdreamer-pretrain.ckpt, a .safetensors of its keys, or a folder holding one")
    s.add_argument("--steps", type=int, default=50, help="DDIM steps (the authors' 50)")
    s.add_argument("--guidance-scale", type=float, default=2.0, help="the authors' 2.0 (1.5 also suggested)")
    s.add_argument("--eta", type=float, default=1.0, help="DDIM eta (the authors' 1.0)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--view-batch", type=int, default=8, help="views per UNet call (memory only)")
    s.add_argument("--foreground-ratio", type=float, default=200 / 256,
                   help="the object's longer side over the image side (the authors' crop_size 200 of 256)")
    s.add_argument("--no-recenter", action="store_true", help="keep an RGBA input's framing as it is")
    s.add_argument("--distance", type=float, default=None,
                   help="camera distance written to cameras.json (default the model's 1.5)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    c = sub.add_parser("convert", help="copy a checkpoint's tensors into a .safetensors file read without unpickling")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling the input (runs code the file names: only for a file you trust)")
    return p


def sample_command(args: argparse.Namespace) -> int:
    import torch

    from lift3d.priors.syncdreamer import checkpoint
    from lift3d.priors.syncdreamer.input import BACKGROUND, prepare_input, read_image
    from lift3d.priors.syncdreamer.sampler import sample_views
    from lift3d.priors.zero123pp.views import write_views

    device = str(best_device(args.device))
    dtype = torch.float16 if device == "cuda" else torch.float32
    rgb, alpha = read_image(args.image, "--image")
    model = checkpoint.load(args.model, "--model", dtype=dtype).to(device)
    image = prepare_input(rgb, alpha, size=model.cfg.image_size,
                          foreground_ratio=None if args.no_recenter else args.foreground_ratio)
    res = sample_views(model, image, args.elevation, distance=args.distance, steps=args.steps,
                       guidance_scale=args.guidance_scale, eta=args.eta, seed=args.seed, view_batch=args.view_batch)
    record = {"generator": "syncdreamer", "model": str(args.model), "input_elevation": args.elevation,
              "steps": args.steps, "eta": args.eta, "guidance_scale": args.guidance_scale, "seed": args.seed}
    out = write_views(args.out, res.views, res.cameras, grid=torch.cat(list(res.views), -1), input_image=image[0],
                      background=BACKGROUND, record=record)
    print(f"[lift3d] 16 views, grid.png and cameras.json in {out}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "sample":
            return sample_command(args)
        if args.command == "convert":
            from lift3d.priors.zero123 import convert

            n = convert(args.input, args.output, trust_pickle=args.trust_pickle)
            print(f"wrote {n} tensors to {args.output}; point syncdreamer_model= at it")
            return 0
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
