"""``python -m lift3d.priors.zero123pp sample --image in.png --out DIR``: the six views of one image.

Writes ``DIR/view_00.png`` .. ``view_05.png``, ``grid.png`` (the model's 3x2 tiling),
``input.png`` (the conditioning image as the model saw it) and ``cameras.json`` in lift3d's
convention (see :mod:`lift3d.priors.zero123pp.views`): a folder ``configs/zero123pp.yaml`` can
reconstruct with ``views_dir=DIR``. Weights come from a local folder or the Hugging Face cache,
never the network.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from lift3d.config import ConfigError
from lift3d.utils.devices import best_device


def _version_of(model: str) -> str:
    return "v1.1" if "v1.1" in model else "v1.2"


def build_parser() -> argparse.ArgumentParser:
    from lift3d.priors.zero123pp.model import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="python -m lift3d.priors.zero123pp",
                                description="Zero123++: six views of an object from one image.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="sample the six views of an image into a views folder")
    s.add_argument("--image", required=True,
                   help="input image: RGBA (alpha = the object), or RGB on a plain background")
    s.add_argument("--out", required=True, help="folder to write (created)")
    s.add_argument("--model", default=DEFAULT_MODEL, help="a Zero123++ folder or a Hugging Face id in the local cache")
    s.add_argument("--version", choices=["v1.1", "v1.2"], default=None,
                   help="pose table of the views (default: from the model name, else v1.2)")
    s.add_argument("--unet-weights", default=None,
                   help="a fine-tuned UNet file (safetensors, or a tensors-only .bin)")
    s.add_argument("--steps", type=int, default=28, help="sampling steps (28 is the authors' usual; 75 for fine detail)")
    s.add_argument("--guidance-scale", type=float, default=4.0)
    s.add_argument("--sampler", choices=["euler_ancestral", "ddim"], default="euler_ancestral")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--view-size", type=int, default=320, help="pixels per view (the released models: 320)")
    s.add_argument("--distance", type=float, default=None, help="camera distance written to cameras.json (default 4)")
    s.add_argument("--fovy", type=float, default=None,
                   help="vertical field of view in degrees for cameras.json (v1.2: 30; v1.1 has none: required)")
    s.add_argument("--no-recenter", action="store_true", help="keep an RGBA input's framing as it is")
    s.add_argument("--foreground-ratio", type=float, default=0.85)
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    return p


def sample_command(args: argparse.Namespace) -> int:
    import torch

    from lift3d.priors.zero123pp.input import prepare_input, read_image
    from lift3d.priors.zero123pp.model import load_folder, resolve_model
    from lift3d.priors.zero123pp.sampler import sample_views
    from lift3d.priors.zero123pp.views import write_views

    version = args.version or _version_of(args.model)
    from lift3d.priors.zero123pp.poses import view_cameras

    view_cameras(version, args.distance, args.fovy)  # a v1.1 table without --fovy fails before loading
    folder = resolve_model(args.model, key="--model")
    device = str(best_device(args.device))
    dtype = torch.float16 if device == "cuda" else torch.float32
    rgb, alpha = read_image(args.image, "--image")
    image = prepare_input(rgb, alpha, recenter_ratio=None if args.no_recenter else args.foreground_ratio)
    model = load_folder(folder, key="--model", dtype=dtype, unet_weights=args.unet_weights).to(device)
    res = sample_views(model, image, version=version, distance=args.distance, fovy_deg=args.fovy,
                       view_size=args.view_size, steps=args.steps, guidance_scale=args.guidance_scale,
                       sampler=args.sampler, seed=args.seed)
    record = {"generator": "zero123pp", "model": str(args.model), "version": version, "steps": args.steps,
              "guidance_scale": args.guidance_scale, "sampler": args.sampler, "seed": args.seed,
              "view_size": args.view_size}
    out = write_views(args.out, res.views, res.cameras, grid=res.grid, input_image=image[0],
                      background=(0.5, 0.5, 0.5), record=record)
    print(f"[lift3d] six views, grid.png and cameras.json in {out}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "sample":
            return sample_command(args)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
