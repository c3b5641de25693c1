"""NeuS rendering speed: band pruning on/off as the shell sharpens, and the cost of SDF normals.

One table: rays/s rendering a view of an ``implicit-sdf`` field (sphere bias, hash grid 16 levels /
2^19 table) with ``neus-volume-renderer``, evaluation (no grad) and training (forward + backward),
for each normal type (NeuS needs the SDF gradient at every sample: central differences cost six
extra field evaluations, autograd a double backward) and each inverse deviation ``s``, without
and with the ``|sdf| < cell diagonal + margin / s`` occupancy band. The speed-up is against the
unpruned row of the same mode, normals and ``s``. Medians of 5 runs (``timed`` of
``bench/render_volume.py``); timings on a shared machine are indicative only.

    python bench/render_neus.py [--samples 128] [--res 48] [--threads 1]
"""

from __future__ import annotations

import argparse

import torch

from lift3d.registry import find
from lift3d.utils.cameras import make_cameras
from render_volume import _Sigmoid, _White, timed  # the sibling benchmark (run from bench/ or as a script)


def render_table(samples: int, res: int) -> None:
    cam = make_cameras(torch.tensor([15.0]), torch.tensor([30.0]), torch.tensor([2.5]), torch.tensor([40.0]), res, res)
    n_rays = res * res
    print(f"neus-volume-renderer, {res}x{res} rays, {samples} samples/ray, implicit-sdf (16 levels, 2^19, sphere bias)")
    header = (f"{'normals':>17} {'s':>6} {'mode':>6} {'grid_prune':>10} {'occupied':>9} {'rays/s':>9} "
              f"{'samples run':>12} {'speed-up':>9}")
    print(header)
    print("-" * len(header))
    for normal_type in ("finite_difference", "analytic"):
        torch.manual_seed(0)
        geo = find("implicit-sdf")({"backend": "torch", "sdf_bias": "sphere", "normal_type": normal_type})
        for variance in (0.3, 0.6):
            for mode in ("eval", "train"):
                rows = []
                for prune in (True, False):
                    r = find("neus-volume-renderer")(
                        {"num_samples_per_ray": samples, "grid_prune": prune, "randomized": mode == "train",
                         "variance": variance},
                        geometry=geo, material=_Sigmoid(), background=_White(),
                    )
                    r.update_step(0, 0)
                    frac = r.occupancy.occupied_fraction if prune else 1.0
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

                    sec, _ = timed(run)
                    rows.append((prune, frac, n_rays / sec, info["n"]))
                base_rate = rows[-1][2]
                s = float(torch.exp(torch.tensor(10.0 * variance)))
                for prune, frac, rate, n in reversed(rows):
                    print(f"{normal_type:>17} {s:>6.0f} {mode:>6} {str(prune):>10} {frac:>9.3f} {rate:>9.0f} "
                          f"{n:>12d} {rate / base_rate:>8.2f}x")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--res", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch default)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} torch thread(s); medians of 5 runs, indicative only on a shared machine\n")
    render_table(args.samples, args.res)


if __name__ == "__main__":
    main()
