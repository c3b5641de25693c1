"""``python -m lift3d.priors.viewdiff {train,sample}``: ViewDiff's command line.

* ``train root=<dataset> base_model=<SD folder or id> out_dir=<folder> [key=value ...]``: train (or
  resume) the added layers; keys are :class:`~lift3d.priors.viewdiff.train.TrainConfig`'s, parsed
  strictly (a misspelt key stops the run and lists the valid ones).
* ``sample --prompt ... --views N --base-model ... --weights ... --out <folder>``: autoregressive
  sampling (:mod:`lift3d.priors.viewdiff.sample`).

Exit status 2 for a configuration or missing-weights error (the message says which key and what to do).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from lift3d.priors.viewdiff.model import DEFAULT_BASE_MODEL, WEIGHTS_NAME

    p = argparse.ArgumentParser(prog="python -m lift3d.priors.viewdiff")
    sub = p.add_subparsers(dest="cmd", required=True)
    tp = sub.add_parser("train", help="train (or resume) ViewDiff's added layers on a multi-view dataset")
    tp.add_argument("overrides", nargs="*", help="key=value, e.g. root=data/co3d base_model=stabilityai/"
                    "stable-diffusion-2-1-base out_dir=outputs/viewdiff steps=20000 model.grid_size=24")
    sp = sub.add_parser("sample", help="generate N views of a prompt, group by group")
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--views", type=int, default=8, help="views on the orbit")
    sp.add_argument("--base-model", default=DEFAULT_BASE_MODEL, help="diffusers SD folder or cached Hugging Face id")
    sp.add_argument("--weights", default=f"outputs/viewdiff/{WEIGHTS_NAME}", help="ViewDiff weights (train's output)")
    sp.add_argument("--out", required=True, help="output folder (images/, cameras.json, grid.png)")
    sp.add_argument("--group", type=int, default=4, help="views denoised together")
    sp.add_argument("--known", type=int, default=None, help="generated views kept in each later group (default group/2)")
    sp.add_argument("--mode", choices=("renoise", "clean"), default="renoise",
                    help="known views noised to the current step (renoise) or given clean at t=0")
    sp.add_argument("--steps", type=int, default=50)
    sp.add_argument("--guidance-scale", type=float, default=7.5)
    sp.add_argument("--negative-prompt", default="")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--elevation", type=float, default=15.0)
    sp.add_argument("--distance", type=float, default=2.5)
    sp.add_argument("--fovy", type=float, default=40.0)
    sp.add_argument("--intensity", type=float, default=0.5, help="mean brightness the first group is conditioned on")
    sp.add_argument("--device", default=None)
    args = p.parse_args(argv)

    from lift3d.config import ConfigError

    try:
        if args.cmd == "train":
            from omegaconf import OmegaConf

            from lift3d.priors.viewdiff.train import train

            bad = [o for o in args.overrides if "=" not in o]
            if bad:
                raise ConfigError(f"train takes key=value arguments, got {bad}")
            overrides = OmegaConf.to_container(OmegaConf.from_dotlist(args.overrides)) if args.overrides else {}
            print(train(overrides))
        else:
            from lift3d.priors.viewdiff.sample import sample_command

            paths = sample_command(args.prompt, args.views, args.base_model, args.weights, args.out, group=args.group,
                                   known=args.known, steps=args.steps, guidance_scale=args.guidance_scale,
                                   negative_prompt=args.negative_prompt, seed=args.seed, elevation=args.elevation,
                                   distance=args.distance, fovy=args.fovy, intensity=args.intensity, mode=args.mode,
                                   device=args.device)
            for what, path in paths.items():
                print(f"{what}: {path}")
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
