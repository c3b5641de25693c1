"""``python -m lift3d.priors.toyworld {train,sample,eval,render-image,train-mv,eval-mv,train-zero123,eval-zero123,
train-viewdiff,train-points,eval-points}``: the toy-world prior's command line (``train-mv`` / ``eval-mv``: the
multi-view prior, :mod:`lift3d.priors.toyworld.multiview`; ``train-zero123`` / ``eval-zero123``: the image-conditioned
one, :mod:`lift3d.priors.toyworld.zero123`; ``train-viewdiff``: the toy ViewDiff,
:mod:`lift3d.priors.toyworld.viewdiff`; ``train-points`` / ``eval-points``: the toy Point-E,
:mod:`lift3d.priors.toyworld.points`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _overrides(items: list[str]) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.from_dotlist(items)) if items else {}


def _training_parser(sub: argparse._SubParsersAction, name: str, help: str, example: str, recipe_default: str,
                     recipe_help: str, install_help: str) -> argparse.ArgumentParser:
    """A training command: key=value overrides, --recipe and --install."""
    p = sub.add_parser(name, help=help)
    p.add_argument("overrides", nargs="*", help=f"e.g. {example}")
    p.add_argument("--recipe", default=recipe_default, help=recipe_help)
    p.add_argument("--install", action="store_true", help=install_help)
    return p


def _sampling_options(p: argparse.ArgumentParser, n: int, n_help: str, grid: str) -> None:
    """The options an evaluation command shares: how many samples, how they are drawn, where the grid goes."""
    p.add_argument("--n", type=int, default=n, help=n_help)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--prompts", nargs="*", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=grid)


def _install(final: Path, complete: bool, target: Path, tag: str) -> None:
    """Copy the weights ``final`` of a complete run to ``target`` in the package; a partial run is refused."""
    import shutil

    if not complete:
        print(f"[{tag}] not installed: {final} is a partial result", file=sys.stderr)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(final, target)
    print(f"[{tag}] installed {target}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lift3d.priors.toyworld")
    sub = p.add_subparsers(dest="cmd", required=True)
    _training_parser(sub, "train", "train (or resume) the prior: by default every stage of the shipped weights' "
                     "recipe; key=value overrides of TrainConfig apply to every stage",
                     "threads=2 autocast=bf16 out_dir=outputs/toyworld-prior", "shipped",
                     "'shipped' (the packaged recipe.yaml), a recipe YAML file, or 'none': one run of "
                     "TrainConfig with the overrides alone", "copy the final weights into the package")
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
    _sampling_options(ev, 8, "samples per prompt", "outputs/toyworld-eval.png")
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
    _training_parser(sub, "train-mv", "fine-tune (or resume) the multi-view prior from the shipped single-view "
                     "weights: the packaged recipe-mv.yaml with key=value overrides on top",
                     "threads=2 steps=3000 out_dir=outputs/toyworld-prior-mv", "packaged",
                     "'packaged' (recipe-mv.yaml beside the model card), a YAML file of train-mv keys, or 'none': "
                     "the train-mv defaults with the overrides alone",
                     "copy the final weights to weights/toyworld-mv.safetensors (only when the run is complete)")
    em = sub.add_parser("eval-mv", help="sample groups of views jointly and score their consistency against "
                        "exact renders; prints a table")
    em.add_argument("--weights", default=None, help="multi-view safetensors file (default: weights/toyworld-mv)")
    em.add_argument("--baseline", default=None,
                    help="also sample the same cameras view by view with this single-view file ('shipped': the "
                         "packaged weights)")
    _sampling_options(em, 4, "groups per prompt", "outputs/toyworld-eval-mv.png")
    _training_parser(sub, "train-zero123", "fine-tune (or resume) the image-conditioned prior (the toy Zero123) "
                     "from the shipped single-view weights: the packaged recipe-zero123.yaml with key=value "
                     "overrides on top", "threads=2 steps=2000 out_dir=outputs/toyworld-prior-zero123", "packaged",
                     "'packaged' (recipe-zero123.yaml beside the model card), a YAML file of train-zero123 keys, "
                     "or 'none': the train-zero123 defaults with the overrides alone",
                     "copy the final weights to weights/toyworld-zero123.safetensors (only when the run is complete)")
    ez = sub.add_parser("eval-zero123", help="sample novel views from one input view of each object and score them "
                        "against exact renders; prints a table")
    ez.add_argument("--weights", default=None, help="toy Zero123 safetensors file (default: weights/toyworld-zero123)")
    ez.add_argument("--input-camera", default="10,30", help="elevation,azimuth of the input view (degrees)")
    _sampling_options(ez, 8, "novel views per object", "outputs/toyworld-eval-zero123.png")
    _training_parser(sub, "train-viewdiff", "fine-tune (or resume) the toy ViewDiff (cross-frame LoRA and a projection "
                     "layer added to the shipped single-view prior): the packaged recipe-viewdiff.yaml with key=value "
                     "overrides on top", "threads=2 steps=3000 out_dir=outputs/toyworld-prior-viewdiff", "packaged",
                     "'packaged' (recipe-viewdiff.yaml beside the model card), a YAML file of train-viewdiff keys, "
                     "or 'none': the train-viewdiff defaults with the overrides alone",
                     "copy the final weights to weights/toyworld-viewdiff.safetensors (only when the run is complete)")
    _training_parser(sub, "train-points", "train (or resume) the toy point-cloud prior (the toy Point-E) from scratch: "
                     "the packaged recipe-points.yaml with key=value overrides on top",
                     "threads=2 steps=1500 out_dir=outputs/toyworld-points", "packaged",
                     "'packaged' (recipe-points.yaml beside the model card), a YAML file of train-points keys, "
                     "or 'none': the train-points defaults with the overrides alone",
                     "copy the final weights to weights/toyworld-points.safetensors (only when the run is complete)")
    ep = sub.add_parser("eval-points", help="sample point clouds of each prompt, write them as PLY files and print "
                        "their Chamfer distance to the exact surface and the front check")
    ep.add_argument("--weights", default=None, help="toy point prior safetensors file (default: "
                    "weights/toyworld-points)")
    ep.add_argument("--out", default="outputs/toyworld-eval-points", help="folder for the PLY files")
    ep.add_argument("--points", type=int, default=None, help="points per cloud (default: the model's n_ctx)")
    ep.add_argument("--threads", type=int, default=None)
    _sampling_options(ep, 4, "clouds per prompt", "outputs/toyworld-eval-points.png")
    ep.set_defaults(steps=64, guidance_scale=3.0)
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
        if args.cmd in ("train-mv", "eval-mv"):
            return _multiview(args)
        if args.cmd in ("train-zero123", "eval-zero123"):
            return _zero123(args)
        if args.cmd in ("train-points", "eval-points"):
            return _points(args)
        if args.cmd == "train-viewdiff":
            from lift3d.priors.toyworld import viewdiff as vd

            recipe = {"packaged": None, "none": {}}.get(args.recipe, args.recipe)
            final = vd.train_viewdiff_recipe(recipe, _overrides(args.overrides))
            if args.install:
                _install(final, final.name == vd.FINAL_VIEWDIFF_NAME, vd.DEFAULT_VIEWDIFF_WEIGHTS, "toyworld-viewdiff")
            return 0
        if args.cmd == "train":
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
            if args.install:
                _install(final, complete, DEFAULT_WEIGHTS, "toyworld")
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


def _multiview(args: argparse.Namespace) -> int:
    """``train-mv`` and ``eval-mv`` (errors are reported by the caller)."""
    if args.cmd == "train-mv":
        from lift3d.priors.toyworld.multiview import DEFAULT_MV_WEIGHTS
        from lift3d.priors.toyworld.multiview_train import FINAL_MV_NAME, train_multiview_recipe

        recipe = {"packaged": None, "none": {}}.get(args.recipe, args.recipe)
        final = train_multiview_recipe(recipe, _overrides(args.overrides))
        if args.install:
            _install(final, final.name == FINAL_MV_NAME, DEFAULT_MV_WEIGHTS, "toyworld-mv")
        return 0
    from lift3d.priors.toyworld.consistency import evaluate_multiview, format_group_table
    from lift3d.priors.toyworld.model import ToyWorldPrior
    from lift3d.priors.toyworld.multiview import MultiViewToyPrior

    model = MultiViewToyPrior.load(args.weights).eval()
    baseline = None
    if args.baseline is not None:
        baseline = ToyWorldPrior.load(None if args.baseline == "shipped" else args.baseline).eval()
    scores = evaluate_multiview(model, args.prompts, args.n, args.steps, args.guidance_scale, args.seed, baseline,
                                args.grid)
    print(format_group_table(scores))
    print(f"grid: {args.grid}")
    return 0


def _zero123(args: argparse.Namespace) -> int:
    """``train-zero123`` and ``eval-zero123`` (errors are reported by the caller)."""
    from lift3d.priors.toyworld import zero123 as z

    if args.cmd == "train-zero123":
        recipe = {"packaged": None, "none": {}}.get(args.recipe, args.recipe)
        final = z.train_zero123_recipe(recipe, _overrides(args.overrides))
        if args.install:
            _install(final, final.name == z.FINAL_Z123_NAME, z.DEFAULT_Z123_WEIGHTS, "toyworld-zero123")
        return 0
    from lift3d.priors.toyworld.evaluate import format_table

    try:
        el, az = (float(v) for v in args.input_camera.split(","))
    except ValueError:
        raise ValueError(f"--input-camera: expected 'elevation,azimuth' in degrees, got {args.input_camera!r}")
    model = z.ToyZero123.load(args.weights).eval()
    scores = z.evaluate_novel_views(model, args.prompts, args.n, (el, az), args.steps, args.guidance_scale, args.seed)
    print(format_table(scores))
    z.save_novel_view_grid(model, Path(args.grid), seed=args.seed, input_camera_deg=(el, az))
    print(f"grid: {args.grid}")
    return 0


def _points(args: argparse.Namespace) -> int:
    """``train-points`` and ``eval-points`` (errors are reported by the caller)."""
    from lift3d.priors.toyworld import points as pts

    if args.cmd == "train-points":
        recipe = {"packaged": None, "none": {}}.get(args.recipe, args.recipe)
        final = pts.train_points_recipe(recipe, _overrides(args.overrides))
        if args.install:
            _install(final, final.name == pts.FINAL_POINTS_NAME, pts.DEFAULT_POINTS_WEIGHTS, "toyworld-points")
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model = pts.ToyPointPrior.load(args.weights).eval()
    scores = pts.evaluate_points(model, args.prompts, args.n, args.steps, args.guidance_scale, args.seed, args.out,
                                 args.points)
    print(pts.format_point_table(scores))
    pts.save_cloud_grid(model, Path(args.grid), seed=args.seed)
    print(f"clouds: {args.out}")
    print(f"grid: {args.grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
