"""The NeRF -> DMTet stage switch keeps the shape: the DMTet built at the switch matches the NeRF's isosurface.

Magic3D switches so from its coarse to its fine stage, and Fantasia3D from its shape to its geometry
stage. The NeRF and the DMTet are configured exactly as in ``configs/tiny/<recipe>.yaml`` (the
top-level geometry, then the first stage's geometry block that names DMTet). The NeRF is first fitted to a toy-world object's occupancy, so the test
covers a real, non-spherical density field (including the snowman's thin nose).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lift3d.config import load_config, resolve
from lift3d.priors.toyworld.metrics import occupancy_grid
from lift3d.priors.toyworld.shapes import get_object
from lift3d.registry import find

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny"


def _recipe(name: str) -> dict:
    raw, _ = load_config(TINY / f"{name}.yaml")
    return resolve(raw)


def _fit_nerf(geo, prompt: str, steps: int = 250) -> None:
    """Regress the NeRF's density to a soft indicator of the object (what SDS shapes it into).

    It rises to 200 inside, about what SDS-trained NeRFs reach: dreamfusion's "a red cube" peaks at
    120 to 850 along the axes and diagonals through its centre. A low peak (20) would put the
    50%-opacity surface that an ``auto`` level finds in the middle of a sub-cell transition, where
    the trained fields measured have theirs near the transition's foot."""
    obj = get_object(prompt)
    peak = 200.0
    thr = geo.cfg.isosurface_threshold
    thr = float(thr) if not isinstance(thr, str) else 1.0
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(geo.parameters(), lr=0.01)
    r = geo.cfg.radius
    for _ in range(steps):
        pts = (torch.rand(8192, 3, generator=g) * 2 - 1) * r
        # the peak deep inside, 0 outside, and the recipe's threshold (1.0 for auto) on the true surface
        target = peak * torch.sigmoid(-obj.sdf(pts) / 0.01 - math.log(peak / thr - 1.0))[:, None]
        loss = torch.nn.functional.mse_loss(torch.log1p(geo.forward_density(pts)), torch.log1p(target))
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("recipe, prompt", [("magic3d", "a red cube"), ("magic3d", "a snowman"),
                                            ("fantasia3d", "a snowman")])
def test_dmtet_after_switch_matches_nerf_isosurface(recipe, prompt):
    cfg = _recipe(recipe)
    coarse = dict(cfg["system"]["geometry"])
    fine_stage = next(s for s in cfg["system"]["stages"] if s.get("geometry_type") == "tetrahedra-sdf-grid")
    assert cfg["system"]["geometry_type"] == "implicit-volume"
    torch.manual_seed(0)
    nerf = find("implicit-volume", "geometry")(coarse)
    _fit_nerf(nerf, prompt)
    with torch.no_grad():
        nerf_mesh = nerf.isosurface()
    dmtet = find("tetrahedra-sdf-grid", "geometry").create_from(nerf, fine_stage["geometry"])
    with torch.no_grad():
        dm_mesh = dmtet.isosurface()
    occ_nerf, _ = occupancy_grid(nerf_mesh.v_pos, nerf_mesh.t_pos_idx, 64, 0.6)
    occ_dm, _ = occupancy_grid(dm_mesh.v_pos, dm_mesh.t_pos_idx, 64, 0.6)
    iou = (occ_nerf & occ_dm).sum().item() / max(1, (occ_nerf | occ_dm).sum().item())
    assert iou >= 0.9, f"{prompt}: DMTet vs NeRF isosurface IoU {iou:.3f}"
    # The fitted NeRF is the object (so the comparison is not between two blobs).
    obj_occ = get_object(prompt).sdf(_grid(64, 0.6)) < 0
    iou_gt = (occ_nerf & obj_occ).sum().item() / (occ_nerf | obj_occ).sum().item()
    assert iou_gt > 0.75, f"{prompt}: fitted NeRF vs object IoU {iou_gt:.3f}"


def _grid(res: int, extent: float) -> torch.Tensor:
    a = torch.linspace(-extent, extent, res, dtype=torch.float64)
    return torch.stack(torch.meshgrid(a, a, a, indexing="ij"), -1)
