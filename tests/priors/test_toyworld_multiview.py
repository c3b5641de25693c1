"""The multi-view toy prior (the toy world's MVDream): joint attention, loading, group data, fine-tuning."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lift3d.config import ConfigError, parse_structured
from lift3d.priors.toyworld.model import DEFAULT_WEIGHTS, MissingWeightsError, ToyWorldPrior, make_scheduler
from lift3d.priors.toyworld.multiview import (MULTIVIEW_META_KEY, JointViewAttnProcessor, MultiViewToyPrior,
                                              attention_layers, sample_groups)
from lift3d.priors.toyworld.multiview_train import (MultiViewDataset, MultiViewTrainConfig, group_azimuths,
                                                    initial_model, load_mv_recipe, multiview_loss,
                                                    sample_group_params, train_multiview)
from lift3d.priors.toyworld.vocab import VOCAB

_TINY = runpy.run_path(str(Path(__file__).resolve().parents[1] / "guidance" / "tiny_toyworld_mv.py"))
TINY_ARCH = {"vocab_size": len(VOCAB), **_TINY["TINY_MV_PRIOR"]}
make_tiny_mv_prior = _TINY["make_tiny_mv_prior"]


def _inputs(B, res=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, res, res, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    tokens = torch.randint(1, len(VOCAB), (B, 3), generator=g)
    cam = torch.randn(B, 4, generator=g)
    return x, t, tokens, cam


def _single_view_twin(mv):
    """A single-view prior (diffusers' own attention processor) holding ``mv``'s weights."""
    sv = ToyWorldPrior(mv.cfg)
    sv.load_state_dict(mv.state_dict())
    return sv.eval()


# ------------------------------------------------------------------------------- joint attention


def _reference_joint_attention(attn, x, f):
    """Plain-torch joint self-attention of a diffusers Attention layer (no SDPA), x [(b f), C, H, W]."""
    Bf, C, H, W = x.shape
    h = attn.group_norm(x).reshape(Bf, C, H * W).transpose(1, 2)  # norm per view
    q, k, v = attn.to_q(h), attn.to_k(h), attn.to_v(h)
    d = C // attn.heads

    def heads(z):  # [(b f), L, C] -> [b, heads, f L, d]
        return z.reshape(Bf // f, f * H * W, attn.heads, d).transpose(1, 2)

    w = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / d**0.5, dim=-1)
    o = (w @ heads(v)).transpose(1, 2).reshape(Bf, H * W, C)
    o = attn.to_out[0](o).transpose(1, 2).reshape(Bf, C, H, W)
    return (o + x) / attn.rescale_output_factor


@pytest.mark.parametrize("f", [1, 2, 4])
def test_joint_processor_matches_a_plain_torch_reference(f):
    mv = make_tiny_mv_prior()
    attn = next(iter(attention_layers(mv.unet).values()))
    x = torch.randn(2 * f, attn.group_norm.num_channels, 4, 4, generator=torch.Generator().manual_seed(f))
    with mv.view_groups(f), torch.no_grad():
        out = attn(x)
        torch.testing.assert_close(out, _reference_joint_attention(attn, x, f), rtol=1e-5, atol=1e-5)


def test_with_groups_of_one_it_is_the_single_view_model_bit_for_bit():
    mv = make_tiny_mv_prior().eval()
    sv = _single_view_twin(mv)
    assert all(type(a.processor).__name__ == "AttnProcessor2_0" for a in attention_layers(sv.unet).values())
    x, t, tok, cam = _inputs(4)
    with torch.no_grad():
        assert torch.equal(mv(x, t, tok, cam, n_views=1), sv(x, t, tok, cam))


def test_a_group_of_identical_views_is_denoised_as_one_view():
    # Exact in exact arithmetic: each key appears f times, so softmax gives each copy 1/f of the
    # single-view weight and the f copies of its value sum back to the single-view output.
    mv = make_tiny_mv_prior().eval()
    sv = _single_view_twin(mv)
    x, t, tok, cam = _inputs(2)
    rep = lambda z: z.repeat_interleave(4, dim=0)  # noqa: E731  two groups of four copies
    with torch.no_grad():
        joint = mv(rep(x), rep(t), rep(tok), rep(cam), n_views=4)
        single = sv(x, t, tok, cam)
    torch.testing.assert_close(joint, rep(single), rtol=1e-4, atol=1e-5)


def test_views_interact_within_their_group_only():
    mv = make_tiny_mv_prior().eval()
    with torch.random.fork_rng(devices=[]):  # the same weights whatever ran before
        torch.manual_seed(0)
        for attn in attention_layers(mv.unet).values():  # attention strong enough to carry a visible signal
            for lin in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
                torch.nn.init.normal_(lin.weight, std=0.5)
    x, t, tok, cam = _inputs(8)
    x2 = x.clone()
    x2[2] += 1.0  # view 2 of group 0
    with torch.no_grad():
        a, b = mv(x, t, tok, cam, n_views=4), mv(x2, t, tok, cam, n_views=4)
        assert (a[[0, 1, 3]] - b[[0, 1, 3]]).abs().max() > 1e-4  # the group's other views see it
        assert torch.equal(a[4:], b[4:])  # the other group does not
        a1, b1 = mv(x, t, tok, cam, n_views=1), mv(x2, t, tok, cam, n_views=1)
        assert torch.equal(a1[[0, 1, 3]], b1[[0, 1, 3]])  # view by view, nothing is shared


def test_batches_must_be_whole_groups():
    mv = make_tiny_mv_prior()
    x, t, tok, cam = _inputs(6)
    with pytest.raises(ValueError, match="groups of n_views=4"):
        mv(x, t, tok, cam)
    mv(x, t, tok, cam, n_views=2)  # three groups of two


def test_without_attention_blocks_the_mid_block_is_made_joint():
    # UNet2DModel's mid block always has self-attention: a config with attention: false keeps that one
    mv = MultiViewToyPrior({**TINY_ARCH, "attention": False})
    assert list(attention_layers(mv.unet)) == ["mid_block.attentions.0"]


def test_sample_groups_denoises_whole_groups():
    mv = make_tiny_mv_prior().eval()
    _, _, tok, cam = _inputs(4)
    img = sample_groups(mv, tok, cam, steps=2, generator=torch.Generator().manual_seed(0))
    assert img.shape == (4, 3, 16, 16) and 0 <= float(img.min()) and float(img.max()) <= 1
    with pytest.raises(ValueError, match="whole groups"):
        sample_groups(mv, tok[:3], cam[:3], steps=2)


# ------------------------------------------------------------------------------- loading and saving


def test_single_view_weights_load_with_no_parameter_added(tmp_path):
    sv = ToyWorldPrior({**TINY_ARCH})
    for p in sv.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = sv.save(tmp_path / "single.safetensors")
    mv = MultiViewToyPrior.from_single_view(path).eval()
    assert {k: v.shape for k, v in mv.state_dict().items()} == {k: v.shape for k, v in sv.state_dict().items()}
    x, t, tok, cam = _inputs(4)
    with torch.no_grad():
        assert torch.equal(mv(x, t, tok, cam, n_views=1), sv.eval()(x, t, tok, cam))
    with pytest.raises(ValueError, match="single-view"):
        MultiViewToyPrior.load(path)  # a single-view file is a starting point, not a multi-view prior


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="shipped toy-world weights absent")
def test_shipped_weights_start_the_multi_view_prior_exactly():
    sv = ToyWorldPrior.load().eval()
    mv = MultiViewToyPrior.from_single_view("shipped").eval()
    layers = attention_layers(mv.unet)
    # the shipped UNet's self-attention, all at its lowest resolution, is what becomes joint
    assert sorted(layers) == ["down_blocks.2.attentions.0", "mid_block.attentions.0", "up_blocks.0.attentions.0",
                              "up_blocks.0.attentions.1"]
    assert all(isinstance(a.processor, JointViewAttnProcessor) for a in layers.values())
    x, t, tok, cam = _inputs(2, res=64)
    with torch.no_grad():
        assert torch.equal(mv(x, t, tok, cam, n_views=1), sv(x, t, tok, cam))
        assert (mv(x[:1].repeat(4, 1, 1, 1), t[:1].repeat(4), tok[:1].repeat(4, 1), cam[:1].repeat(4, 1))
                - sv(x[:1], t[:1], tok[:1], cam[:1])).abs().max() < 1e-4


def test_save_and_load_keep_weights_and_group_size(tmp_path):
    mv = make_tiny_mv_prior(n_views=2).eval()
    path = mv.save(tmp_path / "mv.safetensors", {"note": "x"})
    back = MultiViewToyPrior.load(path).eval()
    assert back.mv_cfg.n_views == 2 and back.cfg == mv.cfg
    assert MULTIVIEW_META_KEY in back.metadata and back.metadata["note"] == "x"
    x, t, tok, cam = _inputs(4)
    with torch.no_grad():
        assert torch.equal(back(x, t, tok, cam), mv(x, t, tok, cam))
    with pytest.raises(MissingWeightsError, match="train-mv"):
        MultiViewToyPrior.load(tmp_path / "absent.safetensors")


# ------------------------------------------------------------------------------- group data


def test_groups_share_elevation_distance_and_are_spread_in_azimuth():
    p = sample_group_params(3, range(6), n_views=4)
    el, az, dist = (p[k].view(6, 4) for k in ("elevation", "azimuth", "distance"))
    assert torch.equal(el, el[:, :1].expand(-1, 4)) and torch.equal(dist, dist[:, :1].expand(-1, 4))
    assert torch.equal(p["prompt_index"].view(6, 4), p["prompt_index"].view(6, 4)[:, :1].expand(-1, 4))
    step = torch.remainder(az.diff(dim=1), 360.0)
    torch.testing.assert_close(step, torch.full_like(step, 90.0), atol=1e-4, rtol=0)
    assert len(set(az[:, 0].round().tolist())) == 6  # a random base per group
    assert float(el.min()) >= -10 and float(el.max()) <= 60 and float(dist.min()) >= 1.8 and float(dist.max()) <= 2.2
    # group i depends on (seed, i) alone
    later = sample_group_params(3, range(2, 4), n_views=4)
    assert torch.equal(later["azimuth"], p["azimuth"][8:16]) and torch.equal(later["light_dirs"], p["light_dirs"][8:16])
    # one light per view in its camera's upper hemisphere, or one for the group
    from lift3d.utils.cameras import make_cameras

    cams = make_cameras(p["elevation"], p["azimuth"], p["distance"], torch.full((24,), 40.0), 1, 1)
    assert bool(((p["light_dirs"] * cams["c2w"][:, :3, 1]).sum(-1) > 0).all())
    shared = sample_group_params(3, range(2), n_views=4, shared_light=True)["light_dirs"].view(2, 4, 3)
    assert torch.equal(shared, shared[:, :1].expand(-1, 4, -1)) and bool((shared[..., 2] >= 0).all())


def test_group_azimuths_match_the_camera_sampler():
    from lift3d.data.random_cameras import RandomCameraConfig, sample_cameras

    cams = sample_cameras(RandomCameraConfig(batch_size=8, n_views=4), step=5, seed=1)
    base = cams["azimuth"].view(2, 4)[:, 0]
    ours = group_azimuths(base, 4)
    torch.testing.assert_close(torch.remainder(ours, 360.0), torch.remainder(cams["azimuth"], 360.0),
                               atol=1e-3, rtol=0)


def test_focus_prompts_take_their_share_of_groups():
    from lift3d.priors.toyworld.shapes import list_prompts

    snow = list_prompts().index("a snowman")
    p = sample_group_params(0, range(200), 4, focus=[snow], focus_fraction=0.5)
    share = float((p["prompt_index"].view(200, 4)[:, 0] == snow).float().mean())
    assert 0.35 < share < 0.65
    with pytest.raises(ConfigError, match="not toy-world prompts"):
        MultiViewDataset(1, num_groups=2, focus_prompts=["a dragon"])


def test_batches_are_whole_groups_of_the_rendered_data(tmp_path):
    from lift3d.priors.toyworld.data import render_params

    ds = MultiViewDataset(groups_per_batch=2, seed=0, num_groups=4, n_views=4, resolution=16,
                          cache_dir=tmp_path, feature_regions=True)
    b = ds.batch(1)
    assert b["image"].shape == (8, 3, 16, 16) and b["feature_region"].shape == (8, 1, 16, 16)
    for key in ("prompt_index", "elevation", "distance"):
        assert torch.equal(b[key].view(2, 4), b[key].view(2, 4)[:, :1].expand(-1, 4)), key
    params = {k: b[k] for k in ("prompt_index", "elevation", "azimuth", "distance", "light_dirs")}
    exact = render_params(params, 16)["image"].permute(0, 3, 1, 2).float() / 255 * 2 - 1
    torch.testing.assert_close(b["image"], exact)
    again = MultiViewDataset(groups_per_batch=2, seed=0, num_groups=4, n_views=4, resolution=16,
                             cache_dir=tmp_path, feature_regions=True)
    assert list(tmp_path.glob("toyworld_mv_*.npz")) and torch.equal(again.batch(1)["image"], b["image"])


# ------------------------------------------------------------------------------- loss and fine-tuning


class _Recorder(torch.nn.Module):
    """Records what the loss passes to the network; predicts zeros."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, tokens, camera, drop, n_views):
        self.seen = (t, drop, n_views)
        return x * self.w


def test_loss_draws_one_timestep_and_one_text_drop_per_group():
    from lift3d.priors.toyworld.model import ToyPriorConfig

    rec = _Recorder(ToyPriorConfig(p_uncond=0.5))
    batch = {"image": torch.zeros(32, 3, 8, 8), "tokens": torch.ones(32, 2, dtype=torch.long),
             "camera": torch.zeros(32, 4)}
    multiview_loss(rec, make_scheduler(rec.cfg), batch, torch.Generator().manual_seed(0), n_views=4)
    t, drop, n = rec.seen
    assert n == 4
    assert torch.equal(t.view(8, 4), t.view(8, 4)[:, :1].expand(-1, 4)) and len(set(t.tolist())) > 1
    assert torch.equal(drop.view(8, 4), drop.view(8, 4)[:, :1].expand(-1, 4)) and 0 < int(drop.sum()) < 32
    with pytest.raises(ValueError, match="whole groups"):
        multiview_loss(rec, make_scheduler(rec.cfg), {**batch, "image": torch.zeros(6, 3, 8, 8)},
                       torch.Generator(), n_views=4)


def _fixed_loss(model, batches):
    sched = make_scheduler(model.cfg)
    with torch.no_grad():
        return sum(float(multiview_loss(model, sched, b, torch.Generator().manual_seed(i), 4))
                   for i, b in enumerate(batches)) / len(batches)


def test_tiny_fine_tune_lowers_the_loss_and_resumes_exactly(tmp_path):
    with torch.random.fork_rng(devices=[]):  # the same start whatever ran before
        torch.manual_seed(0)
        init = ToyWorldPrior({**TINY_ARCH}).save(tmp_path / "single.safetensors")
    base = {"init_from": str(init), "steps": 40, "groups_per_batch": 2, "num_groups": 8, "lr": 2e-3,
            "warmup_steps": 5, "ckpt_every": 20, "log_every": 10, "cache_dir": str(tmp_path / "cache")}
    ds = MultiViewDataset(2, 0, 8, 4, 16, str(tmp_path / "cache"))
    batches = [ds.batch(i) for i in range(4)]
    before = _fixed_loss(MultiViewToyPrior.from_single_view(init), batches)
    final = train_multiview({**base, "out_dir": str(tmp_path / "a")}, progress=False)
    assert final.name == "toyworld-mv.safetensors"
    after = _fixed_loss(MultiViewToyPrior.load(final), batches)
    assert after < 0.8 * before, (before, after)
    partial = train_multiview({**base, "stop_after": 20, "out_dir": str(tmp_path / "b")}, progress=False)
    assert partial.name == "toyworld-mv-step20.safetensors"
    resumed = train_multiview({**base, "out_dir": str(tmp_path / "b")}, progress=False)
    sa, sb = MultiViewToyPrior.load(final).state_dict(), MultiViewToyPrior.load(resumed).state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_train_mv_command_installs_only_a_complete_run(tmp_path, monkeypatch):
    import lift3d.priors.toyworld.multiview as mv_module
    from lift3d.priors.toyworld.__main__ import main

    target = tmp_path / "installed" / "toyworld-mv.safetensors"
    monkeypatch.setattr(mv_module, "DEFAULT_MV_WEIGHTS", target)
    init = ToyWorldPrior({**TINY_ARCH}).save(tmp_path / "single.safetensors")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"description: tiny\ninit_from: {init}\nsteps: 2\ngroups_per_batch: 1\nnum_groups: 2\n"
                      "warmup_steps: 1\n")
    args = ["train-mv", "--recipe", str(recipe), f"out_dir={tmp_path / 'o'}", f"cache_dir={tmp_path / 'c'}"]
    assert main(args + ["stop_after=1", "--install"]) == 0 and not target.exists()
    assert main(args + ["--install"]) == 0 and target.is_file()
    assert MultiViewToyPrior.load(target).metadata["train_steps"] == "2"
    assert main(["train-mv", "--recipe", str(recipe), "no_such_key=1"]) == 2


def test_packaged_recipe_is_a_fine_tune_of_the_shipped_prior_on_groups_of_four():
    cfg = parse_structured(MultiViewTrainConfig, load_mv_recipe())
    assert cfg.init_from == "shipped" and cfg.n_views == 4 and cfg.groups_per_batch >= 1
    assert not Path(cfg.out_dir).is_absolute() and cfg.out_dir.startswith("outputs/")  # outside git (.gitignore)
    with pytest.raises(ConfigError, match="architecture is the file's"):
        initial_model(parse_structured(MultiViewTrainConfig, {"model": {"attention": True}}))
