"""``python -m lift3d.priors.toyworld {train,sample,eval,render-image}``: the toy-world prior's command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _overrides(items: list[str]) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.from_dotlist(items)) if items else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lift3d.priors.toyworld")
    sub = p.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train (or resume) the prior: by default every stage of the shipped "
                        "weights' recipe; key=value overrides of TrainConfig apply to every stage")
    tr.add_argument("overrides", nargs="*", help="e.g. threads=2 autocast=bf16 out_dir=outputs/toyworld-prior")
    tr.add_argument("--recipe", default="shipped",
                    help="'shipped' (the packaged recipe.yaml), a recipe YAML file, or 'none': one run "
                         "of TrainConfig with the overrides alone")
    tr.add_argument("--install", action="store_true", help="copy the final weights into the package")
    sp = sub.add_parser("sample", help="sample one image")
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--elevation", type=float, default=20.0)
    sp.add_argument("--azimuth", type=float, default=0.0)
    sp.add_argument("--distance", type=float, default=2.0)
    sp.add_argument("--steps", type=int, default=50)
    sp.add_argument("--guidance-scale", type=float, default=1.0)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--weights", default=None, help="safetensors file (default: the shipped weights)")
    sp.add_argument("--out", required=True)
    ev = sub.add_parser("eval", help="score samples against ground truth; prints a table, writes a grid")
    ev.add_argument("--weights", default=None)
    ev.add_argument("--n", type=int, default=8, help="samples per prompt")
    ev.add_argument("--steps", type=int, default=50)
    ev.add_argument("--guidance-scale", type=float, default=1.0)
    ev.add_argument("--prompts", nargs="*", default=None)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--grid", default="outputs/toyworld-eval.png")
    ri = sub.add_parser("render-image", help="render a catalogue object exactly, as an RGBA PNG (alpha = "
                        "coverage): the input image of the image-to-3D recipes (image=...)")
    ri.add_argument("--prompt", required=True, help='a catalogue prompt, e.g. "a red cube"')
    ri.add_argument("--elevation", type=float, default=0.0)
    ri.add_argument("--azimuth", type=float, default=0.0)
    ri.add_argument("--distance", type=float, default=2.0)
    ri.add_argument("--fovy", type=float, default=40.0)
    ri.add_argument("--resolution", type=int, default=256)
    ri.add_argument("--supersample", type=int, default=2)
    ri.add_argument("--light", default="above", help="'above', 'headlight', or a world direction 'x,y,z'")
    ri.add_argument("--out", required=True, help="output .png")
    args = p.parse_args(argv)

    if args.cmd == "render-image":
        from lift3d.priors.toyworld.image import save_rgba

        try:
            light = args.light if args.light in ("above", "headlight") else [float(v) for v in args.light.split(",")]
            print(save_rgba(Path(args.out), args.prompt, elevation_deg=args.elevation, azimuth_deg=args.azimuth,
                            distance=args.distance, fovy_deg=args.fovy, resolution=args.resolution,
                            supersample=args.supersample, light=light))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0

    import torch

    from lift3d.priors.toyworld.model import MissingWeightsError, ToyWorldPrior

    try:
        if args.cmd == "train":
            import shutil

            from lift3d.priors.toyworld.model import DEFAULT_WEIGHTS
            from lift3d.priors.toyworld.recipe import is_complete, train_recipe
            from lift3d.priors.toyworld.train import train

            overrides = _overrides(args.overrides)
            if args.recipe == "none":
                final = train(overrides)
                complete = final.name == "toyworld.safetensors"
            else:
                recipe = None if args.recipe == "shipped" else args.recipe
                final = train_recipe(recipe, overrides)
                complete = is_complete(recipe, overrides, final)
            if args.install and not complete:
                print(f"[toyworld] not installed: {final} is a partial result", file=sys.stderr)
            elif args.install:
                DEFAULT_WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(final, DEFAULT_WEIGHTS)
                print(f"[toyworld] installed {DEFAULT_WEIGHTS}")
        elif args.cmd == "sample":
            from lift3d.priors.toyworld.data import camera_vector
            from lift3d.priors.toyworld.model import sample
            from lift3d.priors.toyworld.vocab import pad_tokens, tokenize
            from lift3d.utils.io import save_image

            model = ToyWorldPrior.load(args.weights).eval()
            cam = camera_vector(torch.tensor([args.elevation]), torch.tensor([args.azimuth]),
                                torch.tensor([args.distance]))
            img = sample(model, pad_tokens([tokenize(args.prompt)]), cam, steps=args.steps,
                         guidance_scale=args.guidance_scale, generator=torch.Generator().manual_seed(args.seed))
            print(save_image(Path(args.out), img[0].permute(1, 2, 0).numpy()))
        else:
            from lift3d.priors.toyworld.evaluate import evaluate, format_table

            model = ToyWorldPrior.load(args.weights).eval()
            scores = evaluate(model, args.prompts, args.n, args.steps, args.guidance_scale, args.seed, args.grid)
            print(format_table(scores))
            print(f"grid: {args.grid}")
    except (MissingWeightsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
