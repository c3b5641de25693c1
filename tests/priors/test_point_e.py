"""Point-E (lift3d.priors.point_e) on the tiny random checkpoints of tests/priors/tiny_point_e.py (original layouts).

Parity with the reference implementation itself is measured by bench/point_e_parity.py (it needs a checkout).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lift3d.config import ConfigError
from lift3d.priors.point_e.checkpoint import (KEY_RULES, PointECheckpointError, load_base_model, load_upsampler_model,
                                              original_to_ours, ours_to_original, to_original_state_dict)
from lift3d.priors.point_e.diffusion import (GaussianKarrasDenoiser, KarrasSettings, PointDiffusionSchedule,
                                             guided, karras_heun_sample, karras_sigmas)
from lift3d.priors.point_e.network import PointDiffusionTransformer, PointTransformerConfig
from lift3d.priors.point_e.prior import PointEPrior, point_e_to_world, world_to_point_e
from lift3d.utils.hub import MissingWeightsError
from tiny_point_e import (COND_DIM, GRID_TOKENS, HEADS, N_CTX, UP_N_CTX, load_kwargs, original_base_state,  # noqa: F401
                          original_upsampler_state, tiny_point_e)


@pytest.fixture(scope="module")
def prior(tiny_point_e):
    return PointEPrior.from_pretrained(tiny_point_e / "base.pt", tiny_point_e / "clip",
                                       upsampler=tiny_point_e / "upsampler.pt", **load_kwargs())


# --- key map ---------------------------------------------------------------------------------------
def test_every_original_key_maps_and_back():
    for sd in (original_base_state(), original_upsampler_state()):
        for key in sd:
            ours = original_to_ours(key)
            assert ours is not None, key
            assert ours_to_original(ours) == key
    assert original_to_ours("backbone.resblocks.11.attn.c_qkv.weight") == "blocks.11.attn.qkv.weight"
    assert original_to_ours("clip_embed.weight") == "cond_proj.weight"
    assert original_to_ours("clip_embed.1.bias") == "grid_proj.bias"
    assert original_to_ours("channel_scales") == "low_res_scales"
    assert original_to_ours("clip.model.logit_scale") is None
    assert len({t for _, t in KEY_RULES}) == len(KEY_RULES)


def test_loaded_weights_are_the_files_and_inverse_map_restores_the_file(tiny_point_e):
    base = load_base_model(tiny_point_e / "base.pt", heads=HEADS, n_ctx=N_CTX)
    orig = original_base_state()
    torch.testing.assert_close(base.blocks[1].attn.qkv.weight, orig["backbone.resblocks.1.attn.c_qkv.weight"])
    torch.testing.assert_close(base.cond_proj.bias, orig["clip_embed.bias"])
    back = to_original_state_dict(base)
    assert set(back) == set(orig)
    for k in orig:
        torch.testing.assert_close(back[k], orig[k])
    assert base.cfg.cond_dim == COND_DIM and base.cfg.layers == 2 and not any(p.requires_grad for p in base.parameters())
    up = load_upsampler_model(tiny_point_e / "upsampler.pt", heads=HEADS, n_ctx=UP_N_CTX, cond_ctx=N_CTX,
                              grid_tokens=GRID_TOKENS)
    assert set(to_original_state_dict(up)) == set(original_upsampler_state())


def test_missing_and_unplaced_keys_are_listed(tmp_path):
    sd = original_base_state()
    del sd["backbone.resblocks.1.mlp.c_fc.bias"]
    sd["clip.model.logit_scale"] = torch.ones(())
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(PointECheckpointError) as err:
        load_base_model(tmp_path / "bad.pt", heads=HEADS)
    msg = str(err.value)
    assert "clip.model.logit_scale" in msg
    assert "blocks.1.mlp.fc1.bias" in msg and "backbone.resblocks.1.mlp.c_fc.bias" in msg
    assert isinstance(err.value, ConfigError)


def test_shape_mismatch_is_named(tmp_path):
    sd = original_base_state()
    sd["ln_post.weight"] = torch.ones(7)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(PointECheckpointError, match="ln_post.weight"):
        load_base_model(tmp_path / "bad.pt", heads=HEADS)


def test_missing_weights_fail_fast_with_where_to_get_them(tmp_path):
    with pytest.raises(MissingWeightsError, match="base_40m_textvec.pt") as err:
        PointEPrior.from_pretrained(tmp_path / "nowhere.pt", None)
    assert "nowhere.pt" in str(err.value) and "openaipublic" in str(err.value)
    with pytest.raises(MissingWeightsError, match="upsample_40m.pt"):
        load_upsampler_model(tmp_path / "up.pt")


def test_text_encoder_refuses_a_missing_path(tmp_path):
    from lift3d.priors.point_e.text import PointETextEncoder

    with pytest.raises(MissingWeightsError, match="no-clip-here"):
        PointETextEncoder.from_pretrained(str(tmp_path / "no-clip-here"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingWeightsError, match="config.json"):
        PointETextEncoder.from_pretrained(str(empty))


def test_safetensors_in_our_layout_loads(tmp_path, tiny_point_e):
    from safetensors.torch import save_file

    base = load_base_model(tiny_point_e / "base.pt", heads=HEADS, n_ctx=N_CTX)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "b.safetensors"))
    again = load_base_model(tmp_path / "b.safetensors", heads=HEADS, n_ctx=N_CTX)
    x, t = torch.randn(1, 6, 8), torch.tensor([5])
    torch.testing.assert_close(again(x, t), base(x, t))


# --- frames ----------------------------------------------------------------------------------------
def test_frame_conversion_on_known_points():
    ours = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.3, -0.2, 0.5]])
    pe = world_to_point_e(ours)
    # our front (+x) is Point-E's front (-y); up stays up; our left (+y) is Point-E's +x
    torch.testing.assert_close(pe[0], torch.tensor([0.0, -1.0, 0.0]))
    torch.testing.assert_close(pe[1], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(pe[2], torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(point_e_to_world(pe), ours)
    m = point_e_to_world(torch.eye(3)).T  # columns: images of Point-E's axes
    assert torch.det(m).item() == pytest.approx(1.0)


def test_prior_frame_switch(prior):
    p = torch.tensor([[1.0, 2.0, 3.0]])
    torch.testing.assert_close(prior.to_point_e_frame(p), torch.tensor([[2.0, -1.0, 3.0]]))
    unrotated = PointEPrior(prior.model, rotate=False)
    torch.testing.assert_close(unrotated.to_point_e_frame(p), p)


# --- schedule ----------------------------------------------------------------------------------------
def test_cosine_schedule_values_at_known_t():
    ab = PointDiffusionSchedule().alphas_cumprod()
    assert ab.shape == (1024,) and ab.dtype == torch.float64

    def f(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    # betas are not clipped in the first half, so alpha_bar telescopes: ab[t] = f((t+1)/T) / f(0)
    for t in (0, 100, 511):
        assert ab[t].item() == pytest.approx(f((t + 1) / 1024) / f(0), rel=1e-12)
    assert 0 < ab[-1].item() < 1e-6 and torch.all(ab[1:] < ab[:-1])


def test_linear_schedule_is_rescaled_to_1024_steps():
    betas = PointDiffusionSchedule(schedule="linear").betas()
    assert betas[0].item() == pytest.approx(1e-4 * 1000 / 1024)
    assert betas[-1].item() == pytest.approx(0.02 * 1000 / 1024)
    with pytest.raises(ValueError, match="cosine"):
        PointDiffusionSchedule(schedule="quadratic").betas()


def test_channel_scaling_maps_colours_to_unit_range_and_back():
    s = PointDiffusionSchedule()
    xyz = torch.tensor([[[0.25, -0.5, 0.1], [0.0, 0.0, 0.0]]])
    rgb = torch.tensor([[[0.0, 1.0, 0.5], [1.0, 1.0, 1.0]]])
    x = s.to_model_space(xyz, rgb)
    assert x.shape == (1, 6, 2)
    torch.testing.assert_close(x[0, :3, 0], torch.tensor([0.5, -1.0, 0.2]))
    torch.testing.assert_close(x[0, 3:, 0], torch.tensor([-1.0, 1.0, 0.0]))
    xyz2, rgb2 = s.from_model_space(x)
    torch.testing.assert_close(xyz2, xyz)
    torch.testing.assert_close(rgb2, rgb)


def test_learned_range_variance_interpolates_between_the_two_bounds():
    s = PointDiffusionSchedule()
    x_t, t = torch.randn(1, 6, 4), torch.tensor([300])
    betas = s.betas()
    ab = s.alphas_cumprod()
    post = betas[300] * (1 - ab[299]) / (1 - ab[300])
    eps = torch.zeros(1, 6, 4)
    lo = s.p_mean_variance(torch.cat([eps, -torch.ones(1, 6, 4)], 1), x_t, t)["log_variance"]
    hi = s.p_mean_variance(torch.cat([eps, torch.ones(1, 6, 4)], 1), x_t, t)["log_variance"]
    torch.testing.assert_close(lo, torch.full_like(lo, math.log(post.item())))
    torch.testing.assert_close(hi, torch.full_like(hi, math.log(betas[300].item())))


def test_sigma_to_t_inverts_the_schedule():
    s = PointDiffusionSchedule()
    den = GaussianKarrasDenoiser(lambda x, t: x, s)
    ab = s.alphas_cumprod()
    assert den.sigma_to_t(1e-6) == 0 and den.sigma_to_t(1e6) == 1023
    for t in (10, 400, 900):
        sigma = math.sqrt(1 / ab[t].item() - 1)
        assert abs(den.sigma_to_t(sigma * 1.0001) - t) <= 1
    sig = karras_sigmas(8, 1e-3, 120.0)
    assert sig.shape == (9,) and sig[0].item() == pytest.approx(120.0, rel=1e-5) and sig[-1] == 0


def test_heun_sampler_returns_the_last_x0_prediction_and_guidance_mixes_x0():
    target = torch.full((1, 6, 5), 0.3)
    out = list(karras_heun_sample(lambda x, s: target.expand_as(x), (1, 6, 5), KarrasSettings(steps=4),
                                  generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(out[-1]["pred_x0"], target)

    def both(x, s):  # conditional half -> 1, unconditional half -> 0
        return torch.cat([torch.ones_like(x[:1]), torch.zeros_like(x[1:])])
    torch.testing.assert_close(guided(both, 3.0)(torch.zeros(1, 6, 5), torch.ones(1)), torch.full((1, 6, 5), 3.0))


# --- network and prior ------------------------------------------------------------------------------
def test_zero_condition_is_the_unconditional_input(prior):
    x, t = torch.randn(2, 6, N_CTX), torch.tensor([3, 700])
    c = prior.encode_text(["a red chair", "a blue car"])
    none = prior.model(x, t, None)
    torch.testing.assert_close(prior.model(x, t, prior.null_cond(2)), none)
    assert (prior.model(x, t, c) - none).abs().max() > 1e-4
    torch.testing.assert_close(prior.null_cond(2), torch.zeros(2, COND_DIM))


def test_predict_eps_is_the_first_half_and_points_are_a_set(prior):
    x, t = torch.randn(1, 6, N_CTX), torch.tensor([50])
    c = prior.encode_text(["a chair"])
    full = prior.model(x, t, c)
    assert full.shape == (1, 12, N_CTX)
    torch.testing.assert_close(prior.predict_eps(x, t, c), full[:, :6])
    perm = torch.randperm(N_CTX)
    torch.testing.assert_close(prior.predict_eps(x[..., perm], t, c), full[:, :6, perm], atol=1e-5, rtol=1e-4)


def test_text_features_are_normalised_and_scaled(prior):
    c = prior.encode_text(["a red chair", "a red chair", "a blue car"])
    assert c.shape == (3, COND_DIM)
    torch.testing.assert_close(c.norm(dim=-1), torch.full((3,), math.sqrt(COND_DIM)))
    torch.testing.assert_close(c[0], c[1])
    assert (c[0] - c[2]).abs().max() > 1e-3
    single = prior.encode_text(["a blue car"])
    torch.testing.assert_close(single[0], c[2], atol=1e-5, rtol=1e-5)


def test_upsampler_without_grid_equals_a_zero_grid(prior):
    up = prior.upsampler
    x, t = torch.randn(1, 6, UP_N_CTX), torch.tensor([20])
    low = torch.cat([torch.rand(1, 3, N_CTX) - 0.5, torch.rand(1, 3, N_CTX) * 255], 1)
    a = up(x, t, low)
    assert a.shape == (1, 12, UP_N_CTX)
    torch.testing.assert_close(a, up(x, t, low, torch.zeros(1, 8, GRID_TOKENS)))
    assert (up(x, t, low * 0.5) - a).abs().max() > 1e-4  # the low-res cloud conditions it


def test_sample_is_seeded_and_in_range(prior):
    a = prior.sample(["a chair"], steps=2, upsampler_steps=2, generator=torch.Generator().manual_seed(1))
    b = prior.sample(["a chair"], steps=2, upsampler_steps=2, generator=torch.Generator().manual_seed(1))
    assert a[0].shape == (1, N_CTX + UP_N_CTX, 3)
    torch.testing.assert_close(a[0], b[0])
    assert a[1].min() >= 0 and a[1].max() <= 1
    assert a[0].abs().max() <= 0.5 + 1e-5  # x0 clamped to [-1, 1] in model space: |xyz| <= 0.5


def test_transformer_config_validates_heads():
    with pytest.raises(ValueError, match="divisible"):
        PointDiffusionTransformer(PointTransformerConfig(width=30, heads=4, layers=1, cond_dim=None))


def test_sample_command_writes_a_readable_ply(tmp_path, tiny_point_e):
    from lift3d.priors.point_e.__main__ import main
    from lift3d.utils.point_cloud_io import read_point_cloud_ply

    out = tmp_path / "cloud.ply"
    rc = main(["sample", "--prompt", "a red chair", "--out", str(out), "--base", str(tiny_point_e / "base.pt"),
               "--upsampler", str(tiny_point_e / "upsampler.pt"), "--clip", str(tiny_point_e / "clip"),
               "--steps", "2", "--seed", "3", "--heads", str(HEADS), "--points", str(N_CTX),
               "--upsampler-points", str(UP_N_CTX)])
    assert rc == 0
    xyz, rgb = read_point_cloud_ply(out)
    assert xyz.shape == (N_CTX + UP_N_CTX, 3) and np.isfinite(xyz).all()
    rc = main(["sample", "--prompt", "x", "--out", str(tmp_path / "b.ply"), "--base", str(tiny_point_e / "base.pt"),
               "--no-upsample", "--clip", str(tiny_point_e / "clip"), "--steps", "2", "--heads", str(HEADS),
               "--points", str(N_CTX)])
    assert rc == 0 and read_point_cloud_ply(tmp_path / "b.ply")[0].shape == (N_CTX, 3)


def test_sample_command_reports_missing_weights(tmp_path, capsys):
    from lift3d.priors.point_e.__main__ import main

    rc = main(["sample", "--prompt", "x", "--out", str(tmp_path / "c.ply"), "--base", str(tmp_path / "none.pt")])
    assert rc == 2
    assert "base_40m_textvec.pt" in capsys.readouterr().err


def test_half_precision_weights_take_float_inputs(tiny_point_e):
    base = load_base_model(tiny_point_e / "base.pt", heads=HEADS, n_ctx=N_CTX)
    half = load_base_model(_as_release_folder(tiny_point_e), heads=HEADS, n_ctx=N_CTX, dtype=torch.bfloat16)  # a folder works too
    x, t, c = torch.randn(1, 6, 8), torch.tensor([7]), torch.randn(1, COND_DIM)
    out = half(x, t, c)
    assert out.dtype == torch.float32
    assert (out - base(x, t, c)).abs().max() < 0.1 * base(x, t, c).abs().max()


def _as_release_folder(tiny):
    """A folder holding the base file under its published name."""
    import shutil

    folder = tiny / "release"
    folder.mkdir(exist_ok=True)
    shutil.copy(tiny / "base.pt", folder / "base_40m_textvec.pt")
    return folder
