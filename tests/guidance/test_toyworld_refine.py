"""DreamGaussian's refinement guidance: the target is the render noised then DDIM-denoised by the prior."""

from __future__ import annotations

import pytest
import torch

from lift3d.guidance.toyworld import ToyWorldRefineGuidance
from lift3d.priors.toyworld.data import camera_vector
from lift3d.priors.toyworld.model import ToyWorldPrior
from lift3d.priors.toyworld.vocab import pad_tokens, tokenize
from lift3d.prompts.base import PlainPromptProcessor
from tiny_prior import call, toy_input, weights  # noqa: F401  (weights: the fixture)
from lift3d.registry import find

CAMS = dict(elevation=torch.tensor([10.0, 30.0]), azimuth=torch.tensor([0.0, 90.0]),
            camera_distances=torch.tensor([2.0, 2.1]))


def _inputs(size=16):
    gen = torch.Generator().manual_seed(0)
    rgb = torch.rand(2, size, size, 3, generator=gen).requires_grad_(True)
    noise = torch.randn(2, 3, 16, 16, generator=gen)
    return rgb, noise


def _manual_ddim(weights, rgb, noise, t_start, n, scale, prompt="a red cube"):
    """DDIM (eta 0, v-prediction, x0 clipped, the noise re-derived from the clipped x0) written out
    from the formulas, CFG on the model output; also returns how far each step's x0 overshot."""
    prior = ToyWorldPrior.load(weights).eval()
    from lift3d.priors.toyworld.model import make_scheduler

    ac = make_scheduler(prior.cfg, "ddpm").alphas_cumprod.float()
    ts = [round(t_start * (n - k) / n) for k in range(n)]
    x = rgb.detach().permute(0, 3, 1, 2) * 2 - 1
    x = ac[ts[0]].sqrt() * x + (1 - ac[ts[0]]).sqrt() * noise
    tok = pad_tokens([tokenize(prompt)] * 2)
    cam = camera_vector(CAMS["elevation"], CAMS["azimuth"], CAMS["camera_distances"])
    clipped = []
    with torch.no_grad():
        for k, t in enumerate(ts):
            tt = torch.full((2,), t)
            v_c = prior(x, tt, tok, cam, torch.zeros(2, dtype=torch.bool))
            v_u = prior(x, tt, tok, cam, torch.ones(2, dtype=torch.bool))
            v = v_u + scale * (v_c - v_u)
            a = ac[t]
            x0 = a.sqrt() * x - (1 - a).sqrt() * v
            clipped.append(float((x0.abs() - 1).clamp_min(0).max()))
            x0 = x0.clamp(-1, 1)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()  # the noise implied by the clipped image
            a_prev = ac[ts[k + 1]] if k + 1 < n else torch.tensor(1.0)
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return ((x + 1) / 2).permute(0, 2, 3, 1), ts, clipped


def test_registered_and_timesteps(weights):
    g = find("toyworld-refine-guidance", "guidance")({"pretrained": str(weights), "n_steps": 4})
    assert isinstance(g, ToyWorldRefineGuidance)
    T = g.num_train_timesteps
    assert g.timesteps(0.3) == [round(0.3 * (T - 1) * (4 - k) / 4) for k in range(4)]
    assert g.timesteps(0.0) == []
    assert g.timesteps(0.002) == [2, 1]  # never more steps than timesteps to walk
    with pytest.raises(ValueError, match="n_steps"):
        find("toyworld-refine-guidance")({"pretrained": str(weights), "n_steps": 0})


def test_target_equals_manual_ddim(weights):
    g = ToyWorldRefineGuidance({"pretrained": str(weights), "strength": 0.4, "n_steps": 3, "guidance_scale": 4.0})
    rgb, noise = _inputs()
    out = call(g, rgb, "a red cube", noise=noise, **CAMS)
    expected, ts, clipped = _manual_ddim(weights, rgb, noise, round(0.4 * (g.num_train_timesteps - 1)), 3, 4.0)
    assert int(out["t_start"]) == ts[0]
    # The guided estimate overshoots [-1, 1] before the last step, so the clipping (and the noise
    # re-derived from the clipped image) is what this comparison checks.
    assert max(clipped[:-1]) > 1e-2
    torch.testing.assert_close(out["denoised"], expected, rtol=1e-4, atol=1e-5)
    # The prior moved the image: the target is not the render.
    assert float((out["denoised"] - rgb.detach()).abs().max()) > 1e-2
    # Another guidance scale gives another target (the CFG branch is used).
    g1 = ToyWorldRefineGuidance({"pretrained": str(weights), "strength": 0.4, "n_steps": 3, "guidance_scale": 1.0})
    out2 = call(g1, rgb, "a red cube", noise=noise, **CAMS)
    assert float((out2["denoised"] - out["denoised"]).abs().max()) > 1e-5


def test_strength_zero_gives_the_render(weights):
    g = ToyWorldRefineGuidance({"pretrained": str(weights), "strength": 0.0})
    rgb, noise = _inputs()
    out = call(g, rgb, "a red cube", noise=noise, **CAMS)
    assert torch.equal(out["denoised"], rgb.detach())
    assert out["loss_refine"].item() == 0.0


@pytest.mark.parametrize("size", [16, 24])
def test_gradient_is_mse_to_the_target(weights, size):
    g = ToyWorldRefineGuidance({"pretrained": str(weights), "strength": [0, 0.5, 0.2, 10], "n_steps": 2})
    g.update_step(0, 5)  # the schedule is half way: strength 0.35
    assert g.timesteps(g.C(g.cfg.strength))[0] == round(0.35 * (g.num_train_timesteps - 1))
    rgb, noise = _inputs(size)
    out = call(g, rgb, "a red cube", noise=noise, **CAMS)
    assert out["denoised"].shape == rgb.shape  # resized back to the render's size
    out["loss_refine"].backward()
    expected = 2 * (rgb.detach() - out["denoised"]) / rgb.numel()
    torch.testing.assert_close(rgb.grad, expected)
    assert float(rgb.grad.abs().max()) > 0


def test_errors_name_what_is_missing(weights):
    g = ToyWorldRefineGuidance({"pretrained": str(weights)})
    rgb, _ = _inputs()
    inp = toy_input(rgb, **CAMS)
    inp.prompt = PlainPromptProcessor({"prompt": "a red cube"})()
    with pytest.raises(ValueError, match="toyworld-prompt-processor"):
        g(inp)
