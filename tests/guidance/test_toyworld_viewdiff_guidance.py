"""toyworld-viewdiff-guidance: SDS from the toy ViewDiff on groups of rendered views."""

from __future__ import annotations

import pytest
import torch

from lift3d.config import ConfigError, parse_structured
from lift3d.guidance.base import CameraBatch, GuidanceInput
from lift3d.prompts.toyworld import ToyWorldPromptProcessor
from lift3d.registry import find
from tiny_toyworld_viewdiff import toyworld_viewdiff_weights  # noqa: F401  (fixture)

RES = 16


def _input(groups=2, n_views=4, seed=0, prompt="a snowman", azimuth_shift=0.0):
    """``groups`` groups of ``n_views`` views (azimuths 360 / n_views apart), every view turned by ``azimuth_shift``."""
    g = torch.Generator().manual_seed(seed)
    B = groups * n_views
    el = (torch.rand(groups, generator=g) * 40).repeat_interleave(n_views)
    base = (torch.rand(groups, generator=g) * 360).repeat_interleave(n_views)
    az = torch.remainder(base + torch.arange(n_views).repeat(groups) * 360.0 / n_views + azimuth_shift + 180, 360) - 180
    cams = CameraBatch.from_angles(el, az, 2.0, 40.0, n_views=n_views)
    rgb = torch.rand(B, RES, RES, 3, generator=g).requires_grad_(True)
    return GuidanceInput(cameras=cams, rgb=rgb, prompt=ToyWorldPromptProcessor({"prompt": prompt})())


def _guidance(weights, **over):
    return find("toyworld-viewdiff-guidance", "guidance")({"pretrained": str(weights), "guidance_scale": 5.0,
                                                           **over}).eval()


def _t_noise(B, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {"t": torch.full((B,), 500).long(), "noise": torch.randn(B, 3, RES, RES, generator=g)}


def test_it_denoises_with_the_toy_viewdiff_network(toyworld_viewdiff_weights):
    from lift3d.priors.toyworld.model import make_scheduler
    from lift3d.priors.toyworld.viewdiff import ViewDiffToyPrior

    g = _guidance(toyworld_viewdiff_weights)
    assert isinstance(g.prior.model, ViewDiffToyPrior) and g.n_views == 4
    # the adapter's prediction is the network's on the same groups
    inp = _input()
    cond = g.prior.condition(inp).cond
    tn = _t_noise(8)
    x0 = g.prior.encode(inp.rgb.detach())
    sched = make_scheduler(g.prior.model.cfg)
    x_t = sched.add_noise(x0, tn["noise"], tn["t"])
    with torch.no_grad():
        ours = g.prior.predict(x_t, tn["t"], cond)
        net = g.prior.model(x_t, tn["t"], cond["tokens"], cond["camera"], cond["drop"], n_views=4)
    assert torch.equal(ours, net)


def test_gradient_reaches_every_view_and_groups_share_one_timestep(toyworld_viewdiff_weights):
    g = _guidance(toyworld_viewdiff_weights)
    inp = _input(groups=3)
    out = g(inp)
    (grad,) = torch.autograd.grad(out["loss_sds"], inp.rgb)
    assert all(float(grad[i].abs().sum()) > 0 for i in range(12))
    t = out["t"].view(3, 4)
    assert torch.equal(t, t[:, :1].expand(-1, 4))
    with pytest.raises(ConfigError, match="timestep_sharing"):
        _guidance(toyworld_viewdiff_weights, timestep_sharing="view")


def test_batches_that_are_not_its_groups_are_refused_naming_the_data_keys(toyworld_viewdiff_weights):
    g = _guidance(toyworld_viewdiff_weights)
    with pytest.raises(ConfigError, match=r"data\.n_views=1.*data\.batch_size=6"):
        g(_input(groups=6, n_views=1))
    assert _guidance(toyworld_viewdiff_weights, n_views=2)(_input(groups=2, n_views=2)).losses  # asked for pairs


def test_views_of_a_group_shape_each_others_gradient(toyworld_viewdiff_weights):
    g = _guidance(toyworld_viewdiff_weights)
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


def test_the_cameras_reach_the_network(toyworld_viewdiff_weights):
    # the same renders seen from turned cameras: another pose for the LoRA, the projection and the camera MLP
    g = _guidance(toyworld_viewdiff_weights)
    tn = _t_noise(8)
    grads = []
    for shift in (0.0, 40.0):
        inp = _input(azimuth_shift=shift)
        grads.append(torch.autograd.grad(g(inp, **tn)["loss_sds"], inp.rgb)[0])
    assert (grads[0] - grads[1]).abs().max() > 1e-6


def test_deterministic_given_t_and_noise(toyworld_viewdiff_weights):
    tn = _t_noise(8)
    losses = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        losses.append(_guidance(toyworld_viewdiff_weights)(_input(), **tn)["loss_sds"])
    assert torch.equal(*losses)


def test_missing_weights_say_how_to_make_them(tmp_path):
    from lift3d.priors.toyworld.model import MissingWeightsError

    cls = find("toyworld-viewdiff-guidance", "guidance")
    absent = tmp_path / "absent.safetensors"
    msg = cls.missing_weights(parse_structured(cls.Config, {"pretrained": str(absent)}))
    assert str(absent) in msg and "python -m lift3d.priors.toyworld train-viewdiff" in msg
    with pytest.raises(MissingWeightsError, match="train-viewdiff"):
        cls({"pretrained": str(absent)})


def test_a_toy_mvdream_file_is_refused(tmp_path):
    from tiny_toyworld_mv import save_tiny_mv_prior

    mv = save_tiny_mv_prior(tmp_path / "mv.safetensors")
    with pytest.raises(ValueError, match="without ViewDiff's layers"):
        _guidance(mv)


def test_the_frozen_prior_stays_out_of_the_state_dict(toyworld_viewdiff_weights):
    g = _guidance(toyworld_viewdiff_weights)
    g(_input())
    assert not [k for k, v in g.state_dict().items() if torch.is_tensor(v)]
    assert all(not p.requires_grad for p in g.prior.parameters())
