"""stable-diffusion-guidance on a tiny random Stable Diffusion (tests/guidance/tiny_sd.py).

The reference values are computed here from the raw diffusers networks (the UNet, the VAE and the
scheduler's alphas), not through the adapter, so a slip in the adapter's encoding, scaling,
resizing or parameterisation shows up as a mismatch.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from lift3d.config import ConfigError
from lift3d.guidance.base import CameraBatch, GuidanceInput
from lift3d.guidance.score_distillation import eps_x0
from lift3d.registry import find
from lift3d.utils.hub import MissingWeightsError
from missing_weights import build_error, empty_hub  # noqa: F401  (fixture)
from tiny_sd import LATENT_SIZE, RESOLUTION, TEXT_DIM, make_tiny_sd, tiny_sd, tiny_sd_v  # noqa: F401  (fixtures)

NAME = "stable-diffusion-guidance"
KEY = "system.guidance.pretrained_model_name_or_path"


def guidance(path, **over):
    return find(NAME, "guidance")({"pretrained_model_name_or_path": str(path), **over}).eval()


def prompt_utils(path, **over):
    cfg = {"prompt": "a red cube", "pretrained_model_name_or_path": str(path), "use_cache": False, **over}
    return find("stable-diffusion-prompt-processor", "prompt-processor")(cfg)()


def make_input(prompt, B=2, size=12, seed=0, **fields):
    g = torch.Generator().manual_seed(seed)
    cams = CameraBatch.from_angles(torch.linspace(0, 30, B), torch.linspace(-150, 150, B))
    rgb = torch.rand(B, size, size, 3, generator=g).requires_grad_(True)
    return GuidanceInput(cameras=cams, rgb=rgb, prompt=prompt, **fields)


def fixed(B=2, channels=4, size=LATENT_SIZE):
    g = torch.Generator().manual_seed(7)
    return torch.tensor([300, 700][:B]), torch.randn(B, channels, size, size, generator=g)


def reference_eps(prior, x_t, t, inp, scale):
    """e_u + s (e_c - e_u) from two separate raw UNet calls, v converted to epsilon by hand."""
    cams = inp.cameras
    cond, uncond = inp.prompt.get_text_embeddings(cams.elevation, cams.azimuth, cams.distance)
    a = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    outs = []
    for text in (cond, uncond):
        out = prior.unet(x_t, t, encoder_hidden_states=text).sample
        if prior.prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1-a) x0
            out = a.sqrt() * out + (1 - a).sqrt() * x_t
        outs.append(out)
    return outs[1] + scale * (outs[0] - outs[1])


def reference_latents(prior, rgb):
    """The render resized to the working resolution, in [-1, 1], VAE posterior mean, scaled."""
    img = F.interpolate(rgb.permute(0, 3, 1, 2), (RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)
    return prior.vae.encode(img * 2 - 1).latent_dist.mean * prior.vae.config.scaling_factor, img


def close(got, want):
    """Equal up to float32 rounding relative to the tensor's scale (batched vs separate UNet calls)."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.fixture(scope="module")
def prompt(tiny_sd):
    return prompt_utils(tiny_sd)


# -- (a) the SDS gradient --------------------------------------------------------------------------


@pytest.mark.parametrize("grad_clip", [None, 0.002])
def test_sds_gradient_is_the_weighted_residual_pulled_back_through_the_encoder(tiny_sd, prompt, grad_clip):
    g = guidance(tiny_sd, guidance_scale=7.5, grad_clip=grad_clip)
    inp = make_input(prompt)
    t, noise = fixed()
    loss = g(inp, t=t, noise=noise).losses["loss_sds"]
    got, = torch.autograd.grad(loss, inp.rgb)

    prior = g.prior
    lat, _ = reference_latents(prior, inp.rgb)
    a = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        x_t = a.sqrt() * lat + (1 - a).sqrt() * noise
        residual = (1 - a) * (reference_eps(prior, x_t, t, inp, 7.5) - noise)
    if grad_clip is not None:
        assert residual.abs().max() > grad_clip  # the clip is active
        residual = residual.clamp(-grad_clip, grad_clip)
    want, = torch.autograd.grad(lat, inp.rgb, grad_outputs=residual / 2)
    assert want.abs().max() > 0
    close(got, want)


def test_grad_clip_follows_its_schedule(tiny_sd, prompt):
    g = guidance(tiny_sd, grad_clip=[0, 1e-4, 1.0, 100])
    t, noise = fixed()
    early = g(make_input(prompt), t=t, noise=noise)["grad_norm"]
    g.update_step(0, 100)
    late = g(make_input(prompt), t=t, noise=noise)["grad_norm"]
    assert early <= 1e-4 * (2 * 4 * LATENT_SIZE**2) ** 0.5 + 1e-9  # every element within the early clip
    assert late > 10 * early


# -- (b) v-prediction -------------------------------------------------------------------------------


def test_v_prediction_is_read_from_the_scheduler_and_converted_to_epsilon(tiny_sd, tiny_sd_v, prompt):
    assert guidance(tiny_sd).prior.prediction_type == "epsilon"
    g = guidance(tiny_sd_v)
    prior = g.prior
    assert prior.prediction_type == "v_prediction"

    # Known tensors: v built from a chosen x0 and epsilon gives them back.
    gen = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    a = prior.alphas_cumprod[torch.tensor([50, 900])]
    sa, so = a.sqrt().view(-1, 1, 1, 1), (1 - a).sqrt().view(-1, 1, 1, 1)
    got_eps, got_x0 = prior.eps_x0(sa * eps - so * x0, sa * x0 + so * eps, a)
    torch.testing.assert_close(got_eps, eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_x0, x0, rtol=1e-5, atol=1e-5)

    # And in the guidance: its guided noise is the hand-converted raw UNet output.
    inp = make_input(prompt)
    t, noise = fixed()
    x, t, noise, a4, x_t, conds = g.noised(inp, t, noise)
    with torch.no_grad():
        got = g.guided(x_t, t, conds, 5.0)
        want = reference_eps(prior, x_t, t, inp, 5.0)
        as_if_epsilon = reference_eps(guidance(tiny_sd).prior, x_t, t, inp, 5.0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(got, as_if_epsilon, atol=1e-3)


@pytest.mark.parametrize("prediction_type", [None, "epsilon", "v_prediction"])
def test_the_scheduler_config_the_real_models_ship_is_read(tiny_sd, tmp_path, prediction_type):
    """SD 1.x/2.x ship a PNDMScheduler config (SD 1.x without a prediction_type: epsilon)."""
    folder = tmp_path / "sd"
    shutil.copytree(tiny_sd, folder)
    cfg = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
           "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1}
    if prediction_type:
        cfg["prediction_type"] = prediction_type
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    prior = guidance(folder).prior
    assert prior.prediction_type == (prediction_type or "epsilon")
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # "scaled_linear"
    torch.testing.assert_close(prior.alphas_cumprod, torch.cumprod(1 - betas, 0).float())


# -- (c) the working resolution ---------------------------------------------------------------------


def test_working_resolution_comes_from_the_model_config(tiny_sd, prompt, tmp_path):
    g = guidance(tiny_sd, return_denoised=True)
    assert g.resolution == (RESOLUTION, RESOLUTION) == (16, 16)
    seen = []
    g.prior.unet.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    out = g(make_input(prompt, size=40))  # larger than the working resolution: shrunk to it
    assert seen == [(LATENT_SIZE, LATENT_SIZE)]
    assert out["denoised"].shape == (2, RESOLUTION, RESOLUTION, 3)

    # Another UNet sample size, same VAE: the resolution follows (never a hard-coded 512).
    other = tmp_path / "sd6"
    shutil.copytree(tiny_sd, other)
    cfg = json.loads((other / "unet" / "config.json").read_text())
    (other / "unet" / "config.json").write_text(json.dumps({**cfg, "sample_size": 6}))
    g6 = guidance(other)
    assert g6.resolution == (12, 12)
    assert g6.prior.encode(torch.rand(1, 64, 64, 3)).shape == (1, 4, 6, 6)


# -- (d) missing weights ----------------------------------------------------------------------------


def test_missing_weights_fail_fast_naming_key_id_and_download_command(empty_hub):
    msg = build_error(NAME)
    assert KEY in msg and "stabilityai/stable-diffusion-2-1-base" in msg
    assert "hf download stabilityai/stable-diffusion-2-1-base" in msg


def test_missing_weights_is_none_for_a_folder_that_holds_them(tiny_sd):
    cls = find(NAME, "guidance")
    assert cls.missing_weights(cls.Config(pretrained_model_name_or_path=str(tiny_sd))) is None


def test_a_folder_without_the_weight_files_says_so(tiny_sd, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd, broken)
    for f in (broken / "unet").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(MissingWeightsError, match="does not load"):
        guidance(broken)


# -- (f) latents mode ------------------------------------------------------------------------------


def _no_vae(prior, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the VAE ran")

    for name in ("encode", "decode", "forward"):
        monkeypatch.setattr(prior.vae, name, refuse)


def test_latents_mode_skips_the_vae(tiny_sd, prompt, monkeypatch):
    g = guidance(tiny_sd, image="latents")
    _no_vae(g.prior, monkeypatch)
    t, noise = fixed()
    lat = torch.randn(2, LATENT_SIZE, LATENT_SIZE, 4).requires_grad_(True)
    inp = make_input(prompt, latents=lat)
    got, = torch.autograd.grad(g(inp, t=t, noise=noise).losses["loss_sds"], lat)
    a = g.prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        x = lat.permute(0, 3, 1, 2)
        x_t = a.sqrt() * x + (1 - a).sqrt() * noise
        want = (1 - a) * (reference_eps(g.prior, x_t, t, inp, g.cfg.guidance_scale) - noise) / 2
    close(got, want.permute(0, 2, 3, 1))


def test_normal_and_mask_as_latents(tiny_sd, prompt, monkeypatch):
    """Fantasia3D's shortcut: (normal in [-1, 1], opacity) as four latent channels, resized to the latent size."""
    cls = find(NAME, "guidance")
    cfg = {"image": "latents", "latents_source": "normal-mask"}
    assert {"normals", "opacity", "prompt_embeddings"} <= cls.requires(cls.Config(**cfg))
    g = guidance(tiny_sd, **cfg)
    _no_vae(g.prior, monkeypatch)
    normal = torch.rand(2, 16, 16, 3).requires_grad_(True)
    opacity = torch.rand(2, 16, 16, 1).requires_grad_(True)
    inp = make_input(prompt, normal=normal, opacity=opacity)
    x = g.scored_image(inp)
    want = F.interpolate(torch.cat([normal * 2 - 1, opacity], -1).permute(0, 3, 1, 2), (8, 8), mode="bilinear",
                         align_corners=False)
    torch.testing.assert_close(x, want)
    gn, go = torch.autograd.grad(g(inp, *fixed()).losses["loss_sds"], [normal, opacity])
    assert gn.abs().sum() > 0 and go.abs().sum() > 0


def test_latents_mode_rejects_the_wrong_channel_count(tiny_sd, prompt):
    g = guidance(tiny_sd, image="latents")
    with pytest.raises(ValueError, match="4-channel"):
        g(make_input(prompt, latents=torch.randn(2, 8, 8, 3)))


# -- HiFA, Perp-Neg, conditioning ------------------------------------------------------------------


def test_hifa_image_loss_pulls_the_render_towards_the_decoded_estimate(tiny_sd, prompt):
    g = guidance(tiny_sd, guidance_scale=7.5, hifa_image_loss=True)
    inp = make_input(prompt)
    t, noise = fixed()
    out = g(inp, t=t, noise=noise)
    assert set(out.losses) == {"loss_sds", "loss_sds_img"}
    got, = torch.autograd.grad(out.losses["loss_sds_img"], inp.rgb)

    prior = g.prior
    lat, img = reference_latents(prior, inp.rgb)
    a = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        x_t = a.sqrt() * lat + (1 - a).sqrt() * noise
        x0 = (x_t - (1 - a).sqrt() * reference_eps(prior, x_t, t, inp, 7.5)) / a.sqrt()
        decoded = (prior.vae.decode(x0 / prior.vae.config.scaling_factor).sample * 0.5 + 0.5).clamp(0, 1)
        residual = (1 - a) * (a / (1 - a)).sqrt() * (img - decoded)
    want, = torch.autograd.grad(img, inp.rgb, grad_outputs=residual / 2)
    close(got, want)
    assert "loss_sds_img" not in guidance(tiny_sd)(make_input(prompt), t=t, noise=noise).losses  # off by default


def test_hifa_needs_an_image(tiny_sd):
    with pytest.raises(ConfigError, match="hifa_image_loss"):
        guidance(tiny_sd, image="latents", hifa_image_loss=True)


def test_perp_neg_scores_the_two_negative_views(tiny_sd):
    u = prompt_utils(tiny_sd, use_perp_neg=True)
    g = guidance(tiny_sd)
    inp = make_input(u)
    conds = g.prior.condition(inp)
    assert len(conds.negatives) == 2 and conds.neg_weights.shape == (2, 2)
    assert all(n["text"].shape == (2, 77, TEXT_DIM) for n in conds.negatives)
    t, noise = fixed()
    with_pn = g(inp, t=t, noise=noise).losses["loss_sds"]
    without = g(make_input(prompt_utils(tiny_sd)), t=t, noise=noise).losses["loss_sds"]
    assert torch.isfinite(with_pn) and not torch.isclose(with_pn, without)


def test_drop_text_swaps_in_the_empty_prompt(tiny_sd, prompt):
    g = guidance(tiny_sd)
    cond = g.prior.condition(make_input(prompt)).cond
    dropped = g.prior.drop_text(cond, torch.tensor([True, False]))
    null = prompt.extras["null_text_embeddings"][0]
    assert torch.equal(dropped["text"][0], null) and torch.equal(dropped["text"][1], cond["text"][1])
    assert not torch.equal(cond["text"][0], null)


def test_embeddings_of_another_width_are_refused_with_the_fix(tiny_sd, prompt):
    g = guidance(tiny_sd)
    from lift3d.prompts.toyworld import ToyWorldPromptProcessor

    with pytest.raises(ValueError, match="stable-diffusion-prompt-processor"):
        g(make_input(ToyWorldPromptProcessor({"prompt": "a red cube"})()))


# -- weights: dtype, options -----------------------------------------------------------------------


def test_weights_dtype_follows_the_device_unless_fixed(tiny_sd, prompt):
    from lift3d.guidance.stable_diffusion import weights_dtype

    assert weights_dtype(None, True, on_cuda=True) == torch.float16
    assert weights_dtype(None, True, on_cuda=False) == torch.float32
    assert weights_dtype(None, False, on_cuda=True) == torch.float32
    assert weights_dtype("bfloat16", True, on_cuda=False) == torch.bfloat16
    assert guidance(tiny_sd).prior.dtype == torch.float32  # on the CPU
    g = guidance(tiny_sd, torch_dtype="bfloat16")
    assert g.prior.dtype == torch.bfloat16 and g.to("cpu").prior.dtype == torch.bfloat16
    out = g(make_input(prompt), *fixed())
    assert out.losses["loss_sds"].dtype == torch.float32 and torch.isfinite(out.losses["loss_sds"])


def test_memory_options_keep_the_result(tiny_sd, prompt):
    t, noise = fixed()
    ref = guidance(tiny_sd)(make_input(prompt), t=t, noise=noise).losses["loss_sds"]
    g = guidance(tiny_sd, enable_attention_slicing=True, enable_channels_last=True)
    assert all("Sliced" in type(p).__name__ for p in g.prior.unet.attn_processors.values())
    assert g.prior.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(g(make_input(prompt), t=t, noise=noise).losses["loss_sds"], ref, rtol=1e-5, atol=0)


def test_compile_unet_compiles_the_unet_in_place(tiny_sd):
    unet = guidance(tiny_sd, compile_unet=True).prior.unet
    assert type(unet).__name__ == "UNet2DConditionModel" and unet._compiled_call_impl is not None
    assert guidance(tiny_sd).prior.unet._compiled_call_impl is None


def test_sequential_offload_keeps_the_result_and_the_weights_where_accelerate_put_them(tiny_sd, prompt):
    from lift3d.guidance.stable_diffusion import offload_to

    t, noise = fixed()
    g = guidance(tiny_sd)
    ref = g(make_input(prompt), t=t, noise=noise).losses["loss_sds"]
    offload_to(g.prior, torch.device("cpu"))  # CUDA in real runs; the hooks are the same
    g.to("cpu")  # must leave the offloaded (meta) weights alone
    assert next(g.prior.unet.parameters()).device.type == "meta"
    torch.testing.assert_close(g(make_input(prompt), t=t, noise=noise).losses["loss_sds"], ref)
    if not torch.cuda.is_available():
        with pytest.warns(RuntimeWarning, match="needs CUDA"):
            assert not guidance(tiny_sd, enable_sequential_cpu_offload=True).prior.offloaded


def test_no_diffusers_until_a_guidance_is_built():
    import subprocess
    import sys

    code = ("import sys; from lift3d.registry import find; cls = find('stable-diffusion-guidance'); "
            "cls.Config(); find('stable-diffusion-prompt-processor'); "
            "print([m for m in ('diffusers', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_real_stable_diffusion_2_1_base_when_it_is_in_the_cache():
    """With the real weights in the Hugging Face cache: 512x512 working resolution, 64x64 latents, a finite SDS loss."""
    cls = find(NAME, "guidance")
    why = cls.missing_weights(cls.Config())
    if why is not None:
        pytest.skip(f"real weights absent: {why[:120]}...")
    g = cls({}).to("cuda" if torch.cuda.is_available() else "cpu")
    assert g.resolution == (512, 512) and g.prior.latent_size == (64, 64) and g.prior.text_dim == 1024
    u = find("stable-diffusion-prompt-processor")({"prompt": "a hamburger"})().to(g.alphas_cumprod.device)
    inp = make_input(u, B=1, size=64)
    inp.rgb = inp.rgb.detach().to(g.alphas_cumprod.device).requires_grad_(True)
    inp.cameras = inp.cameras.to(g.alphas_cumprod.device)
    loss = g(inp).losses["loss_sds"]
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(inp.rgb.grad).all()
