"""One SDS step on Stable Diffusion 2.1-base at full size, with random weights: time and peak memory.

The step is what ``stable-diffusion-guidance`` does every training step of the SD recipes: a
render-sized image (64x64 by default, the DreamFusion / Magic3D coarse render) resized to the
working resolution, VAE-encoded with gradients, noised, scored by the UNet for the prompt and the
negative prompt (one batched call: classifier-free guidance), and the SDS loss pulled back through
the encoder to the render. The networks have the published architecture of
``stabilityai/stable-diffusion-2-1-base`` (its ``unet/config.json`` and ``vae/config.json``, written
out below), filled with seeded random weights: nothing is downloaded, and the arithmetic (hence the
time and the memory) is that of the real model. The weights are saved once as a diffusers folder
and every case loads them through its guidance's own loading path.

Each case (implementation x precision) runs in a fresh worker process: the median wall time of
``--runs`` steps after one warm-up, the largest resident memory the worker reached during the steps
(VmHWM, reset after loading; weights included), and the resident memory before the first step
(the weights). The text embeddings are random [1, 77, 1024] tensors (the text encoder runs once per
run, not per step).
Precisions: float32, and float32 weights under bfloat16 autocast (``bf16``; fast on CPUs with AMX or
AVX512-BF16).

``--threestudio PATH`` adds threestudio's ``stable-diffusion-guidance`` (a checkout at PATH, not
vendored) on the same weights and inputs and prints ours / theirs. It needs ``import threestudio``
to work (its tiny-cuda-nn, torchvision, OpenCV, ... imports); when it fails the reason is printed and
the column skipped. ``--stand-ins`` lets it import on a machine without them: the missing modules of
``STAND_INS``, which only threestudio's other parts use, are replaced by inert stand-ins while
``threestudio`` imports (the guidance, diffusers and torch are the real ones). threestudio always
resizes renders to 512 px, so it runs only at ``--resolution 512``; its device (hard-wired to CUDA)
is redirected to the CPU, where everything here runs.

    python bench/sds_step.py [--resolution 512] [--render 64] [--runs 3] [--threads 2]
                             [--precisions float32,bf16] [--threestudio PATH [--stand-ins]] [--keep-weights DIR]

``--resolution 256`` keeps the architecture and shrinks the working resolution (UNet latents 32x32)
for machines where 512 is too slow. Timings on a shared machine are indicative only.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import importlib.machinery
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

#: The UNet of stabilityai/stable-diffusion-2-1-base (its unet/config.json; sample_size is the latent size).
SD21_BASE_UNET = dict(
    act_fn="silu", attention_head_dim=[5, 10, 20, 20], block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False, cross_attention_dim=1024,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1, dual_cross_attention=False, flip_sin_to_cos=True, freq_shift=0, in_channels=4,
    layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    use_linear_projection=True,
)
#: Its VAE (vae/config.json): 8x downsampling, 4 latent channels.
SD21_BASE_VAE = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=512,
    up_block_types=["UpDecoderBlock2D"] * 4,
)
#: Its noise schedule and parameterisation (scheduler/scheduler_config.json, as a DDIM config).
SD21_BASE_SCHEDULER = dict(
    _class_name="DDIMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    num_train_timesteps=1000, prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)
TEXT_SHAPE = (1, 77, 1024)
T_FIXED, SEED = 500, 0


def write_weights(folder: Path, resolution: int, seed: int = SEED) -> Path:
    """A diffusers Stable Diffusion folder with SD 2.1-base's UNet and VAE, seeded random weights.

    The weights are stored in float16 (half the disk) and loaded as float32 by every case alike.
    A tiny CLIP text encoder is included because threestudio loads a whole pipeline (and drops it).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    UNet2DConditionModel(**{**SD21_BASE_UNET, "sample_size": resolution // 8}).half().save_pretrained(folder / "unet")
    AutoencoderKL(**{**SD21_BASE_VAE, "sample_size": resolution}).half().save_pretrained(folder / "vae")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD21_BASE_SCHEDULER))
    CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1)).save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": [None, None],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}))
    return folder


def inputs(render: int, seed: int = SEED) -> dict:
    """The same render, cameras, text, timestep and noise for every case."""
    g = torch.Generator().manual_seed(seed)
    return dict(rgb=torch.rand(1, render, render, 3, generator=g), elevation=torch.tensor([15.0]),
                azimuth=torch.tensor([30.0]), distance=torch.tensor([2.0]),
                cond=torch.randn(TEXT_SHAPE, generator=g), uncond=torch.randn(TEXT_SHAPE, generator=g))


def rss_mb() -> float:
    """Resident memory of this process now, MB (Linux /proc; ru_maxrss elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    """Restart the peak-RSS count here (Linux: /proc/self/clear_refs 5), so loading does not count."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_mb() -> float:
    """Largest resident memory since :func:`reset_peak` (VmHWM), else since the process started, MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the two implementations -----------------------------------------------------------------------


def ours(folder: Path, inp: dict):
    from lift3d.guidance.base import CameraBatch, GuidanceInput
    from lift3d.prompts.base import PromptUtils
    from lift3d.registry import find

    g = find("stable-diffusion-guidance", "guidance")({
        "pretrained_model_name_or_path": str(folder), "torch_dtype": "float32", "guidance_scale": 100.0,
        "weighting": "sds"}).eval()
    prompt = PromptUtils(prompt="bench", text_embeddings=inp["cond"], uncond_text_embeddings=inp["uncond"],
                         source="bench")
    cams = CameraBatch.from_angles(inp["elevation"], inp["azimuth"], inp["distance"])
    res = g.prior.latent_size[0]
    noise = torch.randn(1, 4, res, res, generator=torch.Generator().manual_seed(1))

    def step() -> float:
        rgb = inp["rgb"].clone().requires_grad_(True)
        out = g(GuidanceInput(cameras=cams, rgb=rgb, prompt=prompt), t=torch.tensor([T_FIXED]), noise=noise)
        out.losses["loss_sds"].backward()
        return float(rgb.grad.abs().sum())

    return step


class _ThreestudioPrompt:
    """What threestudio's guidance reads from its PromptProcessorOutput: [cond; uncond] rows."""

    use_perp_neg = False

    def __init__(self, cond: torch.Tensor, uncond: torch.Tensor):
        self.cond, self.uncond = cond, uncond

    def get_text_embeddings(self, elevation, azimuth, camera_distances, view_dependent_prompting=True):
        B = elevation.shape[0]
        return torch.cat([self.cond.expand(B, -1, -1), self.uncond.expand(B, -1, -1)]).to(elevation.device)


#: Modules ``import threestudio`` pulls in for its other parts (renderers, CUDA encodings, image I/O,
#: logging) that its StableDiffusionGuidance never calls: with --stand-ins, those missing here are
#: replaced by inert stand-ins while threestudio imports.
STAND_INS = ("cv2", "torchvision", "typeguard", "tinycudann", "igl", "envlight", "nvdiffrast", "matplotlib",
             "IPython", "controlnet_aux", "einops", "trimesh", "wandb")


class _StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Last on ``sys.meta_path``: answers only for the STAND_INS modules no real finder found."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] not in STAND_INS:
            return None
        self.used.add(name.split(".")[0])
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec):
        from unittest import mock

        module = mock.MagicMock(name=spec.name)
        module.__path__, module.__spec__, module.__name__ = [], spec, spec.name
        module.typechecked = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)  # typeguard's decorator
        return module

    def exec_module(self, module) -> None:
        pass


def import_threestudio(path: str, stand_ins: bool = False):
    """threestudio's StableDiffusionGuidance class from the checkout at ``path``; raises on failure."""
    root = Path(path).expanduser().resolve()
    if not (root / "threestudio" / "__init__.py").is_file():
        raise FileNotFoundError(f"{root} holds no threestudio package (threestudio/__init__.py)")
    sys.path.insert(0, str(root))
    if stand_ins:
        # The real packages first, so that their own checks of what is installed see the truth.
        import jaxtyping  # noqa: F401
        from diffusers import (ControlNetModel, DDIMScheduler, DDPMScheduler,  # noqa: F401
                               StableDiffusionPipeline, UNet2DConditionModel)
        finder = _StandIns()
        sys.meta_path.append(finder)
        try:
            import threestudio  # noqa: F401
        finally:
            sys.meta_path.remove(finder)
        print(f"threestudio imported with stand-ins for: {', '.join(sorted(finder.used)) or 'nothing'}",
              file=sys.stderr)
    import threestudio  # noqa: F401  (registers everything; needs its CUDA-side dependencies)
    from threestudio.models.guidance.stable_diffusion_guidance import StableDiffusionGuidance

    return StableDiffusionGuidance


def theirs(folder: Path, inp: dict, path: str, stand_ins: bool = False):
    cls = import_threestudio(path, stand_ins)
    import threestudio.utils.base as ts_base

    ts_base.get_device = lambda: torch.device("cpu")  # its BaseObject puts everything on cuda:<rank>
    g = cls({"pretrained_model_name_or_path": str(folder), "half_precision_weights": False,
             "guidance_scale": 99.0,  # e_c + 99 (e_c - e_u): our 100
             "weighting_strategy": "sds", "min_step_percent": T_FIXED / 1000, "max_step_percent": T_FIXED / 1000})
    prompt = _ThreestudioPrompt(inp["cond"], inp["uncond"])

    def step() -> float:
        rgb = inp["rgb"].clone().requires_grad_(True)
        out = g(rgb, prompt, inp["elevation"], inp["azimuth"], inp["distance"], rgb_as_latents=False)
        out["loss_sds"].backward()
        return float(rgb.grad.abs().sum())

    return step


# -- worker and driver -------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    inp = inputs(args.render)
    try:
        step = (ours(args.folder, inp) if args.impl == "ours"
                else theirs(args.folder, inp, args.threestudio, args.stand_ins))
    except Exception as exc:  # noqa: BLE001  (a skipped column, with its reason)
        print(json.dumps({"skipped": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}))
        return
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.precision == "bf16" else contextlib.nullcontext
    before = rss_mb()
    reset_peak()
    times, grads = [], []
    for i in range(args.runs + 1):
        start = time.perf_counter()
        with ctx():
            grads.append(step())
        if i:  # the first is the warm-up
            times.append(time.perf_counter() - start)
    peak = peak_mb()
    print(json.dumps({"median_s": statistics.median(times), "min_s": min(times), "weights_mb": before,
                      "peak_mb": peak, "grad_abs_sum": grads[-1]}))


def run_case(args: argparse.Namespace, folder: Path, impl: str, precision: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--folder", str(folder), "--precision", precision,
           "--render", str(args.render), "--runs", str(args.runs), "--threads", str(args.threads)]
    if args.threestudio:
        cmd += ["--threestudio", args.threestudio] + (["--stand-ins"] if args.stand_ins else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"skipped": f"worker failed (exit {proc.returncode}): {tail[:300]}"}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=512, help="working resolution in pixels (UNet latents: /8)")
    ap.add_argument("--render", type=int, default=64, help="size of the render fed to the guidance")
    ap.add_argument("--runs", type=int, default=3, help="timed steps per case, after one warm-up")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precisions", default="float32,bf16")
    ap.add_argument("--threestudio", default=None, help="a threestudio checkout to compare with")
    ap.add_argument("--stand-ins", action="store_true",
                    help="let threestudio import without its renderers' dependencies (see STAND_INS)")
    ap.add_argument("--keep-weights", default=None, help="write (or reuse) the random weights here")
    ap.add_argument("--worker", choices=["ours", "threestudio"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.impl = args.worker
        worker(args)
        return
    if args.resolution % 64:
        ap.error("--resolution must be a multiple of 64 (the UNet halves its latents three times)")

    with tempfile.TemporaryDirectory(prefix="sds-step-") as tmp:
        folder = Path(args.keep_weights) if args.keep_weights else Path(tmp) / "sd21-base-random"
        if not (folder / "model_index.json").is_file():
            start = time.perf_counter()
            write_weights(folder, args.resolution)
            print(f"random SD 2.1-base weights written to {folder} in {time.perf_counter() - start:.0f} s")
        latent = json.loads((folder / "unet" / "config.json").read_text())["sample_size"]
        if latent * 8 != args.resolution:
            ap.error(f"{folder} holds a UNet for {latent * 8} px, not --resolution {args.resolution}")
        impls = ["ours"]
        note = None
        if args.threestudio:
            if args.resolution != 512:
                note = "threestudio: skipped, its guidance resizes every render to 512 px"
            else:
                impls.append("threestudio")
        results = {(i, p): run_case(args, folder, i, p) for p in args.precisions.split(",") for i in impls}

    print(f"\nSDS step, Stable Diffusion 2.1-base architecture (random weights), working resolution "
          f"{args.resolution} px, render {args.render} px, batch 1, CFG (2 UNet evaluations), backward through "
          f"the VAE encoder; CPU, {args.threads} threads, median of {args.runs} after 1 warm-up")
    print("| implementation | precision | step s (median) | fastest s | weights RSS MB | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for (impl, prec), r in results.items():
        if "skipped" in r:
            print(f"| {impl} | {prec} | skipped: {r['skipped']} | | | |")
        else:
            print(f"| {impl} | {prec} | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['weights_mb']:.0f} | "
                  f"{r['peak_mb']:.0f} |")
    for prec in args.precisions.split(","):
        a, b = results.get(("ours", prec), {}), results.get(("threestudio", prec), {})
        if "median_s" in a and "median_s" in b:
            print(f"{prec}: ours / threestudio step time = {a['median_s'] / b['median_s']:.2f}, "
                  f"peak memory = {a['peak_mb'] / b['peak_mb']:.2f}")
    if note:
        print(note)
    if "median_s" in results.get(("ours", "float32"), {}) and "median_s" in results.get(("ours", "bf16"), {}):
        r32, r16 = results[("ours", "float32")], results[("ours", "bf16")]
        print(f"ours: bf16 autocast / float32 step time = {r16['median_s'] / r32['median_s']:.2f}")


if __name__ == "__main__":
    main()
