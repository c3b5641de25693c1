"""The toy-world text-to-3D benchmark: train each tiny recipe per prompt, export, score the mesh.

For every (recipe, prompt): ``launch.py --train`` with the recipe, then the exported ``model.obj``
is scored against the object's exact SDF (``lift3d.priors.toyworld.metrics``): volumetric IoU on a
64^3 grid over [-0.6, 0.6]^3, Chamfer distance, surface colour error, and for the snowman, chair
and mug whether the front feature is on the front (Janus check). Wall time and peak memory (max
RSS of the run, measured in a child process) are recorded too. Prints a table and writes it, with
a JSON of all rows, to bench/results/.

    python bench/toyworld_t23d.py [--recipes configs/tiny/dreamfusion.yaml ...] [--prompts "a red cube" ...]
                                  [--steps N] [--threads 1] [--out bench/results] [--set KEY=VALUE ...]

``--steps`` overrides trainer.max_steps (single-stage recipes) for quick looks; published numbers
use the recipes' own schedules.

Image-to-3D recipes (``configs/tiny/image-to-3d.yaml``) take ``--image-camera ELEV,AZIM``: each
object is first rendered exactly by the toy world at that camera (distance 2, fov 40, lit from the
camera, an RGBA PNG under ``<out>/inputs/``), and the run gets ``image=`` that file and the camera
as ``data.ref_*``. With ``--image-camera`` the prompt is still passed; ``--no-prompt`` drops it
(the prior then scores random views with its text dropped). A recipe whose data module takes no
image (``configs/tiny/dreamfusion.yaml``) runs text-only beside them.

Speed between recipes: ``--interleave`` runs the recipes in turn on each prompt (prompt by prompt,
not recipe by recipe), so they see the same load on the machine; with more than one recipe the
summary gives each one's median, over the prompts, of its wall time divided by the first recipe's
on the same prompt.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPES = ["configs/tiny/dreamfusion.yaml", "configs/tiny/reference.yaml", "configs/tiny/reference-gaussians.yaml",
                   "configs/tiny/reference-coarse-to-fine.yaml"]


def input_image(prompt: str, out_root: Path, camera: tuple[float, float]) -> tuple[str, ...]:
    """Render ``prompt``'s object at ``camera`` (elevation, azimuth) as the input image of an
    image-to-3D run; returns the overrides that pass it and its camera."""
    from lift3d.launch import prompt_slug
    from lift3d.priors.toyworld.image import save_rgba

    el, az = camera
    path = out_root / "inputs" / f"{prompt_slug(prompt)}-e{el:g}-a{az:g}.png"
    if not path.is_file():
        save_rgba(path, prompt, elevation_deg=el, azimuth_deg=az, distance=2.0, fovy_deg=40.0, resolution=256,
                  supersample=2, light="headlight")
    return (f"image={path}", f"data.ref_elevation_deg={el}", f"data.ref_azimuth_deg={az}",
            "data.ref_camera_distance=2.0", "data.ref_fovy_deg=40.0")


@functools.cache
def takes_image(recipe: str) -> bool:
    """Whether ``recipe``'s data module reads an input image (``image=`` and ``data.ref_*``)."""
    from lift3d.config import load_config

    raw, _ = load_config(str(REPO / recipe), [])
    return "image_path" in raw.get("data", {})


def run_one(recipe: str, prompt: str, out_root: Path, steps: int | None, threads: int,
            overrides: tuple[str, ...] = (), image_camera: tuple[float, float] | None = None,
            use_prompt: bool = True) -> dict:
    """Train + export in a child process (so its peak memory is its own), then score."""
    import trimesh

    from lift3d.priors.toyworld.metrics import score_mesh
    from lift3d.priors.toyworld.shapes import get_object

    exp_root = out_root / "runs"
    launch_args = ["--config", str(REPO / recipe), "--train", f"prompt={prompt if use_prompt else ''}",
                   f"exp_root_dir={exp_root}", "trainer.enable_progress_bar=false", "data.n_test_views=8"]
    if image_camera is not None and takes_image(recipe):
        launch_args += list(input_image(prompt, out_root, image_camera))
        if not use_prompt:
            launch_args.append(f"tag={prompt}")
    if steps:
        launch_args.append(f"trainer.max_steps={steps}")
    launch_args += list(overrides)
    # The child reports its own peak RSS on exit, so each row's memory is that run's alone. On Linux
    # that is VmHWM: ru_maxrss survives fork + exec, so a child of this (large, scoring) process
    # would report at least this process's size at the fork (rows after the first once read ~3.5 GB).
    wrapper = ("import resource, runpy, sys\n"
               f"sys.argv = ['launch.py'] + {launch_args!r}\n"
               "def peak_kb():\n"
               "    try:\n"
               "        with open('/proc/self/status') as f:\n"
               "            return next(int(l.split()[1]) for l in f if l.startswith('VmHWM:'))\n"
               "    except (OSError, StopIteration):\n"
               "        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
               "try:\n"
               f"    runpy.run_path({str(REPO / 'launch.py')!r}, run_name='__main__')\n"
               "finally:\n"
               "    print('PEAK_KB', peak_kb(), flush=True)\n")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", wrapper], env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.time() - t0
    peaks = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK_KB ")]
    row = {"recipe": recipe, "prompt": prompt, "wall_s": round(wall, 1),
           "peak_mb": round(peaks[-1] / 1024.0) if peaks else None}
    if proc.returncode != 0:
        row["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1][:300]
        return row
    objs = [line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("[lift3d] exported obj: ")]
    if not objs:
        row["error"] = "no model.obj exported"
        return row
    tm = trimesh.load(objs[-1], process=False, force="mesh")
    s = score_mesh(tm, get_object(prompt))
    row.update(iou=round(s.iou, 3), chamfer=round(s.chamfer, 4),
               colour_error=None if s.colour_error is None else round(s.colour_error, 3),
               front_ok=s.front_ok, mesh=objs[-1])
    # Export fidelity: the exported OBJ rendered against the system's own render (4 views, albedo).
    try:
        from lift3d.exporters.fidelity import export_psnr
        from lift3d.launch import load_trained_system

        ckpt = Path(objs[-1]).parents[2] / "ckpts" / "last.ckpt"
        row["export_psnr"] = round(export_psnr(load_trained_system(ckpt), objs[-1])[0], 2)
    except Exception as exc:  # a benchmark row keeps its scores even if this check cannot run
        row["export_psnr"] = None
        row["export_psnr_error"] = f"{type(exc).__name__}: {exc}"[:200]
    return row


def format_table(rows: list[dict]) -> str:
    head = (f"{'recipe':<36} {'prompt':<18} {'IoU':>6} {'chamfer':>8} {'colour':>7} {'front':>6} {'wall s':>7} "
            f"{'peak MB':>8} {'exp dB':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['recipe']:<36} {r['prompt']:<18} error: {r['error']}")
            continue
        front = "-" if r["front_ok"] is None else ("ok" if r["front_ok"] else "JANUS")
        col = "-" if r["colour_error"] is None else f"{r['colour_error']:.3f}"
        lines.append(f"{r['recipe']:<36} {r['prompt']:<18} {r['iou']:6.3f} {r['chamfer']:8.4f} {col:>7} {front:>6} "
                     f"{r['wall_s']:7.0f} {r['peak_mb'] or 0:8.0f} "
                     f"{'-' if r.get('export_psnr') is None else format(r['export_psnr'], '7.2f'):>7}")
    by_recipe: dict[str, list[dict]] = {}
    for r in rows:
        if "error" not in r:
            by_recipe.setdefault(r["recipe"], []).append(r)
    lines.append("")
    first = next(iter(by_recipe.values()), [])
    base_wall = {r["prompt"]: r["wall_s"] for r in first}
    for recipe, rs in by_recipe.items():
        fronts = [r["front_ok"] for r in rs if r["front_ok"] is not None]
        line = (f"{recipe}: mean IoU {sum(r['iou'] for r in rs) / len(rs):.3f}, "
                f"median wall {statistics.median(r['wall_s'] for r in rs):.0f} s, "
                f"max peak {max(r['peak_mb'] or 0 for r in rs):.0f} MB, front ok {sum(fronts)}/{len(fronts)}")
        ratios = [r["wall_s"] / base_wall[r["prompt"]] for r in rs if r["prompt"] in base_wall]
        if len(by_recipe) > 1 and rs is not first and ratios:
            line += f", wall x first recipe {statistics.median(ratios):.2f} (median of {len(ratios)} prompts)"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    from lift3d.priors.toyworld.shapes import list_prompts

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES)
    ap.add_argument("--prompts", nargs="+", default=None, help="default: all 33 toy-world prompts")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--image-camera", default=None, metavar="ELEV,AZIM",
                    help="image-to-3D: render each object at this camera as the input image")
    ap.add_argument("--no-prompt", action="store_true", help="image-to-3D without the text prompt")
    ap.add_argument("--interleave", action="store_true",
                    help="run the recipes in turn on each prompt (for speed comparisons under the same load)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides passed to every run (e.g. system.guidance.guidance_scale=10)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    camera = tuple(float(v) for v in args.image_camera.split(",")) if args.image_camera else None
    if camera is not None and len(camera) != 2:
        ap.error(f"--image-camera takes ELEV,AZIM, got {args.image_camera!r}")
    rows = []
    prompts = args.prompts or list_prompts()
    order = ([(r, p) for p in prompts for r in args.recipes] if args.interleave
             else [(r, p) for r in args.recipes for p in prompts])
    for recipe, prompt in order:
        rows.append(run_one(recipe, prompt, out, args.steps, args.threads, tuple(args.set), camera, not args.no_prompt))
        print(format_table(rows[-1:]).splitlines()[2], flush=True)
    table = format_table(rows)
    print("\n" + table)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"toyworld_t23d-{stamp}.txt").write_text(table + "\n")
    (out / f"toyworld_t23d-{stamp}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
