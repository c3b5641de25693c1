"""The score-distillation core on a fake prior: the maths, independent of any real network."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from lift3d.guidance.base import CameraBatch, GuidanceInput
from lift3d.guidance.score_distillation import (Conditioning, DiffusionPrior, SDSGuidance, eps_x0, guided_eps,
                                                perpendicular)


class FakePrior(DiffusionPrior):
    """Epsilon prediction ``out = scale_c * x_t + bias_c`` per branch; pixels as its space."""

    prediction_type = "epsilon"
    num_train_timesteps = 100

    def __init__(self, negatives: int = 0):
        super().__init__()
        self.register_buffer("alphas_cumprod", torch.linspace(0.99, 0.01, 100))
        self.negatives = negatives

    def encode(self, images):
        return images.permute(0, 3, 1, 2) * 2 - 1

    def decode(self, x):
        return ((x + 1) / 2).permute(0, 2, 3, 1)

    def condition(self, inp, view_dependent_prompting=True):
        B = inp.batch_size
        c = lambda v, s=0.5: {"bias": torch.full((B,), float(v)), "scale": torch.full((B,), s)}  # noqa: E731
        negs = [c(-1.0 - k, 0.8 + 0.1 * k) for k in range(self.negatives)]
        w = torch.full((B, self.negatives), -0.5) if self.negatives else None
        return Conditioning(cond=c(1.0), uncond=c(0.0), negatives=negs, neg_weights=w)

    def predict(self, x_t, t, cond):
        return cond["scale"].view(-1, 1, 1, 1) * x_t + cond["bias"].view(-1, 1, 1, 1)

    def drop_text(self, cond, mask):
        return cond


class FakeSDS(SDSGuidance):
    @dataclass
    class Config(SDSGuidance.Config):
        negatives: int = 0

    def build_prior(self):
        return FakePrior(self.cfg.negatives)


def inp(B=2, n_views=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    cams = CameraBatch.from_angles(torch.zeros(B), torch.linspace(0, 270, B), 2.0, n_views=n_views)
    return GuidanceInput(cameras=cams, rgb=torch.rand(B, 4, 4, 3, generator=g).requires_grad_(True))


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_eps_x0_inverts_each_parameterisation(ptype):
    g = torch.Generator().manual_seed(0)
    x0, eps, a = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g), torch.tensor([0.9, 0.5, 0.1])
    sa, so = a.sqrt().view(-1, 1, 1, 1), (1 - a).sqrt().view(-1, 1, 1, 1)
    x_t = sa * x0 + so * eps
    out = {"epsilon": eps, "sample": x0, "v_prediction": sa * eps - so * x0}[ptype]
    e, x = eps_x0(ptype, out, x_t, a)
    torch.testing.assert_close(e, eps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x, x0, rtol=1e-4, atol=1e-4)


def test_perp_neg_adds_only_the_perpendicular_part_of_each_negative():
    g = torch.Generator().manual_seed(1)
    e_c, e_u, e_n = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    w = torch.tensor([[-0.7], [-0.2]])
    out = guided_eps(e_c, e_u, 5.0, [e_n], w)
    pos = e_c - e_u
    perp = perpendicular(e_n - e_u, pos)
    assert float((perp * pos).sum(dim=(1, 2, 3)).abs().max()) < 1e-4  # orthogonal to the positive direction
    torch.testing.assert_close(out, e_u + 5.0 * (pos + w.view(-1, 1, 1, 1) * perp))
    # A negative along the positive direction adds nothing; without negatives it is plain CFG.
    torch.testing.assert_close(guided_eps(e_c, e_u, 5.0, [e_u + 3 * pos], w), e_u + 5.0 * pos)
    torch.testing.assert_close(guided_eps(e_c, e_u, 5.0), e_u + 5.0 * pos)


def test_sds_gradient_is_the_weighted_guided_residual_on_a_fake_prior():
    sds = FakeSDS({"guidance_scale": 3.0, "weighting": "uniform"})
    x_in = inp()
    t, noise = torch.tensor([10, 60]), torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    out = sds(x_in, t=t, noise=noise)
    out["loss_sds"].backward()
    a = sds.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * (x_in.rgb.detach().permute(0, 3, 1, 2) * 2 - 1) + (1 - a).sqrt() * noise
    e_u, e_c = 0.5 * x_t, 0.5 * x_t + 1.0
    grad = e_u + 3.0 * (e_c - e_u) - noise  # w = 1
    expected = (grad * 2 / 2).permute(0, 2, 3, 1)  # d x / d rgb = 2, loss / B with B = 2
    torch.testing.assert_close(x_in.rgb.grad, expected)


def test_perp_neg_branches_change_the_gradient():
    x1, x2 = inp(), inp()
    kw = dict(t=torch.tensor([10, 60]), noise=torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2)))
    FakeSDS({"negatives": 0})(x1, **kw)["loss_sds"].backward()
    FakeSDS({"negatives": 2})(x2, **kw)["loss_sds"].backward()
    assert float((x1.rgb.grad - x2.rgb.grad).abs().max()) > 1e-3


def test_gradient_clipping_and_normalisation():
    kw = dict(t=torch.tensor([10, 60]), noise=torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2)))
    x = inp()
    FakeSDS({"guidance_scale": 50.0, "grad_clip": 0.1, "weighting": "uniform"})(x, **kw)["loss_sds"].backward()
    assert float(x.rgb.grad.abs().max()) <= 0.1 * 2 / 2 + 1e-6  # clipped in the prior's space, times dx/drgb / B
    x = inp()
    FakeSDS({"guidance_scale": 50.0, "grad_normalize": True})(x, **kw)["loss_sds"].backward()
    g = x.rgb.grad * 2 / 2  # back to the prior's space: / (dx/drgb) * B
    torch.testing.assert_close(g.flatten(1).pow(2).mean(1).sqrt(), torch.ones(2))


@pytest.mark.parametrize("schedule", ["linear", "sqrt"])
def test_annealed_timesteps_move_from_max_to_min(schedule):
    sds = FakeSDS({"timestep_schedule": schedule, "min_step_percent": 0.1, "max_step_percent": 0.9,
                   "anneal_steps": 100})
    ts = []
    for step in (0, 25, 100, 200):
        sds.update_step(0, step)
        ts.append(int(sds.sample_t(inp(), torch.device("cpu"))[0]))
    p25 = 0.25 if schedule == "linear" else 0.5
    assert ts == [90, round(90 - 80 * p25), 10, 10]


def test_timesteps_shared_per_group_or_batch():
    sds = FakeSDS({"timestep_sharing": "group"})
    torch.manual_seed(0)
    t = sds.sample_t(inp(B=6, n_views=3), torch.device("cpu"))
    assert t[0] == t[1] == t[2] and t[3] == t[4] == t[5]
    sds = FakeSDS({"timestep_sharing": "batch"})
    assert len(set(sds.sample_t(inp(B=4), torch.device("cpu")).tolist())) == 1
