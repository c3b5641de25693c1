"""point-e-guidance: 3D SDS on the geometry's points, checked against a stub prior whose epsilon is known.

The stub has Point-E's interface (``schedule.alphas_cumprod()``, ``schedule.to_model_space``,
``encode_text``, ``predict_eps``, ``model.cfg.n_ctx``, ``sample``) and records what it is given, so
each test can compute the expected gradient by hand: ``w(t) (e_cfg - noise) / n_subsets`` in the
prior's space, carried back through the channel scaling, the frame turn and the subset gather.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from lift3d.config import ConfigError
from lift3d.guidance.base import CameraBatch, GuidanceInput
from lift3d.guidance.point_e import PointEGuidance
from lift3d.priors.point_e.prior import point_e_to_world, world_to_point_e
from lift3d.prompts.base import PromptUtils
from lift3d.registry import find
from lift3d.utils.point_sampling import farthest_point_sample
from missing_weights import build_error, empty_hub  # noqa: F401  (fixture)

NAME = "point-e-guidance"
T = 64  # the stub's timesteps
K = 16  # its context size
D = 8  # its condition size


class StubSchedule:
    """Cosine-like alphas; channel scaling xyz * 2, rgb * 2 - 1 (what Point-E does for rgb in [0, 1])."""

    def alphas_cumprod(self) -> torch.Tensor:
        s = torch.arange(T, dtype=torch.float64) / T
        return torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    def to_model_space(self, xyz: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
        return torch.cat([xyz * 2.0, rgb * 2.0 - 1.0], dim=-1).transpose(1, 2)


class StubPrior(nn.Module):
    """eps(x_t, t, cond) = 0.3 x_t + bias(cond) + 0.001 t, with bias = cond @ P (P [D, 6]); known in closed form."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = nn.Parameter(torch.randn(D, 6, generator=g))
        self.schedule = StubSchedule()
        self.model = SimpleNamespace(cfg=SimpleNamespace(n_ctx=K))
        self.calls: list[dict] = []

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        rows = [torch.sin(torch.arange(D, dtype=torch.float32) * (len(p) + 1) + sum(map(ord, p)) % 7) for p in prompts]
        return torch.stack(rows).to(self.proj)

    def eps_of(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return 0.3 * x_t + (cond @ self.proj)[:, :, None] + 0.001 * t.to(x_t)[:, None, None]

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        self.calls.append({"x_t": x_t.detach().clone(), "t": t.clone(), "cond": cond.detach().clone()})
        return self.eps_of(x_t, t, cond)

    def sample(self, prompts: list[str], *, steps: int, guidance_scale: float, upsampler_steps: int):
        """Point-E's sampler: a batch of clouds in our frame; here a box of sides 0.2, 0.4, 0.6 off the origin."""
        self.calls.append({"sample": prompts, "steps": steps, "guidance_scale": guidance_scale})
        g = torch.Generator().manual_seed(1)
        xyz = torch.rand(1, 100, 3, generator=g) * torch.tensor([0.2, 0.4, 0.6]) + torch.tensor([1.0, 2.0, 3.0])
        return xyz, torch.rand(1, 100, 3, generator=g)


class StubGuidance(PointEGuidance):
    """The guidance with the stub prior swapped in through the documented hook."""

    @classmethod
    def resolve(cls, cfg, key="system.guidance"):
        return None

    def build_prior(self):
        return StubPrior()


def make_input(n: int = 40, prompt: str = "a chair", seed: int = 0, colors: bool = True) -> GuidanceInput:
    g = torch.Generator().manual_seed(seed)
    pts = (torch.rand(n, 3, generator=g) - 0.5).requires_grad_(True)
    cols = torch.rand(n, 3, generator=g).requires_grad_(True) if colors else None
    return GuidanceInput(cameras=CameraBatch.from_angles(0.0, 0.0), points=pts, point_colors=cols,
                         prompt=PromptUtils(prompt=prompt))


def t_noise(S: int = 2, seed: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"t": torch.tensor([10, 40][:S] + [20] * max(0, S - 2)), "noise": torch.randn(S, 6, K, generator=g)}


def expected_point_grads(g: StubGuidance, inp: GuidanceInput, t: torch.Tensor, noise: torch.Tensor, scale: float,
                         uncond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """By hand: subsets, forward map, CFG eps, SDS gradient, and its pull-back onto points and colours."""
    S = noise.shape[0]
    pts, cols = inp.points.detach(), inp.point_colors.detach()
    N = pts.shape[0]
    idx = farthest_point_sample(pts[None].expand(S, N, 3), K, start_idx=(torch.arange(S) * N) // S)
    s = g.cfg.point_scale
    xyz = world_to_point_e(pts[idx] * s) if g.cfg.point_e_frame else pts[idx] * s
    x = torch.cat([xyz * 2, cols[idx] * 2 - 1], -1).transpose(1, 2)
    a = StubSchedule().alphas_cumprod().float()[t].view(-1, 1, 1)
    x_t = a.sqrt() * x + (1 - a).sqrt() * noise
    prior = g.prior
    cond = prior.encode_text([inp.prompt.prompt]).expand(S, -1)
    unc = torch.zeros_like(cond) if uncond is None else uncond.expand(S, -1)
    e_c, e_u = prior.eps_of(x_t, t, cond), prior.eps_of(x_t, t, unc)
    grad_x = (1 - a) * (e_u + scale * (e_c - e_u) - noise) / S  # [S, 6, K]
    gx = grad_x.transpose(1, 2)  # [S, K, 6]
    g_xyz = gx[..., :3] * 2
    if g.cfg.point_e_frame:  # the turn is orthogonal: its pull-back is its inverse
        g_xyz = point_e_to_world(g_xyz)
    g_pts = torch.zeros_like(pts).index_add_(0, idx.reshape(-1), (g_xyz * s).reshape(-1, 3))
    g_cols = torch.zeros_like(cols).index_add_(0, idx.reshape(-1), (gx[..., 3:] * 2).reshape(-1, 3))
    return g_pts, g_cols


def test_the_gradient_on_the_points_is_the_weighted_cfg_score_pulled_back():
    g = StubGuidance({"guidance_scale": 7.0, "n_subsets": 2, "detach_colors": False, "point_scale": 1.5})
    inp = make_input()
    tn = t_noise()
    out = g(inp, **tn)
    got_p, got_c = torch.autograd.grad(out["loss_sds"], [inp.points, inp.point_colors])
    want_p, want_c = expected_point_grads(g, inp, tn["t"], tn["noise"], 7.0)
    torch.testing.assert_close(got_p, want_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_c, want_c, rtol=1e-5, atol=1e-6)
    assert float(got_p.abs().sum()) > 0
    # both branches in one call: the conditional half first, then the all-zero condition
    call = g.prior.calls[-1]
    assert call["cond"].shape == (4, D)
    assert torch.equal(call["cond"][2:], torch.zeros(2, D)) and call["cond"][:2].abs().sum() > 0
    assert call["t"].tolist() == [10, 40, 10, 40]


def test_without_the_frame_turn_the_prior_sees_our_axes():
    g = StubGuidance({"n_subsets": 2, "point_e_frame": False, "guidance_scale": 3.0})
    inp = make_input()
    tn = t_noise()
    got = torch.autograd.grad(g(inp, **tn)["loss_sds"], inp.points)[0]
    torch.testing.assert_close(got, expected_point_grads(g, inp, tn["t"], tn["noise"], 3.0)[0], rtol=1e-5, atol=1e-6)


def test_scored_subsets_are_farthest_point_samples_in_point_e_frame():
    g = StubGuidance({"n_subsets": 3})
    inp = make_input(n=50)
    tn = t_noise(3)
    g(inp, **tn)
    call = g.prior.calls[-1]
    a = g.alphas_cumprod[tn["t"]].view(-1, 1, 1)
    x = (call["x_t"][:3] - (1 - a).sqrt() * tn["noise"]) / a.sqrt()  # the clean subsets the prior was shown
    seen = point_e_to_world(x[:, :3].transpose(1, 2) / 2)  # [3, K, 3] back in world units
    idx = farthest_point_sample(inp.points.detach()[None].expand(3, 50, 3), K, start_idx=torch.tensor([0, 16, 33]))
    torch.testing.assert_close(seen, inp.points.detach()[idx], rtol=1e-5, atol=1e-5)
    assert len({tuple(r) for r in idx[:, 0:1].tolist()}) == 3  # different starts


def test_points_outside_every_subset_get_no_gradient():
    g = StubGuidance({"n_subsets": 1})
    inp = make_input(n=60)
    grad = torch.autograd.grad(g(inp, **t_noise(1))["loss_sds"], inp.points)[0]
    touched = (grad.abs().sum(-1) > 0).sum().item()
    assert touched == K


def test_colours_are_detached_by_default_and_grey_ignores_them():
    g = StubGuidance({"n_subsets": 2})
    inp = make_input()
    loss = g(inp, **t_noise())["loss_sds"]
    gp, gc = torch.autograd.grad(loss, [inp.points, inp.point_colors], allow_unused=True)
    assert gc is None and float(gp.abs().sum()) > 0
    grey = StubGuidance({"n_subsets": 2, "colors": "grey"})
    inp2 = make_input()
    grey(inp2, **t_noise())
    rgb_seen = grey.prior.calls[-1]["x_t"]  # grey 0.5 -> 0 in model space; x_t's colour channels are pure noise
    a = grey.alphas_cumprod[torch.tensor([10, 40])].view(-1, 1, 1)
    torch.testing.assert_close(rgb_seen[:2, 3:], (1 - a).sqrt() * t_noise()["noise"][:, 3:])


def test_empty_text_unconditional_and_cfg_scale_one_is_the_conditional_score():
    g = StubGuidance({"n_subsets": 2, "uncond": "empty_text", "guidance_scale": 4.0})
    inp = make_input()
    tn = t_noise()
    got = torch.autograd.grad(g(inp, **tn)["loss_sds"], inp.points)[0]
    empty = g.prior.encode_text([""])
    assert torch.equal(g.prior.calls[-1]["cond"][2:], empty.expand(2, -1))
    torch.testing.assert_close(got, expected_point_grads(g, inp, tn["t"], tn["noise"], 4.0, uncond=empty)[0],
                               rtol=1e-5, atol=1e-6)


def test_the_configured_prompt_wins_and_a_missing_prompt_is_named():
    g = StubGuidance({"n_subsets": 1, "prompt": "a red car"})
    g(make_input(prompt="something else"), **t_noise(1))
    assert torch.equal(g.prior.calls[-1]["cond"][:1], g.prior.encode_text(["a red car"]))
    h = StubGuidance({"n_subsets": 1})
    inp = make_input()
    inp.prompt = None
    with pytest.raises(ValueError, match="prompt"):
        h(inp, **t_noise(1))


def test_deterministic_given_t_and_noise_and_random_otherwise():
    g = StubGuidance({"n_subsets": 2})
    losses = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        losses.append(g(make_input(), **t_noise())["loss_sds"])
    assert torch.equal(losses[0], losses[1])
    free = []
    for seed in (1, 2, 1):
        torch.manual_seed(seed)
        out = g(make_input())
        free.append((out["loss_sds"].detach(), out["t"]))
    assert torch.equal(free[0][0], free[2][0]) and torch.equal(free[0][1], free[2][1])
    assert not torch.equal(free[0][0], free[1][0])


def test_timesteps_follow_the_scheduled_range_and_weighting():
    g = StubGuidance({"n_subsets": 4, "min_step_percent": 0.5, "max_step_percent": [0, 0.9, 0.6, 100]})
    for step, hi in ((0, int(0.9 * T)), (100, int(0.6 * T))):
        g.update_step(0, step)
        for _ in range(5):
            out = g(make_input())
            assert out["t"].shape == (4,)
            assert int(out["t"].min()) >= T // 2 and int(out["t"].max()) < hi
            assert int(out["max_step"]) == hi and out["timestep"] == out["t"].float().mean()
        assert out["grad_norm"] > 0
    uniform = StubGuidance({"weighting": "uniform"})
    assert torch.equal(uniform.weight(torch.tensor([3, 50])), torch.ones(2))
    sds = StubGuidance({})
    torch.testing.assert_close(sds.weight(torch.tensor([3])), 1 - sds.alphas_cumprod[3:4])


def test_a_cloud_smaller_than_a_subset_is_used_whole_and_normalize_scales_to_half():
    g = StubGuidance({"n_subsets": 2, "normalize": True, "point_e_frame": False})
    inp = make_input(n=5)
    g(inp, **t_noise())
    idx = g.subset_indices(inp.points, None)
    assert idx.shape == (2, K) and idx[0].tolist() == [i % 5 for i in range(K)]
    call = g.prior.calls[-1]
    a = g.alphas_cumprod[torch.tensor([10, 40])].view(-1, 1, 1)
    x = (call["x_t"][:2] - (1 - a).sqrt() * t_noise()["noise"]) / a.sqrt()
    radius = (x[:, :3] / 2).norm(dim=1).max()
    torch.testing.assert_close(radius, torch.tensor(0.5), rtol=1e-5, atol=1e-5)


def test_bad_inputs_and_settings_are_named():
    g = StubGuidance({"n_subsets": 2})
    no_points = make_input()
    no_points.points = None
    with pytest.raises(ValueError, match="guidance_points"):
        g(no_points)
    with pytest.raises(ValueError, match="n_subsets"):
        g(make_input(), t=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="noise must be"):
        g(make_input(), t=torch.tensor([1, 2]), noise=torch.randn(2, 6, K + 1))
    with pytest.raises(ConfigError, match="n_subsets"):
        StubGuidance({"n_subsets": 0})
    with pytest.raises(ConfigError, match="no_such_key"):
        StubGuidance({"no_such_key": 1})


def test_frozen_prior_stays_out_of_the_state_dict_and_follows_dtype():
    g = StubGuidance({"n_subsets": 1})
    assert [k for k, v in g.state_dict().items() if torch.is_tensor(v)] == []
    g = g.to(torch.float64)
    assert g.prior.proj.dtype == torch.float64 and g.alphas_cumprod.dtype == torch.float64
    inp = make_input()
    inp.points = inp.points.detach().double().requires_grad_(True)
    inp.point_colors = inp.point_colors.detach().double()
    out = g(inp, t=torch.tensor([5]), noise=torch.randn(1, 6, K, dtype=torch.float64))
    assert out["loss_sds"].dtype == torch.float64


def test_initial_cloud_is_centred_and_scaled_in_our_frame():
    g = StubGuidance({"init_radius": 0.8, "init_steps": 5})
    xyz, rgb = g.sample_init_points("a chair")
    assert g.prior.calls[-1] == {"sample": ["a chair"], "steps": 5, "guidance_scale": 3.0}
    assert xyz.shape == (100, 3) and rgb.shape == (100, 3) and xyz.dtype == torch.float32
    torch.testing.assert_close(xyz.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(xyz.norm(dim=-1).max(), torch.tensor(0.8))
    raw, raw_rgb = StubPrior().sample(["a chair"], steps=5, guidance_scale=3.0, upsampler_steps=5)
    raw = raw[0] - raw[0].mean(0)
    torch.testing.assert_close(xyz, raw * 0.8 / raw.norm(dim=-1).max())  # a similarity: no turn, same shape
    torch.testing.assert_close(rgb, raw_rgb[0])
    kept = StubGuidance({"init_radius": None, "point_scale": 2.0, "init_colors": "random", "prompt": "a lamp"})
    xyz2, rgb2 = kept.sample_init_points("ignored: the configured prompt wins")
    torch.testing.assert_close(xyz2, StubPrior().sample(["a lamp"], steps=1, guidance_scale=3.0,
                                                        upsampler_steps=1)[0][0] / 2.0)
    assert kept.prior.calls[-1]["sample"] == ["a lamp"]
    assert not torch.allclose(rgb2, raw_rgb[0]) and 0 <= float(rgb2.min()) and float(rgb2.max()) <= 1


def test_a_geometry_without_points_fails_at_start_up():
    system = {
        "geometry_type": "implicit-volume", "renderer_type": "nerf-volume-renderer",
        "guidance_type": "toyworld-guidance", "guidance": {},
        "guidances": {"point_e": {"guidance_type": NAME, "guidance": {}}},
        "prompt_processor_type": "toyworld-prompt-processor", "prompt_processor": {"prompt": "a chair"},
        "loss": {"lambda_sds": 1.0, "lambda_point_e_sds": 0.1},
    }
    with pytest.raises(ConfigError, match=r"point-e-guidance.*geometry's points.*implicit-volume.*gaussian-splatting"):
        find("text-to-3d-system")(system)


def test_missing_weights_say_where_to_get_them(empty_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default folder, point_e_model_cache/, is looked for here
    msg = build_error(NAME)
    assert "system.guidance.pretrained_model_name_or_path" in msg and "no such file" in msg
    assert str(tmp_path / "point_e_model_cache" / "base_40m_textvec.pt") in msg
    assert "curl -LO https://openaipublic.azureedge.net/main/point-e/base_40m_textvec.pt" in msg
    assert "point_e_model=" in msg
    cls = find(NAME, "guidance")
    (tmp_path / "point_e_model_cache").mkdir()
    (tmp_path / "point_e_model_cache" / "base_40m_textvec.pt").write_bytes(b"")
    up = cls.missing_weights(cls.Config(upsampler_model_name_or_path="point_e_model_cache"))
    assert "upsampler_model_name_or_path" in up and "upsample_40m.pt" in up
    (tmp_path / "point_e_model_cache" / "upsample_40m.pt").write_bytes(b"")
    clip = cls.missing_weights(cls.Config(upsampler_model_name_or_path="point_e_model_cache"))
    assert "clip_model_name_or_path" in clip and "hf download openai/clip-vit-large-patch14" in clip
