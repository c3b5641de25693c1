"""toyworld-mv-guidance: SDS from the multi-view toy prior on groups of rendered views."""

from __future__ import annotations

import pytest
import torch

from lift3d.config import ConfigError
from lift3d.guidance.base import CameraBatch, GuidanceInput
from lift3d.prompts.toyworld import ToyWorldPromptProcessor
from lift3d.registry import find
from tiny_toyworld_mv import toyworld_mv_weights  # noqa: F401  (fixture)

RES = 16


def _input(groups=2, n_views=4, camera_groups=None, seed=0, prompt="a snowman"):
    """``groups`` groups of ``n_views`` views (azimuths 360 / n_views apart); the camera batch declares
    groups of ``camera_groups`` (default: n_views)."""
    g = torch.Generator().manual_seed(seed)
    B = groups * n_views
    el = (torch.rand(groups, generator=g) * 40).repeat_interleave(n_views)
    base = (torch.rand(groups, generator=g) * 360).repeat_interleave(n_views)
    az = torch.remainder(base + torch.arange(n_views).repeat(groups) * 360.0 / n_views + 180, 360) - 180
    cams = CameraBatch.from_angles(el, az, 2.0, 40.0, n_views=camera_groups or n_views)
    rgb = torch.rand(B, RES, RES, 3, generator=g).requires_grad_(True)
    return GuidanceInput(cameras=cams, rgb=rgb, prompt=ToyWorldPromptProcessor({"prompt": prompt})())


def _guidance(weights, **over):
    return find("toyworld-mv-guidance", "guidance")({"pretrained": str(weights), "guidance_scale": 5.0, **over}).eval()


def _t_noise(B, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {"t": torch.full((B,), 500).long(), "noise": torch.randn(B, 3, RES, RES, generator=g)}


def test_gradient_reaches_every_view_with_the_render_shape(toyworld_mv_weights):
    g = _guidance(toyworld_mv_weights)
    inp = _input()
    out = g(inp)
    (grad,) = torch.autograd.grad(out["loss_sds"], inp.rgb)
    assert grad.shape == inp.rgb.shape == (8, RES, RES, 3)
    assert all(float(grad[i].abs().sum()) > 0 for i in range(8))


def test_one_timestep_per_group(toyworld_mv_weights):
    g = _guidance(toyworld_mv_weights)
    ts = [g(_input(groups=3, seed=s))["t"].view(3, 4) for s in range(4)]
    assert all(torch.equal(t, t[:, :1].expand(-1, 4)) for t in ts)
    assert len({int(v) for t in ts for v in t[:, 0]}) > 1  # drawn per group, not once for all
    with pytest.raises(ConfigError, match="timestep_sharing"):
        _guidance(toyworld_mv_weights, timestep_sharing="view")


def test_batches_that_are_not_its_groups_are_refused_naming_the_data_keys(toyworld_mv_weights):
    g = _guidance(toyworld_mv_weights)
    with pytest.raises(ConfigError, match=r"data\.n_views=1.*data\.batch_size=6"):
        g(_input(groups=6, n_views=1))
    with pytest.raises(ConfigError, match=r"data\.n_views=2"):
        g(_input(groups=2, n_views=2))
    assert _guidance(toyworld_mv_weights, n_views=2)(_input(groups=2, n_views=2)).losses  # asked for pairs


def test_views_of_a_group_shape_each_others_gradient(toyworld_mv_weights):
    g = _guidance(toyworld_mv_weights)
    inp = _input(groups=2)
    other = GuidanceInput(cameras=inp.cameras, rgb=inp.rgb.detach().clone(), prompt=inp.prompt)
    with torch.no_grad():
        other.rgb[3] = 1.0 - other.rgb[3]  # change view 3 of group 0
    other.rgb.requires_grad_(True)
    tn = _t_noise(8)
    ga = torch.autograd.grad(g(inp, **tn)["loss_sds"], inp.rgb)[0]
    gb = torch.autograd.grad(g(other, **tn)["loss_sds"], other.rgb)[0]
    assert not torch.equal(ga[:3], gb[:3])  # the group's other views answer to it
    assert torch.equal(ga[4:], gb[4:])  # the other group does not


def test_with_groups_of_one_it_is_the_single_view_guidance(toyworld_mv_weights):
    # the multi-view file read as a single-view prior, view by view: the same SDS loss
    mv = _guidance(toyworld_mv_weights, n_views=1)
    sv = find("toyworld-guidance", "guidance")({"pretrained": str(toyworld_mv_weights), "guidance_scale": 5.0}).eval()
    tn = _t_noise(4)
    a = mv(_input(groups=4, n_views=1), **tn)["loss_sds"]
    b = sv(_input(groups=4, n_views=1), **tn)["loss_sds"]
    assert torch.equal(a, b)


def test_deterministic_given_t_and_noise(toyworld_mv_weights):
    tn = _t_noise(8)
    losses = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        losses.append(_guidance(toyworld_mv_weights)(_input(), **tn)["loss_sds"])
    assert torch.equal(*losses)


def test_missing_weights_say_how_to_make_them(tmp_path):
    cls = find("toyworld-mv-guidance", "guidance")
    from lift3d.config import parse_structured
    from lift3d.priors.toyworld.model import MissingWeightsError

    absent = tmp_path / "absent.safetensors"
    msg = cls.missing_weights(parse_structured(cls.Config, {"pretrained": str(absent)}))
    assert str(absent) in msg and "python -m lift3d.priors.toyworld train-mv" in msg
    with pytest.raises(MissingWeightsError, match="train-mv"):
        cls({"pretrained": str(absent)})
    with pytest.raises(ConfigError, match="no_such_option"):
        cls({"pretrained": str(absent), "no_such_option": 1})


def test_the_frozen_prior_stays_out_of_the_state_dict(toyworld_mv_weights):
    g = _guidance(toyworld_mv_weights)
    g(_input())
    assert not [k for k, v in g.state_dict().items() if torch.is_tensor(v)]
    assert all(not p.requires_grad for p in g.prior.parameters())
