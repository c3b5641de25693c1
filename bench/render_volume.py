"""Volume rendering speed: occupancy pruning on/off, and our compositing vs nerfacc's dense path.

Table 1: rays/s rendering a 64x64 view of an ``implicit-volume`` field (blob initialisation,
hash grid 16 levels / 2^19 table) with ``nerf-volume-renderer``, evaluation (no grad) and training
(forward + backward), without and with occupancy-grid pruning; the speed-up is against the
unpruned row of the same mode, all in this process. Table 2: compositing weights for
[4096 rays, 512 samples] with ``lift3d.renderers.volume.composite_weights`` vs
``nerfacc.render_weight_from_density`` (dense path, runs on CPU), forward and forward+backward,
alternated in this process (``--composite-reps``, 31 by default; the table gives medians and the
range of the per-repetition ratios). Table 1: medians of 5 runs; peak memory is the growth of
peak RSS during the runs (Linux clear_refs/VmHWM) over what the process already holds, so a row
after a hungrier one can read 0.
Timings on a shared machine are indicative only.

    python bench/render_volume.py [--samples 128] [--res 64] [--threads 1] [--composite-reps 31]
    python bench/render_volume.py --prepass configs/tiny/dreamfusion.yaml [--prepass-reps 41] [--threads 1]

``--prepass CONFIG`` times only the early-stop pass's share of a training render on the recipe's
initial blob (with and without ``early_stop_adaptive``; see ``prepass_table``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lift3d.backends import nerfacc_backend
from lift3d.backgrounds.base import BaseBackground
from lift3d.materials.base import BaseMaterial
from lift3d.registry import find
from lift3d.renderers.volume import composite_weights
from lift3d.utils.cameras import make_cameras


class _Sigmoid(BaseMaterial):
    def forward(self, features, **kwargs):
        return torch.sigmoid(features[..., :3])


class _White(BaseBackground):
    def forward(self, dirs):
        return torch.ones_like(dirs)


def _status_kib(field: str) -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def timed(fn, runs: int = 5) -> tuple[float, float]:
    """(median seconds, peak RSS growth in MiB) of ``fn``."""
    fn()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    base = _status_kib("VmRSS")
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), max(0, _status_kib("VmHWM") - base) / 1024.0


def render_table(samples: int, res: int) -> None:
    torch.manual_seed(0)
    geo = find("implicit-volume")({"backend": "torch"})
    cam = make_cameras(torch.tensor([15.0]), torch.tensor([30.0]), torch.tensor([2.5]), torch.tensor([40.0]), res, res)
    n_rays = res * res
    print(f"nerf-volume-renderer, {res}x{res} rays, {samples} samples/ray, implicit-volume (16 levels, 2^19)")
    header = f"{'mode':>6} {'grid_prune':>10} {'rays/s':>10} {'samples run':>12} {'speed-up':>9} {'peak RSS +MiB':>14}"
    print(header)
    print("-" * len(header))
    for mode in ("eval", "train"):
        rows = []
        # Pruned first: peak-RSS growth is measured against memory the process already holds.
        for prune in (True, False):
            r = find("nerf-volume-renderer")(
                {"num_samples_per_ray": samples, "grid_prune": prune, "randomized": mode == "train"},
                geometry=geo, material=_Sigmoid(), background=_White(),
            )
            if prune:
                r.update_step(0, 0)
                frac = r.occupancy.occupied_fraction
            r.train(mode == "train")
            info = {}

            def run():
                if mode == "eval":
                    with torch.no_grad():
                        out = r(**cam)
                else:
                    out = r(**cam)
                    out["comp_rgb"].mean().backward()
                info["n"] = out["weights"].shape[0]

            sec, mem = timed(run)
            rows.append((prune, n_rays / sec, info["n"], mem))
        base_rate = rows[-1][1]
        for prune, rate, n, mem in reversed(rows):
            print(f"{mode:>6} {str(prune):>10} {rate:>10.0f} {n:>12d} {rate / base_rate:>8.2f}x {mem:>14.1f}")
    print(f"(occupied fraction of the grid after one warm-up update: {frac:.3f})\n")


def composite_table(reps: int) -> None:
    """Both implementations timed alternately in this process (the order flips every repetition):
    timed one after the other, a drift of a shared machine between the two blocks reads as a
    speed difference (an earlier sequential run showed 10.4 against 14.4 ms forward; alternated
    the two are at parity)."""
    torch.manual_seed(0)
    R, S = 4096, 512
    t = torch.sort(torch.rand(R, S + 1) * 4.0, dim=-1)[0]
    ts, te = t[:, :-1].contiguous(), t[:, 1:].contiguous()
    sig = torch.rand(R, S) * 10.0
    impls = {"lift3d": lambda s: composite_weights(s, ts, te)}
    if nerfacc_backend.importable():
        impls["nerfacc"] = lambda s: nerfacc_backend.render_weights_dense(ts, te, s)
    print(f"compositing weights, dense [{R}, {S}], median of {reps} alternated repetitions")
    header = f"{'impl':>8} {'fwd ms':>8} {'fwd+bwd ms':>11} {'nerfacc / this, fwd+bwd':>24}"
    print(header)
    print("-" * len(header))

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn(sig)
        return run

    def fwd_bwd(fn):
        def run():
            s = sig.clone().requires_grad_(True)
            fn(s)[0].sum().backward()
        return run

    times = {name: {"fwd": [], "fb": []} for name in impls}
    names = list(impls)
    for name in names:  # warm-up
        fwd(impls[name])()
        fwd_bwd(impls[name])()
    for r in range(reps):
        for name in names if r % 2 == 0 else names[::-1]:
            for kind, make in (("fwd", fwd), ("fb", fwd_bwd)):
                t0 = time.perf_counter()
                make(impls[name])()
                times[name][kind].append(time.perf_counter() - t0)
    med = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in times.items()}
    ref = med.get("nerfacc", med["lift3d"])["fb"]
    for name in names:
        print(f"{name:>8} {med[name]['fwd'] * 1e3:>8.2f} {med[name]['fb'] * 1e3:>11.2f} {ref / med[name]['fb']:>23.2f}x")
    if "nerfacc" in impls:
        per = sorted(b / a for a, b in zip(times["lift3d"]["fb"], times["nerfacc"]["fb"]))
        print(f"nerfacc / lift3d per repetition, fwd+bwd: {per[0]:.2f} to {per[-1]:.2f}")
        diff = (composite_weights(sig, ts, te)[0] - nerfacc_backend.render_weights_dense(ts, te, sig)[0]).abs().max()
        print(f"max |w_lift3d - w_nerfacc| = {float(diff):.2e}")
    else:
        print("nerfacc not installed: no side-by-side row (pip install --no-deps nerfacc)")


def prepass_table(config: str, reps: int) -> None:
    """The early-stop density pass's share of a training render on the recipe's initial blob.

    ``config``'s geometry, material, background and renderer (dreamfusion: 64 bins, occupancy
    pruning, early stop at 1e-4, normals by forward differences), a batch of two 32x32 views,
    forward + backward of the mean colour. On the blob no ray stops, so the pass drops nothing and
    ``early_stop_adaptive`` skips it after backing off: the two rows render the same samples and
    give bit-identical images; their difference is the pass's cost. Alternated in this process.
    """
    from lift3d.launch import load_experiment

    cfg, _, _ = load_experiment(config, [])
    sc = cfg.system
    torch.manual_seed(0)
    geo = find(sc["geometry_type"])(sc["geometry"])
    mat = find(sc["material_type"])(sc.get("material", {}))
    bg = find(sc["background_type"])(sc.get("background", {}))
    cams = make_cameras(torch.tensor([10.0, 30.0]), torch.tensor([0.0, 120.0]), torch.tensor([2.0, 2.2]),
                        torch.tensor([40.0, 40.0]), 32, 32)
    renderers = {}
    for name, extra in (("pass every render (recipe)", {}), ("early_stop_adaptive", {"early_stop_adaptive": True})):
        r = find(sc["renderer_type"])({**sc["renderer"], **extra}, geometry=geo, material=mat, background=bg)
        torch.manual_seed(0)  # the grid update draws points in each cell: the same grid for both
        r.update_step(0, 0)
        r.train()
        renderers[name] = r
    out = {}

    def run(name):
        def fn():
            torch.manual_seed(1)
            geo.zero_grad(set_to_none=True)
            o = renderers[name](**cams)
            o["comp_rgb"].mean().backward()
            out[name] = o["comp_rgb"].detach()
        return fn

    names = list(renderers)
    for n in names:  # warm-up; the adaptive renderer backs off to its longest skip
        for _ in range(40):
            run(n)()
    times = {n: [] for n in names}
    for rep in range(reps):
        for n in names if rep % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            run(n)()
            times[n].append(time.perf_counter() - t0)
    same = torch.equal(out[names[0]], out[names[1]])
    st = renderers[names[1]].early_stop_stats
    base = statistics.median(times[names[0]])
    print(f"\nearly-stop pass on {config}'s initial blob: 2 views of 32x32, training render forward+backward, "
          f"median of {reps} alternated repetitions")
    print(f"{'variant':>28} {'ms':>8} {'speed-up':>9}")
    for n in names:
        med = statistics.median(times[n])
        print(f"{n:>28} {med * 1e3:>8.2f} {base / med:>8.3f}x")
    print(f"images identical: {same}; the adaptive renderer ran the pass {st['runs']} times, skipped it "
          f"{st['skipped']} times (last pass dropped {st['last_drop']:.3f} of the samples)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch default)")
    ap.add_argument("--composite-reps", type=int, default=31, help="alternated repetitions of the compositing table")
    ap.add_argument("--prepass", default=None, metavar="CONFIG",
                    help="only time the early-stop pass on CONFIG's initial field (e.g. configs/tiny/dreamfusion.yaml)")
    ap.add_argument("--prepass-reps", type=int, default=41)
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} torch thread(s); medians of 5 runs, indicative only on a shared machine\n")
    if args.prepass:
        return prepass_table(args.prepass, args.prepass_reps)
    render_table(args.samples, args.res)
    composite_table(args.composite_reps)


if __name__ == "__main__":
    main()
