"""Training-step time of a recipe under config variants, measured in one process.

Each variant builds the recipe's system and data as ``launch.py`` does, optionally restores a
checkpoint (so the field is the trained one: an opaque surface prunes differently from the initial
blob), then trains ``--warmup`` untimed and ``--steps`` timed steps. The table gives the median
step time, its ratio to the first variant (the baseline), and the evaluated samples per step when
the renderer reports them. Variants run one after another in this process; run it alone on the
machine.

    python bench/train_step.py [--config configs/tiny/dreamfusion.yaml] \\
        [--resume outputs/.../ckpts/last.ckpt] [--steps 15] [--threads 2] \\
        [--variant base= --variant fast=system.renderer.early_stop_eps=1e-4,...]

Without ``--variant`` it compares the volume renderer's normal schemes (central and forward finite
differences) with and without early ray stopping on the dreamfusion recipe; from scratch the field
is the initial blob, which no ray stops in, so pass ``--resume`` with a trained checkpoint.

``--baseline-repo DIR`` compares code instead of configs: the same recipe (each repo's own copy of
``--config``) runs with the lift3d package of DIR (e.g. ``git worktree add /tmp/base <commit>``) and
with this checkout's, each in a child process, alternating for ``--rounds`` rounds; the table gives
the median step time of each and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if "--child-repo" in sys.argv:  # a child of --baseline-repo: import lift3d from the repo it names
    REPO = Path(sys.argv[sys.argv.index("--child-repo") + 1]).resolve()
sys.path.insert(0, str(REPO))


DEFAULT_VARIANTS = [
    "central=system.geometry.normal_type=finite_difference,system.renderer.early_stop_eps=0",
    "forward_fd=system.geometry.normal_type=finite_difference_forward,system.renderer.early_stop_eps=0",
    "early_stop=system.geometry.normal_type=finite_difference,system.renderer.early_stop_eps=1e-4",
    "both=system.geometry.normal_type=finite_difference_forward,system.renderer.early_stop_eps=1e-4",
]


def run_variant(config: str, overrides: list[str], resume: str | None, warmup: int, steps: int,
                callbacks: list | None = None) -> dict:
    import lightning.pytorch as pl

    from lift3d.launch import load_experiment
    from lift3d.registry import find, load_plugins
    from lift3d.utils.checkpoint import AtomicCheckpointIO

    load_plugins(REPO)
    start = 0
    if resume:
        start = int(torch.load(resume, map_location="cpu", weights_only=True)["global_step"])
    overrides = list(overrides) + [f"trainer.max_steps={start + warmup + steps}", "trainer.val_check_interval=null"]
    cfg, _, prov = load_experiment(config, overrides)
    pl.seed_everything(cfg.seed, verbose=False)
    save = tempfile.TemporaryDirectory(prefix="lift3d-bench-")
    system = find(cfg.system_type, "system")(cfg.system, cfg_key="system", prov=prov, seed=cfg.seed,
                                             save_dir=save.name)
    plan = [(s, dict(st.data)) for s, st in zip(system.stage_starts(), system.cfg.stages)]
    dm = find(cfg.data_type, "data")(cfg.data, cfg_key="data", prov=prov, seed=cfg.seed, stage_plan=plan)

    times: list[float] = []
    samples: list[int] = []

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            times.append(time.perf_counter() - self.t0)

    def count(module, inputs, out):  # samples the field evaluated this step (volume renderers)
        if isinstance(out, dict) and "weights" in out:
            samples.append(int(out["weights"].shape[0]))

    system.renderer.register_forward_hook(count)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=start + warmup + steps, max_epochs=-1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=[Clock(), *(callbacks or [])], plugins=[AtomicCheckpointIO()],
                         inference_mode=False)
    trainer.fit(system, datamodule=dm, ckpt_path=resume, weights_only=True)
    save.cleanup()
    timed = times[warmup:]
    return {"median_s": statistics.median(timed), "mean_s": statistics.fmean(timed),
            "samples": statistics.median(samples[warmup:]) if samples[warmup:] else None}


def compare_code(args: argparse.Namespace) -> None:
    """Median step time of this checkout against ``--baseline-repo``, alternating child processes."""
    import json
    import subprocess

    repos = {"baseline": Path(args.baseline_repo).resolve(), "current": Path(__file__).resolve().parents[1]}
    times: dict[str, list[float]] = {k: [] for k in repos}
    for _ in range(args.rounds):
        for name, repo in repos.items():
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child-repo", str(repo), "--config", args.config,
                   "--warmup", str(args.warmup), "--steps", str(args.steps)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
            line = [x for x in out.stdout.splitlines() if x.startswith("CHILD ")]
            if out.returncode != 0 or not line:
                raise SystemExit(f"{name} run failed:\n{out.stderr[-3000:]}")
            times[name].append(json.loads(line[-1][6:])["median_s"])
    base = statistics.median(times["baseline"])
    print(f"\n{args.config}: median step time over {args.rounds} alternating rounds of {args.steps} steps "
          f"(after {args.warmup}), {args.threads or torch.get_num_threads()} threads")
    print(f"{'code':<10} {'step s':>8} {'x baseline':>11}  rounds (s)  repo")
    for name, repo in repos.items():
        med = statistics.median(times[name])
        print(f"{name:<10} {med:8.4f} {med / base:11.3f}  {' '.join(f'{t:.4f}' for t in times[name])}  {repo}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/tiny/dreamfusion.yaml")
    p.add_argument("--resume", default=None, help="checkpoint to start from (its step is the first trained)")
    p.add_argument("--variant", action="append", default=None,
                   help="NAME=override[,override...]; the first is the baseline ('base=' for none). "
                        "Default: the volume renderer's normal schemes with and without early ray stopping")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--baseline-repo", default=None, help="compare this checkout's code with the one in DIR")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds with --baseline-repo")
    p.add_argument("--child-repo", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.baseline_repo:
        return compare_code(args)
    config = args.config if Path(args.config).exists() else str(REPO / args.config)
    if args.child_repo:
        import json

        r = run_variant(str(REPO / args.config), [], args.resume, args.warmup, args.steps)
        print("CHILD " + json.dumps(r))
        return
    rows = []
    for spec in args.variant or DEFAULT_VARIANTS:
        name, _, rest = spec.partition("=")
        overrides = [o for o in rest.split(",") if o]
        rows.append((name, overrides, run_variant(config, overrides, args.resume, args.warmup, args.steps)))
    base = rows[0][2]["median_s"]
    print(f"\n{args.config}, {'from ' + args.resume if args.resume else 'from scratch'}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps after {args.warmup}")
    print(f"{'variant':<16} {'step s':>8} {'x base':>7} {'samples':>9}  overrides")
    for name, overrides, r in rows:
        smp = f"{r['samples']:9.0f}" if r["samples"] is not None else f"{'-':>9}"
        print(f"{name:<16} {r['median_s']:8.3f} {base / r['median_s']:7.2f} {smp}  {' '.join(overrides) or '-'}")


if __name__ == "__main__":
    main()
