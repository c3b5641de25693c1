"""Toy-world prior speed: the UNet's convolutions in NHWC (channels_last, the default) vs NCHW.

One training step (forward + backward of a batch, as ``train`` runs it) and the guidance's
forward (no grad, batch 2: one view's conditional and unconditional pass; batch 8: four views),
on the version-3 architecture (ray conditioning, azimuth harmonics 4). The baseline is the same
model with its weights made NCHW-contiguous, timed in this process; ratio = baseline / row.
Medians of 7 runs after 2 warm-ups. Timings on a shared machine are indicative only.

With ``--autocast`` a second table times the NHWC training step in float32 (the baseline) against
the same step under bfloat16 autocast (``train autocast=bf16``). bf16 is fast only on CPUs with
AMX or AVX512-BF16 (the table prints which this one has); elsewhere it is emulated and slower.

    python bench/prior_speed.py [--threads 2] [--runs 7] [--autocast]
"""

from __future__ import annotations

import argparse
import copy

import torch

from lift3d.priors.toyworld.model import ToyPriorConfig, ToyWorldPrior
from lift3d.priors.toyworld.vocab import VOCAB
from timing import median_seconds


def inputs(batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 64, 64, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    tokens = torch.randint(1, len(VOCAB), (batch, 3), generator=g)
    camera = torch.tensor([[0.35, 0.5, 0.866, 2.0]]).repeat(batch, 1)
    return x, t, tokens, camera


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--autocast", action="store_true", help="also time bf16 autocast training steps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    nhwc = ToyWorldPrior(ToyPriorConfig(vocab_size=len(VOCAB), ray_conditioning=True, camera_harmonics=4))
    nchw = copy.deepcopy(nhwc).to(memory_format=torch.contiguous_format)
    assert nhwc.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert nchw.unet.conv_in.weight.is_contiguous()

    def guide(model, batch):
        def run():
            with torch.no_grad():
                model(*batch)
        return run

    cases = [(f"train step, batch {args.train_batch}", train_step, args.train_batch),
             ("guidance forward, batch 2", guide, 2), ("guidance forward, batch 8", guide, 8)]
    print(f"toy-world prior, {args.threads} threads, median of {args.runs}")
    print("| case | NCHW (baseline) ms | NHWC ms | ratio | max abs output difference |")
    print("|---|---|---|---|---|")
    for name, make, batch in cases:
        data = inputs(batch)
        with torch.no_grad():
            diff = (nhwc(*data) - nchw(*data)).abs().max().item()
        base = median_seconds(make(nchw, data), args.runs, warmup=2)
        fast = median_seconds(make(nhwc, data), args.runs, warmup=2)
        print(f"| {name} | {base * 1e3:.1f} | {fast * 1e3:.1f} | {base / fast:.2f} | {diff:.1e} |")
    if args.autocast:
        autocast_table(nhwc, args)


def train_step(model, batch, autocast: bool = False):
    """One training step's forward and backward (bf16 autocast forward when ``autocast``)."""
    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(*batch)
        out.float().square().mean().backward()
    return run


def cpu_bf16_flags() -> str:
    from lift3d.priors.toyworld.train import BF16_CPU_FLAGS, cpu_flags

    flags = cpu_flags()
    if not flags:
        return "unknown"
    return " ".join(f for f in BF16_CPU_FLAGS if f in flags) or "none"


def autocast_table(model, args) -> None:
    data = inputs(args.train_batch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        lowp = model(*data).float()
    with torch.no_grad():
        diff = ((lowp - model(*data)).norm() / lowp.norm()).item()
    base = median_seconds(train_step(model, data), args.runs, warmup=2)
    fast = median_seconds(train_step(model, data, autocast=True), args.runs, warmup=2)
    print(f"\nbf16 autocast, NHWC, CPU bf16 flags: {cpu_bf16_flags()}")
    print("| case | float32 (baseline) ms | bf16 autocast ms | ratio | relative L2 output difference |")
    print("|---|---|---|---|---|")
    print(f"| train step, batch {args.train_batch} | {base * 1e3:.1f} | {fast * 1e3:.1f} | {base / fast:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
