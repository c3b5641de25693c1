"""toyworld-zero123-guidance: SDS from the toy Zero123 given the input image and its camera."""

from __future__ import annotations

import pytest
import torch

from lift3d.guidance.base import CameraBatch, GuidanceInput
from lift3d.priors.toyworld.data import camera_vector
from lift3d.priors.toyworld.model import MissingWeightsError
from lift3d.registry import find
from tiny_toyworld_zero123 import make_tiny_zero123

RES = 16


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_tiny_zero123().save(tmp_path_factory.mktemp("z123") / "tiny-z123.safetensors")


def _input(B=3, seed=0, ref_azimuth=30.0, with_image=True):
    g = torch.Generator().manual_seed(seed)
    cams = CameraBatch.from_angles(torch.rand(B, generator=g) * 40, torch.rand(B, generator=g) * 360 - 180, 2.0, 40.0)
    rgb = torch.rand(B, RES, RES, 3, generator=g).requires_grad_(True)
    extra = {}
    if with_image:
        extra = {"cond_image": torch.rand(1, 32, 32, 3, generator=g),
                 "cond_cameras": CameraBatch.from_angles(torch.tensor([10.0]), torch.tensor([ref_azimuth]), 2.0, 40.0)}
    return GuidanceInput(cameras=cams, rgb=rgb, **extra)


def _guidance(weights, **over):
    return find("toyworld-zero123-guidance", "guidance")({"pretrained": str(weights), "guidance_scale": 3.0,
                                                          **over}).eval()


def test_gradient_reaches_every_view_and_depends_on_the_input_image(weights):
    g = _guidance(weights)
    inp = _input()
    tn = {"t": torch.full((3,), 500).long(), "noise": torch.randn(3, 3, RES, RES, generator=torch.Generator().manual_seed(1))}
    (grad,) = torch.autograd.grad(g(inp, **tn)["loss_sds"], inp.rgb)
    assert grad.shape == inp.rgb.shape and all(float(grad[i].abs().sum()) > 0 for i in range(3))
    other = _input()
    other.cond_image = 1.0 - inp.cond_image
    (grad2,) = torch.autograd.grad(g(other, **tn)["loss_sds"], other.rgb)
    assert not torch.allclose(grad, grad2)


def test_the_camera_is_relative_to_the_input_view_and_cfg_drops_the_image(weights):
    g = _guidance(weights)
    inp = _input(ref_azimuth=30.0)
    cond = g.prior.condition(inp)
    c = inp.cameras
    assert torch.allclose(cond.cond["camera"], camera_vector(c.elevation, c.azimuth - 30.0, c.distance), atol=1e-6)
    assert not cond.cond["drop"].any() and cond.uncond["drop"].all()
    assert torch.allclose(cond.cond["input_cam"][0], torch.tensor([10.0 / 90.0, 0.0]), atol=1e-6)
    # turning the whole scene (views and input) about z changes nothing the prior sees
    turned = _input(ref_azimuth=30.0)
    turned.cameras = CameraBatch.from_angles(c.elevation, c.azimuth + 50.0, 2.0, 40.0)
    turned.cond_cameras = CameraBatch.from_angles(torch.tensor([10.0]), torch.tensor([80.0]), 2.0, 40.0)
    assert torch.allclose(g.prior.condition(turned).cond["camera"], cond.cond["camera"], atol=1e-5)


def test_without_the_input_image_or_weights_it_says_what_is_missing(weights, tmp_path):
    g = _guidance(weights)
    with pytest.raises(ValueError, match="single-image-datamodule"):
        g(_input(with_image=False))
    cls = find("toyworld-zero123-guidance", "guidance")
    msg = cls.missing_weights(cls.Config(pretrained=str(tmp_path / "absent.safetensors")))
    assert "train-zero123" in msg and "absent.safetensors" in msg
    with pytest.raises(MissingWeightsError, match="train-zero123"):
        cls({"pretrained": str(tmp_path / "absent.safetensors")})
    assert cls.requires(cls.Config()) >= {"cond_image"}
