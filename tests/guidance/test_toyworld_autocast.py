"""The toy guidances' ``autocast`` option: off by default (float32, unchanged), bf16 close to float32."""

from __future__ import annotations

import pytest
import torch

from lift3d.config import ConfigError
from lift3d.guidance.toyworld import ToyWorldGuidance, ToyWorldRefineGuidance, ToyWorldVSDGuidance
from lift3d.priors.toyworld.model import ToyWorldPrior as Network
from tiny_prior import TINY_PRIOR, call

CAMS = dict(elevation=torch.tensor([10.0, 30.0]), azimuth=torch.tensor([0.0, 90.0]),
            camera_distances=torch.tensor([2.0, 2.0]))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    # torch's default init: outputs of order one, so a relative error means something.
    torch.manual_seed(0)
    return Network(TINY_PRIOR).save(tmp_path_factory.mktemp("w") / "tiny.safetensors")


def _inputs():
    gen = torch.Generator().manual_seed(0)
    rgb = torch.rand(2, 16, 16, 3, generator=gen)
    return rgb, torch.tensor([300, 700]), torch.randn(2, 3, 16, 16, generator=gen)


def _sds(weights, **cfg):
    g = ToyWorldGuidance({"pretrained": str(weights), "guidance_scale": 5.0, **cfg})
    rgb, t, noise = _inputs()
    rgb.requires_grad_(True)
    out = call(g, rgb, **CAMS, t=t, noise=noise)
    out["loss_sds"].backward()
    return g, out, rgb.grad


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_default_is_float32_and_none_means_the_same(weights):
    g0, out0, grad0 = _sds(weights)
    g1, out1, grad1 = _sds(weights, autocast="none")
    assert g0.cfg.autocast is None and g0.prior.autocast_dtype is None and g1.prior.autocast_dtype is None
    assert torch.equal(grad0, grad1) and torch.equal(out0["loss_sds"], out1["loss_sds"])


def test_the_default_predicts_exactly_what_the_network_does(weights):
    g = ToyWorldGuidance({"pretrained": str(weights)})
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([100, 900])
    cond = {"tokens": torch.tensor([[1, 2, 0], [3, 0, 0]]), "camera": torch.rand(2, 4),
            "drop": torch.tensor([False, True])}
    with torch.no_grad():
        direct = g.prior.model(x, t, cond["tokens"], cond["camera"], cond["drop"])
        assert torch.equal(g.prior.predict(x, t, cond), direct)


def test_bf16_runs_the_network_in_bf16_and_returns_float32(weights):
    g = ToyWorldGuidance({"pretrained": str(weights), "autocast": "bf16"})
    seen = []
    hook = g.prior.model.unet.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.randn(2, 3, 16, 16)
    cond = {"tokens": torch.tensor([[1, 2, 0], [3, 0, 0]]), "camera": torch.rand(2, 4),
            "drop": torch.tensor([False, False])}
    with torch.no_grad():
        out = g.prior.predict(x, torch.tensor([10, 500]), cond)
    hook.remove()
    assert seen == [torch.bfloat16] and out.dtype == torch.float32


def test_bf16_sds_is_close_to_float32(weights):
    _, out32, grad32 = _sds(weights)
    _, out16, grad16 = _sds(weights, autocast="bf16")
    assert not torch.equal(grad32, grad16)  # it did run in another precision
    assert _rel(grad16, grad32) < 5e-2
    assert abs(out16["loss_sds"].item() / out32["loss_sds"].item() - 1) < 3e-2
    assert grad16.dtype == torch.float32


def test_bf16_refine_target_is_close_to_float32(weights):
    outs = []
    for autocast in (None, "bf16"):
        g = ToyWorldRefineGuidance({"pretrained": str(weights), "n_steps": 2, "strength": 0.3, "autocast": autocast})
        rgb, _, noise = _inputs()
        outs.append(call(g, rgb, **CAMS, noise=noise)["denoised"])
    assert _rel(outs[1], outs[0]) < 5e-2


def test_vsd_lora_copy_keeps_the_setting_and_trains(weights):
    g = ToyWorldVSDGuidance({"pretrained": str(weights), "autocast": "bf16", "lora_n_steps": 1})
    assert g.phi.autocast == "bf16" and g.phi.autocast_dtype is torch.bfloat16
    before = [p.detach().clone() for p in g.lora_parameters()]
    rgb, t, noise = _inputs()
    rgb.requires_grad_(True)
    out = call(g, rgb, **CAMS, t=t, noise=noise)
    out["loss_vsd"].backward()
    assert torch.isfinite(rgb.grad).all() and float(rgb.grad.abs().max()) > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, g.lora_parameters()))
    assert all(p.dtype == torch.float32 for p in g.lora_parameters())


@pytest.mark.parametrize("bad", ["fp16", "BF16"])
def test_an_unknown_value_names_the_valid_ones(weights, bad):
    with pytest.raises(ConfigError, match="'bf16', 'none' or null"):
        ToyWorldGuidance({"pretrained": str(weights), "autocast": bad})
