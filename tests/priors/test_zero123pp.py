"""Zero123++'s pieces on a tiny random model: reference attention, poses, the grid, loading, sampling."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "guidance"))

from lift3d.config import ConfigError  # noqa: E402
from lift3d.priors.zero123pp.attention import ReferenceAttnProcessor, ReferenceState  # noqa: E402
from lift3d.priors.zero123pp.model import (REQUIRED_FILES, load_folder, load_unet_weights, resolve_model,  # noqa: E402
                                           scale_image, scale_latents, unet_key_map, unscale_image,
                                           unscale_latents)
from lift3d.priors.zero123pp.poses import AZIMUTHS, tile, untile, view_cameras  # noqa: E402
from lift3d.priors.zero123pp.sampler import sample_views, timesteps  # noqa: E402
from lift3d.utils.cameras import make_cameras  # noqa: E402
from lift3d.utils.hub import MissingWeightsError  # noqa: E402
from tiny_zero123pp import VIEW_SIZE, make_tiny_zero123pp, tiny_zero123pp  # noqa: E402,F401


@pytest.fixture(scope="module")
def model(tiny_zero123pp):
    return load_folder(tiny_zero123pp)


def _image(seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, 20, 20, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Reference attention


def _attention():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8)
    attn.set_processor(AttnProcessor2_0())
    return attn


def test_reading_a_pass_own_states_equals_attention_over_the_doubled_sequence():
    attn = _attention()
    plain = attn.processor
    state = ReferenceState()
    proc = ReferenceAttnProcessor("layer.attn1.processor", state, plain)
    x = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(1))
    state.mode = "write"
    written = proc(attn, x)
    assert torch.equal(state.cache["layer.attn1.processor"], x)
    state.mode = "read"
    read = proc(attn, x)
    doubled = plain(attn, x, torch.cat([x, x], dim=1))
    torch.testing.assert_close(read, doubled, rtol=1e-5, atol=1e-6)
    # ... which is plain self-attention: every key twice with the same value leaves the softmax average as it was.
    torch.testing.assert_close(read, written, rtol=1e-5, atol=1e-6)
    assert state.cache == {}  # a read consumes the stored states


def test_reading_other_states_attends_to_them_and_changes_the_output():
    attn = _attention()
    state = ReferenceState()
    proc = ReferenceAttnProcessor("a.attn1.processor", state, attn.processor)
    g = torch.Generator().manual_seed(2)
    x, ref = torch.randn(2, 10, 16, generator=g), torch.randn(2, 6, 16, generator=g)
    state.cache["a.attn1.processor"] = ref
    state.mode = "read"
    out = proc(attn, x)
    # By hand: queries from x, keys and values from [x, ref].
    kv = torch.cat([x, ref], 1)
    q, k, v = attn.to_q(x), attn.to_k(kv), attn.to_v(kv)
    split = lambda t: t.view(2, -1, 2, 8).transpose(1, 2)  # noqa: E731
    w = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(8), dim=-1)
    manual = attn.to_out[0]((w @ split(v)).transpose(1, 2).reshape(2, -1, 16))
    torch.testing.assert_close(out, manual, rtol=1e-5, atol=1e-5)
    state.mode = "off"
    assert not torch.allclose(out, proc(attn, x), atol=1e-4)
    state.mode = "read"
    with pytest.raises(RuntimeError, match="nothing stored"):
        proc(attn, x)


def test_the_whole_unet_with_its_own_input_as_reference_is_the_plain_unet(model):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 24, 16, generator=g)
    t = torch.tensor([500, 500])
    states = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        ref_out = model.predict(x, t, states, reference=x)
        model.state.mode = "off"
        plain = model.unet(x, t, encoder_hidden_states=states).sample
        other = model.predict(x, t, states, reference=torch.randn(2, 4, 8, 8, generator=g))
    torch.testing.assert_close(ref_out, plain, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(other, plain, atol=1e-4)
    assert model.state.mode == "off" and not model.state.cache


# ---------------------------------------------------------------------------------------------
# Poses and the grid


def test_pose_tables_in_lifts_world_frame():
    v12 = view_cameras("v1.2")
    assert v12["elevation"].tolist() == [20.0, -10.0] * 3
    assert v12["fovy"].tolist() == [30.0] * 6 and v12["distance"].tolist() == [4.0] * 6
    # azimuths 30 + 60 k from the input view (azimuth 0), wrapped into [-180, 180)
    assert v12["azimuth"].tolist() == [30.0, 90.0, 150.0, -150.0, -90.0, -30.0]
    cams = make_cameras(v12["elevation"], v12["azimuth"], v12["distance"], v12["fovy"], 8, 8)
    pos = cams["c2w"][:, :3, 3]
    e, a = math.radians(20.0), math.radians(30.0)
    torch.testing.assert_close(pos[0], torch.tensor([4 * math.cos(e) * math.cos(a), 4 * math.cos(e) * math.sin(a),
                                                     4 * math.sin(e)]), rtol=1e-5, atol=1e-5)
    # view 1: azimuth 90 is +y, below the equator; the views circle counter-clockwise seen from +z
    assert abs(float(pos[1, 0])) < 1e-5 and pos[1, 1] > 0 and pos[1, 2] < 0
    angles = torch.rad2deg(torch.atan2(pos[:, 1], pos[:, 0])) % 360
    torch.testing.assert_close(angles, torch.tensor(AZIMUTHS), rtol=0, atol=1e-3)
    v11 = view_cameras("v1.1", fovy_deg=40.0, distance=2.5)
    assert v11["elevation"].tolist() == [30.0, -20.0] * 3 and v11["fovy"].tolist() == [40.0] * 6
    assert v11["distance"].tolist() == [2.5] * 6
    with pytest.raises(ValueError, match="no field of view"):
        view_cameras("v1.1")
    with pytest.raises(ValueError, match="unknown Zero123"):
        view_cameras("v2")


def test_tiling_into_a_3x2_grid_and_back_is_exact():
    views = torch.randn(2, 6, 3, 5, 5)
    grid = tile(views)
    assert grid.shape == (2, 3, 15, 10)
    assert torch.equal(untile(grid), views)
    # Row by row: view k at row k // 2, column k % 2.
    marks = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 1, 4, 4)
    g = tile(marks)[0]
    for k in range(6):
        r, c = divmod(k, 2)
        assert torch.all(g[r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] == k)
    with pytest.raises(ValueError):
        untile(torch.zeros(3, 10, 10))


def test_latent_and_image_scaling_round_trip():
    z = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(unscale_latents(scale_latents(z)), z)
    torch.testing.assert_close(unscale_image(scale_image(z)), z)
    assert float(scale_latents(torch.tensor(0.22))) == 0.0  # the shift
    assert float(scale_image(torch.tensor(1.0))) == pytest.approx(0.625)


# ---------------------------------------------------------------------------------------------
# Loading


def test_loader_refuses_a_folder_missing_a_file(tmp_path):
    folder = make_tiny_zero123pp(tmp_path / "zp", drop=("feature_extractor_vae",))
    with pytest.raises(MissingWeightsError, match="feature_extractor_vae/preprocessor_config.json") as info:
        resolve_model(str(folder), "system.guidance.pretrained_model_name_or_path")
    assert "system.guidance.pretrained_model_name_or_path" in str(info.value)
    with pytest.raises(ConfigError, match="lacks feature_extractor_vae"):
        load_folder(folder)


def test_loader_names_the_download_for_an_id_not_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="hf download sudo-ai/zero123plus-v1.2"):
        resolve_model("sudo-ai/zero123plus-v1.2", "system.guidance.pretrained_model_name_or_path")


def test_loader_needs_the_ramping_coefficients(tmp_path):
    folder = make_tiny_zero123pp(tmp_path / "zp")
    index = json.loads((folder / "model_index.json").read_text())
    del index["ramping_coefficients"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="ramping_coefficients"):
        load_folder(folder)
    # A re-saved copy may keep them beside model_index.json instead.
    (folder / "ramping_coefficients.json").write_text(json.dumps([0.5] * 77))
    assert load_folder(folder).ramp.tolist() == [0.5] * 77


def test_the_global_embedding_is_added_with_the_ramp(model):
    cond, uncond = model.encoder_states(_image())
    diff = (cond - uncond)[0]  # [77, D] = ramp[:, None] * embed
    assert torch.all(diff[0] == 0) and model.ramp[0] == 0
    embed = diff[1] / model.ramp[1]
    torch.testing.assert_close(diff, model.ramp[:, None] * embed[None], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("prefix", ["", "unet.", "unet.unet."])
def test_unet_weights_in_every_published_layout(model, tmp_path, prefix):
    from safetensors.torch import save_file

    from lift3d.priors.zero123pp.model import read_tensors

    want = {k: v.clone() for k, v in model.unet.state_dict().items()}
    sd = {prefix + k: v + 1.0 for k, v in want.items()}
    if prefix == "unet.unet.":
        sd["controlnet.conv_in.weight"] = torch.zeros(1)  # the depth wrapper's ControlNet: skipped on purpose
    path = tmp_path / "unet.safetensors"
    save_file(sd, str(path))
    assert len(read_tensors(path)) == len(sd)
    try:
        load_unet_weights(model.unet, path)
        got = model.unet.state_dict()
        assert all(torch.equal(got[k], want[k] + 1.0) for k in want)
    finally:
        model.unet.load_state_dict(want)


def test_unet_key_map_is_checked_both_ways():
    ours = ["conv_in.weight", "conv_in.bias"]
    assert unet_key_map(["unet.conv_in.weight", "unet.conv_in.bias"], ours, "f") == {
        "conv_in.weight": "unet.conv_in.weight", "conv_in.bias": "unet.conv_in.bias"}
    with pytest.raises(ConfigError, match="no rule places"):
        unet_key_map(["conv_in.weight", "conv_in.bias", "extra.weight"], ours, "f")
    with pytest.raises(ConfigError, match="missing: conv_in.bias"):
        unet_key_map(["unet.conv_in.weight"], ours, "f")


def test_the_published_unet_is_a_plain_sd2_unet():
    """The architecture whose keys the published unet/ folder holds: diffusers' UNet2DConditionModel with
    Stable Diffusion 2's config has exactly the 865,910,724 parameters reported for sudo-ai/zero123plus-v1.2's
    unet, so its keys are plain diffusers keys (no wrapper prefix)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=96, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
            use_linear_projection=True, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724
    assert "model_index.json" in REQUIRED_FILES


# ---------------------------------------------------------------------------------------------
# Sampling


def test_trailing_timesteps():
    assert timesteps(1000, 4) == [999, 749, 499, 249]
    assert timesteps(1000, 1) == [999]


@pytest.mark.parametrize("sampler", ["euler_ancestral", "ddim"])
def test_sampler_returns_six_views_deterministically(model, sampler):
    kw = dict(view_size=VIEW_SIZE, steps=2, sampler=sampler)
    a = sample_views(model, _image(), seed=5, **kw)
    b = sample_views(model, _image(), seed=5, **kw)
    c = sample_views(model, _image(), seed=6, **kw)
    assert a.views.shape == (6, 3, VIEW_SIZE, VIEW_SIZE) and a.grid.shape == (3, 3 * VIEW_SIZE, 2 * VIEW_SIZE)
    assert torch.equal(a.views, b.views)
    assert not torch.equal(a.views, c.views)
    assert a.views.min() >= 0 and a.views.max() <= 1
    assert torch.equal(untile(a.grid), a.views)
    assert a.cameras["elevation"].tolist() == [20.0, -10.0] * 3


def test_the_input_image_conditions_the_views(model):
    kw = dict(view_size=VIEW_SIZE, steps=2, seed=1, guidance_scale=3.0)
    a, b = sample_views(model, _image(0), **kw), sample_views(model, _image(1), **kw)
    assert not torch.allclose(a.views, b.views, atol=1e-4)


def test_sample_command_writes_a_views_folder(tiny_zero123pp, tmp_path):
    import imageio.v3 as iio
    import numpy as np

    from lift3d.priors.zero123pp.__main__ import main
    from lift3d.priors.zero123pp.views import read_views

    img = np.zeros((24, 24, 4), dtype=np.uint8)
    img[6:18, 8:16] = [200, 40, 40, 255]
    iio.imwrite(tmp_path / "in.png", img)
    out = tmp_path / "views"
    assert main(["sample", "--image", str(tmp_path / "in.png"), "--out", str(out), "--model", str(tiny_zero123pp),
                 "--steps", "2", "--view-size", str(VIEW_SIZE), "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.glob("view_*.png")) == [f"view_{k:02d}.png" for k in range(6)]
    assert (out / "grid.png").is_file() and (out / "input.png").is_file()
    vs = read_views(out)
    assert vs.rgb.shape == (6, VIEW_SIZE, VIEW_SIZE, 3)
    assert vs.cameras["azimuth"].tolist() == view_cameras("v1.2")["azimuth"].tolist()
    assert vs.record["version"] == "v1.2" and vs.background == (0.5, 0.5, 0.5)
    assert main(["sample", "--image", str(tmp_path / "in.png"), "--out", str(tmp_path / "v11"), "--model",
                 str(tiny_zero123pp), "--version", "v1.1"]) == 2  # v1.1 needs --fovy, refused before loading


def test_euler_ancestral_matches_diffusers_step_for_step(model):
    """Our loop against diffusers' EulerAncestralDiscreteScheduler (trailing spacing, v-prediction: what the
    Zero123++ authors sample with), driven by the same network calls and the same random draws in the same order.
    (diffusers' DDIM steps to t - T / steps rather than to the next trailing timestep, so ours differs from it.)"""
    import math as m

    from diffusers import EulerAncestralDiscreteScheduler

    from lift3d.priors.zero123pp.sampler import sample_latents

    steps, scale, seed, h = 3, 2.0, 4, VIEW_SIZE // 2
    ours = sample_latents(model, _image(), view_size=VIEW_SIZE, steps=steps, guidance_scale=scale,
                          sampler="euler_ancestral", seed=seed)
    sched = EulerAncestralDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                            beta_schedule="linear", prediction_type="v_prediction",
                                            timestep_spacing="trailing")
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    cond, uncond = model.encoder_states(_image())
    ref_c, ref_u = model.reference_latents(_image(), g)
    states, refs = torch.cat([uncond, cond]), torch.cat([ref_u, ref_c])
    x = torch.randn(1, 4, 3 * h, 2 * h, generator=g) * sched.init_noise_sigma
    for t in sched.timesteps:
        a = float(model.alphas_cumprod[int(t)])
        noisy_ref = m.sqrt(a) * refs + m.sqrt(1 - a) * torch.randn(refs.shape, generator=g)
        x_in = sched.scale_model_input(x, t)
        out = model.predict(torch.cat([x_in, x_in]), torch.full((2,), int(t)), states, noisy_ref)
        u, c = out.chunk(2)
        x = sched.step(u + scale * (c - u), t, x, generator=g).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


class _Oracle:
    """A stand-in for the model whose v-prediction always points at one clean latent ``x0``."""

    def __init__(self, model, x0):
        self.m, self.x0 = model, x0
        self.alphas_cumprod, self.prediction_type = model.alphas_cumprod, "v_prediction"
        self.device, self.vae_factor, self.latent_channels = model.device, model.vae_factor, model.latent_channels

    def encoder_states(self, image):
        return self.m.encoder_states(image)

    def reference_latents(self, image, g):
        return self.m.reference_latents(image, g)

    def predict(self, x_t, t, states, reference):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * self.x0) / (1 - a).sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * self.x0


@pytest.mark.parametrize("sampler", ["euler_ancestral", "ddim"])
def test_both_samplers_end_at_the_clean_latent_a_perfect_model_predicts(model, sampler):
    from lift3d.priors.zero123pp.sampler import sample_latents

    x0 = torch.randn(1, 4, 24, 16, generator=torch.Generator().manual_seed(9))
    for seed in (0, 1):
        out = sample_latents(_Oracle(model, x0), _image(), view_size=VIEW_SIZE, steps=4, guidance_scale=3.0,
                             sampler=sampler, seed=seed)
        torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)
