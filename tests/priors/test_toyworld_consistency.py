"""Multi-view consistency from exact toy geometry: correspondences, pairwise PSNR, the ratio to ground truth."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from lift3d.priors.toyworld.consistency import (consistency_ratio, correspondences, evaluate_multiview,
                                                format_group_table, group_cameras, trial_consistency,
                                                turntable_consistency, turntable_groups, view_consistency)
from lift3d.priors.toyworld.render import render
from lift3d.priors.toyworld.shapes import get_object

RES = 48


def _group(el=30.0, base=10.0, n=4, groups=1):
    el_t = torch.full((n * groups,), el)
    az = (base + torch.arange(n * groups) * 360.0 / n)
    return el_t, az, torch.full((n * groups,), 2.0)


def _exact(prompt, el, az, dist, lights=None):
    return render(get_object(prompt), group_cameras(el, az, dist, 40.0, RES), lights)["rgb"]


def test_corresponding_pixels_see_the_same_surface_point():
    el, az, dist = _group()
    cams = group_cameras(el, az, dist, 40.0, RES)
    corr = correspondences("a snowman", cams, 4)
    out = render(get_object("a snowman"), cams, None)
    pts = (cams["rays_o"] + out["depth"] * cams["rays_d"]).reshape(4, -1, 3)
    pixel = 2 * 2.0 * np.tan(np.radians(20)) / RES  # a pixel's footprint at the object's distance
    for i, k in [(0, 1), (1, 0), (2, 3)]:
        m = corr.covisible[i, k].reshape(-1)
        assert int(m.sum()) > 50
        gap = (pts[i][m] - pts[k][corr.target[i, k].reshape(-1)[m]]).norm(dim=-1)
        assert float(gap.median()) < pixel and float(gap.max()) < 4 * pixel


def test_points_hidden_from_the_other_view_are_not_covisible():
    # A sphere seen from opposite sides at the horizon shares no surface point; 90 degrees apart, about a
    # quarter of what a view covers (each camera, at distance 2, sees less than a hemisphere).
    el, az, dist = torch.zeros(4), torch.tensor([0.0, 90.0, 180.0, 270.0]), torch.full((4,), 2.0)
    cams = group_cameras(el, az, dist, 40.0, RES)
    corr = correspondences("a green sphere", cams, 4)
    covered = float((render(get_object("a green sphere"), cams, None)["mask"][0] > 0.5).sum())
    opposite = float(corr.covisible[0, 2].sum()) / covered
    side = float(corr.covisible[0, 1].sum()) / covered
    assert opposite < 0.02 and 0.15 < side < 0.4
    assert not bool(corr.covisible[:, :, :, :].diagonal(dim1=0, dim2=1).any())  # a view is not its own pair


def test_ground_truth_scores_one_and_a_foreign_view_scores_lower():
    el, az, dist = _group(groups=2)
    gt = _exact("a snowman", el, az, dist)
    assert consistency_ratio(gt, "a snowman", el, az, dist).ratio == 1.0
    bad = gt.clone()
    bad[2] = _exact("a blue cube", el[2:3], az[2:3], dist[2:3])[0]
    res = consistency_ratio(bad, "a snowman", el, az, dist)
    assert res.ratio < 0.95
    ref = consistency_ratio(gt, "a snowman", el, az, dist).score.pair_psnr
    untouched = [(0, 1), (1, 0), (0, 3), (3, 0), (1, 3), (3, 1)]
    for i, k in untouched:  # pairs without view 2 keep their score; the other group is untouched
        assert res.score.pair_psnr[0, i, k] == ref[0, i, k]
    torch.testing.assert_close(res.score.pair_psnr[1], ref[1], equal_nan=True)


def test_pixels_no_other_view_sees_do_not_count():
    el, az, dist = _group()
    cams = group_cameras(el, az, dist, 40.0, RES)
    corr = correspondences("a chair", cams, 4)
    gt = _exact("a chair", el, az, dist)
    ref = view_consistency(gt, corr)
    used = ref.used[0]
    assert 0 < int(used.sum()) < int((gt[0].max(-1).values > 0).sum())  # some covered pixels are seen by view 0 only
    noisy = gt.clone()
    noisy[0][~used] = torch.rand(int((~used).sum()), 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(view_consistency(noisy, corr).pair_psnr, ref.pair_psnr, equal_nan=True, rtol=0, atol=0)
    noisy[0][used] = 1.0 - noisy[0][used]
    assert float(view_consistency(noisy, corr).psnr) < ref.psnr - 1.0


def test_chromaticity_removes_the_shading_of_differently_lit_views():
    el, az, dist = _group()
    lit = _exact("a red cube", el, az, dist, torch.tensor([[0.3, 0.2, 1.0]]).expand(4, 3))
    head = _exact("a red cube", el, az, dist)  # a headlight per view: each view lit differently
    corr = correspondences("a red cube", group_cameras(el, az, dist, 40.0, RES), 4)
    for imgs in (lit, head):
        assert view_consistency(imgs, corr, space="chromaticity").psnr > 60  # one albedo: agrees to rounding
    assert view_consistency(head, corr).psnr < view_consistency(head, corr, space="chromaticity").psnr


def test_turntables_are_grouped_into_evenly_spaced_views():
    assert turntable_groups(8, 4).tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    with pytest.raises(ValueError, match="groups of 4"):
        turntable_groups(6, 4)
    from lift3d.utils.cameras import orbit

    frames = render(get_object("a mug"), orbit(8, 20.0, 2.0, 40.0, RES, RES), None)["rgb"]
    assert turntable_consistency(frames, "a mug", 20.0, 2.0).ratio == 1.0
    assert turntable_consistency(frames.roll(1, dims=0), "a mug", 20.0, 2.0).ratio < 0.95  # frames off by one


def test_a_trial_folder_is_scored_from_its_test_turntable(tmp_path):
    from omegaconf import OmegaConf

    from lift3d.utils.cameras import orbit
    from lift3d.utils.io import image_grid, save_image

    trial = tmp_path / "trial"
    (trial / "configs").mkdir(parents=True)
    OmegaConf.save({"prompt": "a snowman", "data": {"eval_height": 32, "eval_width": 32, "eval_elevation_deg": 20,
                                                    "eval_camera_distance": 2.0, "eval_fovy_deg": 40}},
                   trial / "configs" / "parsed.yaml")
    out = render(get_object("a snowman"), orbit(8, 20.0, 2.0, 40.0, 32, 32), None)
    for step, rgb in ((100, out["rgb"].flip(0)), (600, out["rgb"])):  # the latest turntable is the one scored
        for k in range(8):  # frames as the system writes them: rgb | normal | opacity
            panels = [rgb[k].numpy(), out["normal"][k].numpy(), out["mask"][k].expand(-1, -1, 3).numpy()]
            save_image(trial / "save" / f"it{step}-test" / f"{k:03d}.png", image_grid([panels]))
    assert abs(trial_consistency(trial).ratio - 1.0) < 0.02  # 8-bit frames against exact renders
    assert trial_consistency(trial, prompt="a chair").ratio < 0.9


def test_evaluation_of_a_multi_view_prior_prints_a_row_per_prompt():
    tiny = runpy.run_path(str(Path(__file__).resolve().parents[1] / "guidance" / "tiny_toyworld_mv.py"))
    model = tiny["make_tiny_mv_prior"]().eval()
    from lift3d.priors.toyworld.model import ToyWorldPrior

    single = ToyWorldPrior(model.cfg)
    single.load_state_dict(model.state_dict())
    scores = evaluate_multiview(model, ["a snowman", "a red cube"], n_groups=1, steps=2, baseline=single.eval(),
                                min_pixels=3)  # 16x16 images: few co-visible pixels
    assert [s.prompt for s in scores] == ["a snowman", "a red cube"]
    assert scores[0].front_counted >= 0 and scores[1].front_counted == 0
    assert all(s.baseline_ratio is not None and np.isfinite(s.ratio) for s in scores)
    table = format_group_table(scores).splitlines()
    assert len(table) == 4 and table[-1].startswith("mean")
