"""toyworld-point-e-guidance: point-e-guidance with the toy point-cloud prior swapped in (tiny random weights)."""

from __future__ import annotations

import pytest
import torch

from lift3d.config import ConfigError
from lift3d.guidance.base import CameraBatch, GuidanceInput
from lift3d.priors.toyworld.points import POINTS_TRAIN_COMMAND, ToyPointPrior, sample_points
from lift3d.priors.toyworld.vocab import UnknownPromptError
from lift3d.registry import find
from lift3d.utils.cameras import make_cameras
from lift3d.utils.hub import MissingWeightsError
from lift3d.utils.point_sampling import farthest_point_sample
from tiny_toyworld_points import TINY_POINTS, toyworld_points_weights  # noqa: F401  (fixture)

NAME = "toyworld-point-e-guidance"


def build(weights, **over):
    return find(NAME, "guidance")({"pretrained": str(weights), **over}).eval()


def make_input(prompt: str = "a red cube", n: int = 80, seed: int = 0) -> GuidanceInput:
    g = torch.Generator().manual_seed(seed)
    cams = make_cameras(torch.zeros(1), torch.zeros(1), torch.full((1,), 2.0), torch.full((1,), 40.0), 8, 8)
    pts = ((torch.rand(n, 3, generator=g) - 0.5) * 1.2).requires_grad_(True)
    cols = torch.rand(n, 3, generator=g).requires_grad_(True)
    prompt_utils = find("toyworld-prompt-processor")({"prompt": prompt})()
    return GuidanceInput(cameras=CameraBatch.from_batch(cams), prompt=prompt_utils, points=pts, point_colors=cols)


def test_builds_on_the_toy_prior(toyworld_points_weights):
    g = build(toyworld_points_weights)
    assert isinstance(g.prior, ToyPointPrior)
    assert g.n_points == TINY_POINTS["n_ctx"] and g.num_train_timesteps == 1024
    assert g.requires(g.cfg) == frozenset({"points"})
    assert g.prior_family == "toyworld-points"
    assert not any(p.requires_grad for p in g.prior.parameters())


def test_missing_weights_name_the_key_and_the_train_command(tmp_path):
    cls = find(NAME, "guidance")
    absent = str(tmp_path / "absent.safetensors")
    msg = cls.missing_weights(cls.Config(pretrained=absent))
    assert msg is not None and POINTS_TRAIN_COMMAND in msg and "system.guidance.pretrained" in msg and absent in msg
    with pytest.raises(MissingWeightsError) as info:
        cls({"pretrained": absent})
    assert str(info.value) == msg
    default = cls.weights_path(cls.Config())
    assert default.name == "toyworld-points.safetensors" and default.parent.name == "weights"


def test_real_point_e_keys_and_the_point_e_frame_are_refused(toyworld_points_weights):
    with pytest.raises(ConfigError, match="clip_model_name_or_path"):
        build(toyworld_points_weights, clip_model_name_or_path="/some/clip")
    with pytest.raises(ConfigError, match="upsampler_model_name_or_path"):
        build(toyworld_points_weights, upsampler_model_name_or_path="somewhere")
    with pytest.raises(ConfigError, match="point_e_frame"):
        build(toyworld_points_weights, point_e_frame=True)
    with pytest.raises(ConfigError, match="no_such_option"):
        build(toyworld_points_weights, no_such_option=1)


def test_points_are_scored_in_our_frame_at_the_toy_scale(toyworld_points_weights):
    """No turn into Point-E's frame: x_t's coordinates are the subset's world coordinates times 1.4, noised."""
    g = build(toyworld_points_weights, n_subsets=2, guidance_scale=5.0)
    inp = make_input()
    seen = []
    predict = g.prior.predict_eps
    g.prior.predict_eps = lambda x_t, t, cond: (seen.append((x_t, t, cond)), predict(x_t, t, cond))[1]
    K, N = TINY_POINTS["n_ctx"], inp.points.shape[0]
    t = torch.tensor([100, 600])
    noise = torch.randn(2, 6, K, generator=torch.Generator().manual_seed(3))
    out = g(inp, t=t, noise=noise)
    idx = farthest_point_sample(inp.points.detach()[None].expand(2, N, 3), K, start_idx=(torch.arange(2) * N) // 2)
    a = g.alphas_cumprod[t].view(-1, 1, 1)
    expected_xyz = a.sqrt() * 1.4 * inp.points.detach()[idx].transpose(1, 2) + (1 - a).sqrt() * noise[:, :3]
    x_t, t_seen, cond = seen[0]
    assert torch.allclose(x_t[:2, :3], expected_xyz, atol=1e-5)
    assert torch.equal(t_seen, torch.cat([t, t]))
    assert torch.allclose(cond[0], g.prior.encode_text(["a red cube"])[0])
    assert torch.equal(cond[2], torch.zeros_like(cond[2]))  # CFG against the all-zero condition
    # The SDS gradient reaches the centres, not the (detached) colours.
    gp, gc = torch.autograd.grad(out.losses["loss_sds"], [inp.points, inp.point_colors], allow_unused=True)
    assert gp is not None and float(gp.abs().sum()) > 0 and gc is None


def test_the_prompt_comes_from_the_toy_vocabulary(toyworld_points_weights):
    g = build(toyworld_points_weights)
    out = g(make_input("a snowman"), t=torch.tensor([300]))
    assert torch.isfinite(out.losses["loss_sds"])
    with pytest.raises(UnknownPromptError, match="teapot"):
        build(toyworld_points_weights, prompt="a teapot")(make_input(), t=torch.tensor([300]))


def test_sample_init_points_are_the_priors_clouds_as_drawn(toyworld_points_weights):
    g = build(toyworld_points_weights, init_clouds=3, init_steps=2, init_guidance_scale=2.0)
    torch.manual_seed(0)
    xyz, rgb = g.sample_init_points("a chair")
    assert xyz.shape == (3 * TINY_POINTS["n_ctx"], 3) and rgb.shape == xyz.shape
    assert float(rgb.min()) >= 0 and float(rgb.max()) <= 1
    torch.manual_seed(0)
    ref, _ = sample_points(g.prior, ["a chair"] * 3, steps=2, guidance_scale=2.0)
    assert torch.equal(xyz, ref.reshape(-1, 3))  # not recentred or rescaled by default
    scaled = build(toyworld_points_weights, init_clouds=1, init_steps=2, init_radius=0.8)
    xyz, _ = scaled.sample_init_points("a chair")
    assert torch.allclose(xyz.norm(dim=-1).max(), torch.tensor(0.8)) and float(xyz.mean(0).abs().max()) < 1e-5
