"""The toy-world reference (oracle) guidance: zero loss at the ground truth, gradients towards it."""

from __future__ import annotations

import pytest
import torch

from lift3d import find
from lift3d.config import ConfigError
from lift3d.priors.toyworld.render import render
from lift3d.priors.toyworld.shapes import CATALOGUE, COLOURS
from lift3d.priors.toyworld.vocab import UnknownPromptError
from lift3d.guidance.base import GuidanceInput
from lift3d.prompts.base import PromptUtils
from lift3d.utils.cameras import make_cameras


def batch(n=3, res=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    elev = torch.rand(n, generator=g) * 70 - 10
    azim = torch.rand(n, generator=g) * 360
    dist = torch.rand(n, generator=g) * 0.4 + 1.8
    light = torch.randn(n, 3, generator=g) * 3
    return make_cameras(elev, azim, dist, torch.full((n,), 40.0), res, res, light_positions=light)


def score(g, rgb, prompt, b, opacity=None):
    """The guidance on renders ``rgb`` at the cameras of batch ``b``."""
    return g(GuidanceInput.from_render({"comp_rgb": rgb, "opacity": opacity}, b, prompt=PromptUtils(prompt)))


def guidance(**cfg):
    return find("toyworld-reference-guidance", "guidance")(cfg)


def test_registered_and_config_is_strict():
    g = guidance()
    assert g.cfg.ambient == 0.35 and g.cfg.diffuse == 0.65 and g.cfg.background == 0.0
    with pytest.raises(ConfigError, match="ambiant"):
        guidance(ambiant=0.2)
    with pytest.raises(UnknownPromptError, match="a red sphere"):
        guidance(prompt="a pink sphere")


def test_zero_loss_at_ground_truth_and_matches_renderer():
    b = batch()
    g = guidance()
    gt = g.ground_truth("a snowman", b, 24, 24, torch.zeros(()))
    # Same thing as rendering directly with light = normalize(light_positions).
    direct = render(CATALOGUE["a snowman"], b, torch.nn.functional.normalize(b["light_positions"], dim=-1))
    assert torch.equal(gt["rgb"], direct["rgb"])
    out = score(g, gt["rgb"].clone(), "A snowman", b, opacity=gt["mask"].clone())
    assert out["loss_rgb"].item() == 0.0
    assert out["loss_mask"].item() < 1e-4
    assert out["psnr"].item() >= 90


def test_loss_positive_elsewhere_and_gradient_points_to_ground_truth():
    b = batch(seed=1)
    g = guidance()
    gt = g.ground_truth("a chair", b, 24, 24, torch.zeros(()))["rgb"]
    wrong = g.ground_truth("a mug", b, 24, 24, torch.zeros(()))["rgb"]
    rgb = (0.5 * wrong + 0.5 * torch.rand_like(wrong)).requires_grad_()
    out = score(g, rgb, "a chair", b)
    assert "loss_mask" not in out  # no opacity passed
    assert out["loss_rgb"].item() > 1e-3
    out["loss_rgb"].backward()
    step = -rgb.grad
    assert torch.nn.functional.cosine_similarity(step.flatten(), (gt - rgb.detach()).flatten(), dim=0) > 0.999
    with torch.no_grad():
        moved = rgb - 0.25 * rgb.numel() * rgb.grad
    assert score(g, moved, "a chair", b)["loss_rgb"] < out["loss_rgb"]


def test_mask_loss_prefers_true_silhouette():
    b = batch(seed=2)
    for mode in ("bce", "mse"):
        g = guidance(mask_loss=mode)
        gt = g.ground_truth("a blue torus", b, 24, 24, torch.zeros(()))
        op = torch.full_like(gt["mask"], 0.5).requires_grad_()
        out = score(g, gt["rgb"], "a blue torus", b, opacity=op)
        out["loss_mask"].backward()
        # Descent raises opacity on the silhouette and lowers it off it.
        hit = gt["mask"] > 0.5
        assert (op.grad[hit] < 0).all() and (op.grad[~hit] > 0).all()
        good = score(g, gt["rgb"], "a blue torus", b, opacity=gt["mask"])["loss_mask"]
        assert good < out["loss_mask"]


def test_prompt_override_background_albedo_and_resolution():
    b = batch(n=2, res=16)
    g = guidance(prompt="a red sphere", background=[0.0, 0.0, 1.0], shading="albedo")
    # The rgb's resolution wins over the batch's rays (rays are rebuilt from c2w and fovy).
    gt = g.ground_truth(g._prompt(PromptUtils("a mug")), b, 20, 20, torch.zeros(()))
    hit = gt["mask"][..., 0] > 0
    assert gt["rgb"].shape == (2, 20, 20, 3)
    assert torch.allclose(gt["rgb"][hit], torch.tensor(COLOURS["red"]).expand(int(hit.sum()), 3))
    assert torch.allclose(gt["rgb"][~hit], torch.tensor([0.0, 0.0, 1.0]).expand(int((~hit).sum()), 3))
    out = score(g, gt["rgb"], "a mug", b)  # the override ignores the prompt
    assert out["loss_rgb"].item() == 0.0
    soft = guidance(supersample=2).ground_truth("a red sphere", b, 16, 16, torch.zeros(()))["mask"]
    assert ((soft > 0) & (soft < 1)).any() and soft.shape == (2, 16, 16, 1)


def test_unknown_prompt_at_call_lists_valid_prompts():
    g = guidance()
    with pytest.raises(UnknownPromptError) as exc:
        score(g, torch.zeros(1, 8, 8, 3), "a dragon", batch(n=1, res=8))
    assert "a snowman" in str(exc.value) and "a orange torus" in str(exc.value)
