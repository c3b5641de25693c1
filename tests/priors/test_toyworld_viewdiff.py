"""The toy ViewDiff (lift3d.priors.toyworld.viewdiff): its start, its groups, its files, its fine-tune."""

from __future__ import annotations

import math
import runpy
from pathlib import Path

import pytest
import torch

from lift3d.config import ConfigError, parse_structured
from lift3d.priors.toyworld.data import camera_vector
from lift3d.priors.toyworld.model import DEFAULT_WEIGHTS, MissingWeightsError, ToyWorldPrior, make_scheduler
from lift3d.priors.toyworld.multiview import MULTIVIEW_META_KEY, MultiViewToyPrior, attention_layers
from lift3d.priors.toyworld.multiview_train import MultiViewDataset, load_mv_recipe, multiview_loss
from lift3d.priors.toyworld.viewdiff import (VIEWDIFF_META_KEY, ViewDiffToyPrior, ViewDiffTrainConfig,
                                             initial_viewdiff_model, load_viewdiff_recipe, train_viewdiff)
from lift3d.priors.toyworld.vocab import VOCAB
from lift3d.priors.viewdiff.attention import CrossFrameAttnProcessor

_TINY = runpy.run_path(str(Path(__file__).resolve().parents[1] / "guidance" / "tiny_toyworld_viewdiff.py"))
TINY_ARCH = {"vocab_size": len(VOCAB), **_TINY["TINY_VD_PRIOR"]}
TINY_PARTS = _TINY["TINY_VD_PARTS"]
make_tiny_viewdiff = _TINY["make_tiny_viewdiff"]


def _inputs(B, res=16, seed=0, n_views=4):
    """Noisy images, timesteps, tokens and the cameras of groups of ``n_views`` views 360 / n_views apart."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, res, res, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    tokens = torch.randint(1, len(VOCAB), (B, 3), generator=g)
    groups = B // n_views
    el = (torch.rand(groups, generator=g) * 50).repeat_interleave(n_views)
    az = (torch.rand(groups, generator=g) * 360).repeat_interleave(n_views) + torch.arange(n_views).repeat(groups) * (
        360.0 / n_views)
    dist = (1.8 + 0.4 * torch.rand(groups, generator=g)).repeat_interleave(n_views)
    return x, t, tokens, camera_vector(el, az, dist)


def _single_view_file(tmp_path, seed=0):
    """A random tiny single-view prior (small normal weights everywhere) saved as safetensors."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sv = ToyWorldPrior({**TINY_ARCH})
        for p in sv.parameters():
            torch.nn.init.normal_(p, std=0.05)
    return sv.save(tmp_path / "single.safetensors")


# ------------------------------------------------------------------------------- the start


def test_a_new_start_is_the_single_view_prior_for_one_view_and_the_toy_mvdream_for_groups(tmp_path):
    path = _single_view_file(tmp_path)
    sv = ToyWorldPrior.load(path).eval()
    mv = MultiViewToyPrior.from_single_view(path).eval()
    vd = ViewDiffToyPrior.from_single_view(path, vd_cfg=TINY_PARTS).eval()
    # the network's keys are the single-view file's; the rest is what ViewDiff adds
    assert {k for k in vd.state_dict() if not vd.is_added(k)} == set(sv.state_dict())
    assert sorted(vd.cross_frame) == sorted(n.replace(".", "_") for n in attention_layers(vd.unet))
    assert list(vd.projections) == ["mid_block"]
    for lora in vd.cross_frame.values():
        assert isinstance(lora, CrossFrameAttnProcessor)
        assert all(float(up.weight.detach().abs().max()) == 0 for up in lora.up.values())
    assert float(vd.projections["mid_block"].expand.weight.detach().abs().max()) == 0
    x, t, tok, cam = _inputs(8)
    with torch.no_grad():
        torch.testing.assert_close(vd(x, t, tok, cam, n_views=1), sv(x, t, tok, cam), rtol=0, atol=1e-6)
        torch.testing.assert_close(vd(x, t, tok, cam, n_views=4), mv(x, t, tok, cam, n_views=4), rtol=0, atol=1e-6)


def test_the_new_parts_are_drawn_from_the_seed(tmp_path):
    path = _single_view_file(tmp_path)
    a, b = (ViewDiffToyPrior.from_single_view(path, vd_cfg=TINY_PARTS, seed=3) for _ in range(2))
    c = ViewDiffToyPrior.from_single_view(path, vd_cfg=TINY_PARTS, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if a.is_added(k))


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="shipped toy-world weights absent")
def test_shipped_weights_start_the_toy_viewdiff_exactly():
    sv = ToyWorldPrior.load().eval()
    mv = MultiViewToyPrior.from_single_view("shipped").eval()
    vd = ViewDiffToyPrior.from_single_view("shipped").eval()
    # the LoRA sits on the four attention layers at the lowest resolution, the projection after the mid block
    assert sorted(vd.cross_frame) == ["down_blocks_2_attentions_0", "mid_block_attentions_0",
                                      "up_blocks_0_attentions_0", "up_blocks_0_attentions_1"]
    assert list(vd.projections) == ["mid_block"] and vd.projections["mid_block"].channels == 96
    x, t, tok, cam = _inputs(4, res=64)
    with torch.no_grad():
        torch.testing.assert_close(vd(x, t, tok, cam, n_views=1), sv(x, t, tok, cam), rtol=0, atol=1e-6)
        torch.testing.assert_close(vd(x, t, tok, cam, n_views=4), mv(x, t, tok, cam, n_views=4), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------- groups of views


def test_every_added_part_is_live_once_trained():
    vd = make_tiny_viewdiff(std=0.2).eval()  # every weight random, the zero-initialised ones included
    x, t, tok, cam = _inputs(8)
    out = vd(x, t, tok, cam, n_views=4)
    out.square().mean().backward()
    for name, p in vd.added_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    with torch.no_grad():
        lora = vd.cross_frame["mid_block_attentions_0"]
        for part in (vd.projections["mid_block"].expand.weight, lora.up["v"].weight):
            before = vd(x, t, tok, cam, n_views=4)
            part.zero_()
            assert (vd(x, t, tok, cam, n_views=4) - before).abs().max() > 1e-5


def test_every_lora_gets_each_view_s_condition():
    vd = make_tiny_viewdiff().eval()
    x, t, tok, cam = _inputs(8)
    seen = []
    for lora in vd.cross_frame.values():
        def record(view_cond, n, like, _orig=lora.modulation):
            seen.append(view_cond.clone())
            return _orig(view_cond, n, like)
        lora.modulation = record
    with torch.no_grad():
        vd(x, t, tok, cam, n_views=4)
    expected = vd.view_cameras(cam, 4)[2]
    assert len(seen) == len(vd.cross_frame) and all(torch.equal(c, expected) for c in seen)
    assert vd._views.view_cond is None and vd._views.c2w is None  # nothing is left behind after the call


def test_a_group_of_identical_views_is_denoised_as_one_view():
    # Joint attention over f copies gives each copy's key 1/f of the weight, and the projection's
    # volume is the same mean over identical views, seen by all of them: the group is one view.
    vd = make_tiny_viewdiff().eval()
    x, t, tok, cam = _inputs(2, n_views=1)
    rep = lambda z: z.repeat_interleave(4, dim=0)  # noqa: E731  two groups of four copies
    with torch.no_grad():
        joint = vd(rep(x), rep(t), rep(tok), rep(cam), n_views=4)
        single = vd(x, t, tok, cam, n_views=1)
    torch.testing.assert_close(joint, rep(single), rtol=1e-4, atol=1e-5)


def test_views_interact_within_their_group_only():
    vd = make_tiny_viewdiff(std=0.2).eval()
    x, t, tok, cam = _inputs(8)
    x2 = x.clone()
    x2[2] += 1.0  # view 2 of group 0
    with torch.no_grad():
        a, b = vd(x, t, tok, cam, n_views=4), vd(x2, t, tok, cam, n_views=4)
        assert (a[[0, 1, 3]] - b[[0, 1, 3]]).abs().max() > 1e-4  # the group's other views see it
        assert torch.equal(a[4:], b[4:])  # the other group does not
        a1, b1 = vd(x, t, tok, cam, n_views=1), vd(x2, t, tok, cam, n_views=1)
        assert torch.equal(a1[[0, 1, 3]], b1[[0, 1, 3]])  # view by view, nothing is shared
    with pytest.raises(ValueError, match="groups of n_views=4"):
        vd(x[:6], t[:6], tok[:6], cam[:6])


def test_a_deep_copy_runs_on_its_own_parts():
    # the training loop's EMA is a deep copy: its attention processors and projection hook must use its own modules
    import copy

    vd = make_tiny_viewdiff(std=0.2).eval()
    twin = copy.deepcopy(vd)
    x, t, tok, cam = _inputs(4)
    with torch.no_grad():
        before = vd(x, t, tok, cam)
        twin.projections["mid_block"].expand.weight.zero_()
        for lora in twin.cross_frame.values():
            lora.up["v"].weight.zero_()
        assert torch.equal(vd(x, t, tok, cam), before)
        assert (twin(x, t, tok, cam) - before).abs().max() > 1e-5


def test_the_toy_camera_becomes_the_renderer_s_pose_and_viewdiff_s_relative_condition():
    from lift3d.utils.cameras import make_cameras

    vd = make_tiny_viewdiff()
    el, az, dist = torch.tensor([10.0, 10, 10, 10]), torch.tensor([30.0, 120, 210, 300]), torch.full((4,), 2.1)
    c2w, K, cond = vd.view_cameras(camera_vector(el, az, dist), n_views=4)
    ref = make_cameras(el, az, dist, torch.full((4,), 40.0), 16, 16)["c2w"]
    torch.testing.assert_close(c2w, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(K[:, 1, 1], torch.full((4,), 0.5 / math.tan(math.radians(20))))
    rel = torch.deg2rad(torch.tensor([0.0, 90, 180, 270]))
    torch.testing.assert_close(cond[:, 1:3], torch.stack([rel.sin(), rel.cos()], -1), rtol=0, atol=1e-5)
    torch.testing.assert_close(cond[:, 3], dist, rtol=0, atol=1e-5)
    assert float(cond[:, 0].abs().max()) < 1e-6  # the group's elevation
    assert float(cond[:, 8].abs().max()) == 0  # the neutral intensity


def test_projection_sites_are_checked():
    with pytest.raises(ConfigError, match="never the first or last"):
        ViewDiffToyPrior({**TINY_ARCH}, {}, {**TINY_PARTS, "projection_after": ["up_blocks.1"]})
    both = ViewDiffToyPrior({**TINY_ARCH}, {}, {**TINY_PARTS, "projection_after": ["mid_block", "up_blocks.0"]})
    assert sorted(both.projections) == ["mid_block", "up_blocks_0"]


# ------------------------------------------------------------------------------- files


def test_save_and_load_keep_weights_and_configs(tmp_path):
    vd = make_tiny_viewdiff(n_views=2).eval()
    path = vd.save(tmp_path / "vd.safetensors", {"note": "x"})
    back = ViewDiffToyPrior.load(path).eval()
    assert back.mv_cfg.n_views == 2 and back.cfg == vd.cfg and back.vd_cfg == vd.vd_cfg
    assert {VIEWDIFF_META_KEY, MULTIVIEW_META_KEY} <= set(back.metadata) and back.metadata["note"] == "x"
    x, t, tok, cam = _inputs(4, n_views=2)
    with torch.no_grad():
        assert torch.equal(back(x, t, tok, cam), vd(x, t, tok, cam))
    with pytest.raises(MissingWeightsError, match="train-viewdiff"):
        ViewDiffToyPrior.load(tmp_path / "absent.safetensors")


def test_files_without_viewdiff_layers_are_refused(tmp_path):
    single = _single_view_file(tmp_path)
    with pytest.raises(ValueError, match="single-view toy-world prior without ViewDiff"):
        ViewDiffToyPrior.load(single)
    mv = MultiViewToyPrior.from_single_view(single).save(tmp_path / "mv.safetensors")
    with pytest.raises(ValueError, match="multi-view"):
        ViewDiffToyPrior.load(mv)
    ViewDiffToyPrior.from_single_view(mv, vd_cfg=TINY_PARTS)  # either is a starting point


# ------------------------------------------------------------------------------- fine-tuning


def _fixed_loss(model, batches):
    sched = make_scheduler(model.cfg)
    with torch.no_grad():
        return sum(float(multiview_loss(model, sched, b, torch.Generator().manual_seed(i), 4))
                   for i, b in enumerate(batches)) / len(batches)


def test_tiny_fine_tune_lowers_the_loss_and_resumes_exactly(tmp_path):
    with torch.random.fork_rng(devices=[]):  # the same start whatever ran before
        torch.manual_seed(0)
        init = ToyWorldPrior({**TINY_ARCH}).save(tmp_path / "single.safetensors")
    base = {"init_from": str(init), "viewdiff": TINY_PARTS, "steps": 40, "groups_per_batch": 2, "num_groups": 8,
            "lr": 2e-3, "warmup_steps": 5, "ckpt_every": 20, "log_every": 10, "cache_dir": str(tmp_path / "cache")}
    ds = MultiViewDataset(2, 0, 8, 4, 16, str(tmp_path / "cache"))
    batches = [ds.batch(i) for i in range(4)]
    before = _fixed_loss(ViewDiffToyPrior.from_single_view(init, vd_cfg=TINY_PARTS), batches)
    final = train_viewdiff({**base, "out_dir": str(tmp_path / "a")}, progress=False)
    assert final.name == "toyworld-viewdiff.safetensors"
    trained = ViewDiffToyPrior.load(final)
    after = _fixed_loss(trained, batches)
    assert after < 0.8 * before, (before, after)
    assert any(float(p.detach().abs().max()) > 0 for lora in trained.cross_frame.values() for p in lora.up.parameters())
    partial = train_viewdiff({**base, "stop_after": 20, "out_dir": str(tmp_path / "b")}, progress=False)
    assert partial.name == "toyworld-viewdiff-step20.safetensors"
    resumed = train_viewdiff({**base, "out_dir": str(tmp_path / "b")}, progress=False)
    sa, sb = trained.state_dict(), ViewDiffToyPrior.load(resumed).state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_without_train_unet_only_the_added_parts_move(tmp_path):
    init = _single_view_file(tmp_path)
    final = train_viewdiff({"init_from": str(init), "viewdiff": TINY_PARTS, "train_unet": False, "steps": 3,
                            "groups_per_batch": 1, "num_groups": 2, "warmup_steps": 1, "lr": 1e-2,
                            "cache_dir": str(tmp_path / "cache"), "out_dir": str(tmp_path / "o")}, progress=False)
    start, end = ToyWorldPrior.load(init).state_dict(), ViewDiffToyPrior.load(final)
    assert end.metadata["train_unet"] == "False"
    for k, v in end.state_dict().items():
        if end.is_added(k):
            continue
        assert torch.equal(v, start[k]), k
    assert any(float(lora.up["q"].weight.detach().abs().max()) > 0 for lora in end.cross_frame.values())


def test_a_toy_viewdiff_file_continues_with_its_own_parts(tmp_path):
    path = make_tiny_viewdiff(n_views=2).save(tmp_path / "vd.safetensors")
    model = initial_viewdiff_model(parse_structured(ViewDiffTrainConfig, {"init_from": str(path)}))
    assert model.mv_cfg.n_views == 4 and model.vd_cfg.grid_size == TINY_PARTS["grid_size"]
    same = {"init_from": str(path),
            "viewdiff": {"lora_rank": TINY_PARTS["lora_rank"], "projection_after": ["mid_block"]}}
    initial_viewdiff_model(parse_structured(ViewDiffTrainConfig, same))  # a recipe that names the file's parts
    with pytest.raises(ConfigError, match="asks for {'lora_rank': 8}"):
        initial_viewdiff_model(parse_structured(ViewDiffTrainConfig, {"init_from": str(path),
                                                                       "viewdiff": {"lora_rank": 8}}))
    with pytest.raises(ConfigError, match="architecture is the file's"):
        initial_viewdiff_model(parse_structured(ViewDiffTrainConfig, {"model": {"attention": True}}))


def test_train_viewdiff_command_installs_only_a_complete_run(tmp_path, monkeypatch):
    import lift3d.priors.toyworld.viewdiff as vd_module
    from lift3d.priors.toyworld.__main__ import main

    target = tmp_path / "installed" / "toyworld-viewdiff.safetensors"
    monkeypatch.setattr(vd_module, "DEFAULT_VIEWDIFF_WEIGHTS", target)
    init = _single_view_file(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"description: tiny\ninit_from: {init}\nsteps: 2\ngroups_per_batch: 1\nnum_groups: 2\n"
                      "warmup_steps: 1\nviewdiff: {grid_size: 4, n_samples: 4, proj_channels: 4, proj_hidden: 8}\n")
    args = ["train-viewdiff", "--recipe", str(recipe), f"out_dir={tmp_path / 'o'}", f"cache_dir={tmp_path / 'c'}"]
    assert main(args + ["stop_after=1", "--install"]) == 0 and not target.exists()
    assert main(args + ["--install"]) == 0 and target.is_file()
    assert ViewDiffToyPrior.load(target).metadata["train_steps"] == "2"
    assert main(["train-viewdiff", "--recipe", str(recipe), "no_such_key=1"]) == 2


def test_packaged_recipe_fine_tunes_the_shipped_prior_on_the_toy_mvdream_s_data():
    cfg = parse_structured(ViewDiffTrainConfig, load_viewdiff_recipe())
    mv = parse_structured(ViewDiffTrainConfig, load_mv_recipe())
    assert cfg.init_from == "shipped" and cfg.n_views == 4 and cfg.autocast == "bf16"
    for key in ("seed", "n_views", "groups_per_batch", "num_groups", "focus_prompts", "focus_fraction",
                "shared_light", "feature_weight"):  # the same groups: the same cached renders
        assert getattr(cfg, key) == getattr(mv, key), key
    assert not Path(cfg.out_dir).is_absolute() and cfg.out_dir.startswith("outputs/") and cfg.out_dir != mv.out_dir
    assert ViewDiffToyPrior({**TINY_ARCH}, {}, cfg.viewdiff).vd_cfg.projection_after == ["mid_block"]
