"""stable-diffusion-refine-guidance on a tiny random Stable Diffusion (tests/guidance/tiny_sd.py).

The target is checked against DDIM written out here from the raw diffusers networks (UNet, VAE,
the scheduler's alphas), with separate conditional and unconditional UNet calls, so a slip in the
adapter or the loop (a clipped latent, a wrong alpha, CFG on the wrong branch, v read as epsilon)
shows up as a mismatch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lift3d.config import ConfigError
from lift3d.guidance.base import CameraBatch, GuidanceInput
from lift3d.registry import find
from lift3d.utils.hub import MissingWeightsError
from tiny_sd import LATENT_CHANNELS, LATENT_SIZE, RESOLUTION, tiny_sd, tiny_sd_v  # noqa: F401  (fixtures)

NAME = "stable-diffusion-refine-guidance"


def guidance(path, **over):
    return find(NAME, "guidance")({"pretrained_model_name_or_path": str(path), **over}).eval()


def prompt_utils(path):
    cfg = {"prompt": "a red cube", "pretrained_model_name_or_path": str(path), "use_cache": False}
    return find("stable-diffusion-prompt-processor", "prompt-processor")(cfg)()


def make_input(prompt, B=2, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    cams = CameraBatch.from_angles(torch.linspace(0, 30, B), torch.linspace(-150, 150, B))
    rgb = torch.rand(B, size, size, 3, generator=g).requires_grad_(True)
    normal = torch.rand(B, size, size, 3, generator=g).requires_grad_(True)
    return GuidanceInput(cameras=cams, rgb=rgb, normal=normal, prompt=prompt)


def latent_noise(B=2, seed=7):
    return torch.randn(B, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(seed))


def manual_target(prior, inp, img, noise, ts, scale, clip=False):
    """DDIM (eta 0) from the formulas on the raw networks; returns the target and the largest |x0|."""
    cams = inp.cameras
    cond, uncond = inp.prompt.get_text_embeddings(cams.elevation, cams.azimuth, cams.distance)
    ac = prior.alphas_cumprod
    x = F.interpolate(img.detach().permute(0, 3, 1, 2), (RESOLUTION, RESOLUTION), mode="bilinear",
                      align_corners=False, antialias=True)
    sf = prior.vae.config.scaling_factor
    largest = 0.0
    with torch.no_grad():
        x = prior.vae.encode(x * 2 - 1).latent_dist.mean * sf
        x = ac[ts[0]].sqrt() * x + (1 - ac[ts[0]]).sqrt() * noise
        for k, t in enumerate(ts):
            tt = torch.full((x.shape[0],), t)
            out_c = prior.unet(x, tt, encoder_hidden_states=cond).sample
            out_u = prior.unet(x, tt, encoder_hidden_states=uncond).sample
            out = out_u + scale * (out_c - out_u)
            a = ac[t]
            if prior.prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1 - a) x0
                eps, x0 = a.sqrt() * out + (1 - a).sqrt() * x, a.sqrt() * x - (1 - a).sqrt() * out
            else:
                eps, x0 = out, (x - (1 - a).sqrt() * out) / a.sqrt()
            largest = max(largest, float(x0.abs().max()))
            if clip:  # what the core loop does for pixel-space priors
                x0 = x0.clamp(-1, 1)
                eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
            a_prev = ac[ts[k + 1]] if k + 1 < len(ts) else torch.tensor(1.0)
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        img_out = (prior.vae.decode(x / sf).sample * 0.5 + 0.5).clamp(0, 1)
        H, W = img.shape[1:3]
        img_out = F.interpolate(img_out, (H, W), mode="bilinear", align_corners=False)
    return img_out.permute(0, 2, 3, 1), largest


def close(got, want):
    """Equal up to float32 rounding (batched vs separate UNet calls), relative to the tensor's scale."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(float(want.abs().max()), 1e-3))


@pytest.fixture(scope="module")
def prompt(tiny_sd):
    return prompt_utils(tiny_sd)


def test_registered_with_dreamgaussian_defaults_and_strict_config(tiny_sd):
    g = guidance(tiny_sd)
    assert type(g).registry_name == NAME and g.prior_family == "stable-diffusion"
    assert (g.cfg.guidance_scale, g.cfg.strength, g.cfg.n_steps) == (100.0, 0.2, 10)
    assert "prompt_embeddings" in type(g).requires(g.cfg)
    assert "normals" in type(g).requires(guidance(tiny_sd, image="normal").cfg)
    T = g.num_train_timesteps
    assert g.timesteps(0.2) == [round(0.2 * (T - 1) * (10 - k) / 10) for k in range(10)]
    with pytest.raises(ConfigError, match="image"):
        guidance(tiny_sd, image="latents")
    with pytest.raises(ValueError, match="n_steps"):
        guidance(tiny_sd, n_steps=0)
    with pytest.raises(ConfigError, match="no_such_option"):
        guidance(tiny_sd, no_such_option=1)


@pytest.mark.parametrize("size", [12, 24])
def test_target_is_the_multi_step_denoised_render_with_latents_left_unclipped(tiny_sd, prompt, size):
    g = guidance(tiny_sd, strength=0.3, n_steps=3, guidance_scale=20.0)
    inp = make_input(prompt, size=size)
    noise = latent_noise()
    out = g(inp, noise=noise)
    ts = g.timesteps(0.3)
    assert len(ts) == 3 and int(out["t_start"]) == ts[0] == round(0.3 * 999)
    want, largest = manual_target(g.prior, inp, inp.rgb, noise, ts, 20.0)
    assert out["denoised"].shape == inp.rgb.shape  # decoded at 16 px, resized back to the render's size
    close(out["denoised"], want)
    # The guided clean latent leaves [-1, 1]: a loop that clipped it would give another target.
    assert largest > 1.5
    clipped, _ = manual_target(g.prior, inp, inp.rgb, noise, ts, 20.0, clip=True)
    assert float((clipped - want).abs().max()) > 1e-3
    # The denoiser changed the image, and the CFG scale matters.
    assert float((out["denoised"] - inp.rgb.detach()).abs().max()) > 1e-2
    other = guidance(tiny_sd, strength=0.3, n_steps=3, guidance_scale=1.0)(inp, noise=noise)["denoised"]
    assert float((other - out["denoised"]).abs().max()) > 1e-4


def test_v_prediction_model_gives_its_own_target(tiny_sd_v):
    prompt = prompt_utils(tiny_sd_v)
    g = guidance(tiny_sd_v, strength=0.25, n_steps=2, guidance_scale=7.5)
    assert g.prior.prediction_type == "v_prediction"
    inp = make_input(prompt)
    noise = latent_noise()
    want, _ = manual_target(g.prior, inp, inp.rgb, noise, g.timesteps(0.25), 7.5)
    close(g(inp, noise=noise)["denoised"], want)


def test_loss_is_the_mse_to_the_target_and_its_gradient_reaches_only_the_render(tiny_sd, prompt):
    g = guidance(tiny_sd, strength=[0, 0.4, 0.1, 10], n_steps=2)
    g.update_step(0, 5)  # half way through the strength schedule: 0.25
    assert g.timesteps(g.C(g.cfg.strength))[0] == round(0.25 * 999)
    inp = make_input(prompt, size=20)
    out = g(inp, noise=latent_noise())
    target = out["denoised"]
    assert not target.requires_grad and target.grad_fn is None
    torch.testing.assert_close(out.losses["loss_refine"], ((inp.rgb.detach() - target) ** 2).mean())
    out.losses["loss_refine"].backward()
    torch.testing.assert_close(inp.rgb.grad, 2 * (inp.rgb.detach() - target) / inp.rgb.numel())
    assert float(inp.rgb.grad.abs().max()) > 0
    assert inp.normal.grad is None  # image: rgb reads the colour render only
    # The denoiser is frozen: no weight trains, none received a gradient, none is in the state dict.
    weights = list(g.prior.unet.parameters()) + list(g.prior.vae.parameters())
    assert weights and all(not p.requires_grad and p.grad is None for p in weights)
    assert not [p for p in g.parameters() if p.requires_grad]
    assert not any(torch.is_tensor(v) for v in g.state_dict().values())


def test_loss_is_zero_when_the_render_is_the_target(tiny_sd, prompt):
    # strength 0: nothing to denoise, the target is the render itself
    g = guidance(tiny_sd, strength=0.0)
    inp = make_input(prompt)
    out = g(inp, noise=latent_noise())
    assert g.timesteps(0.0) == [] and int(out["t_start"]) == 0
    assert torch.equal(out["denoised"], inp.rgb.detach())
    assert out.losses["loss_refine"].item() == 0.0
    out.losses["loss_refine"].backward()
    assert float(inp.rgb.grad.abs().max()) == 0.0

    # with something to denoise, the render is not its own target
    g = guidance(tiny_sd, strength=0.3, n_steps=2)
    assert g(make_input(prompt), noise=latent_noise()).losses["loss_refine"] > 0


def test_deterministic_given_the_noise_and_the_normal_map_on_request(tiny_sd, prompt):
    g = guidance(tiny_sd, strength=0.3, n_steps=2)
    inp = make_input(prompt)
    torch.manual_seed(1)
    a = g(inp, noise=latent_noise())["denoised"]
    torch.manual_seed(2)
    b = g(inp, noise=latent_noise())["denoised"]
    assert torch.equal(a, b)
    c = g(inp, noise=latent_noise(seed=8))["denoised"]
    assert not torch.equal(a, c)

    gn = guidance(tiny_sd, strength=0.3, n_steps=2, image="normal")
    out = gn(inp, noise=latent_noise())
    want, _ = manual_target(gn.prior, inp, inp.normal, latent_noise(), gn.timesteps(0.3), 100.0)
    close(out["denoised"], want)
    out.losses["loss_refine"].backward()
    assert inp.normal.grad is not None and inp.rgb.grad is None


def test_missing_weights_name_the_key(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cls = find(NAME, "guidance")
    with pytest.raises(MissingWeightsError, match="system.guidance.pretrained_model_name_or_path"):
        cls({})
    assert "hf download stabilityai/stable-diffusion-2-1-base" in cls.missing_weights(cls.Config())
