"""Backgrounds: solid (fixed, learned, random colours), neural environment map, textured."""

from __future__ import annotations

import math

import pytest
import torch

from lift3d.registry import find


def _dirs(B: int = 2, H: int = 4, W: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.nn.functional.normalize(torch.randn(B, H, W, 3, generator=g), dim=-1)


def test_solid_color_shape_and_value():
    bg = find("solid-color-background", "background")({"color": [0.2, 0.4, 0.6]})
    out = bg(_dirs())
    assert out.shape == (2, 4, 5, 3)
    torch.testing.assert_close(out, torch.tensor([0.2, 0.4, 0.6]).expand(2, 4, 5, 3))
    assert list(bg.parameters()) == []


def test_solid_color_learned_gets_gradients():
    bg = find("solid-color-background", "background")({"color": [0.5, 0.5, 0.5], "learned": True})
    params = list(bg.parameters())
    assert len(params) == 1
    (bg(_dirs()) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    torch.testing.assert_close(params[0].grad, torch.tensor([40.0, 80.0, 120.0]))  # 2*4*5 pixels


def test_solid_color_random_aug_statistics():
    bg = find("solid-color-background", "background")(
        {"color": [1.0, 1.0, 1.0], "random_aug": True, "random_aug_prob": 0.3})
    torch.manual_seed(0)
    dirs = _dirs(B=500, H=2, W=2)
    out = bg.train()(dirs)
    # Each image is one colour: the white one or a random one.
    assert torch.allclose(out, out[:, :1, :1].expand_as(out))
    replaced = (out[:, 0, 0] != 1.0).any(-1).float()
    assert abs(replaced.mean().item() - 0.3) < 0.07  # 500 draws, ~3.4 sigma
    rand_colors = out[:, 0, 0][replaced.bool()]
    assert abs(rand_colors.mean().item() - 0.5) < 0.05  # uniform in [0, 1]
    # Never in eval mode.
    torch.testing.assert_close(bg.eval()(dirs), torch.ones_like(dirs))


def test_solid_color_random_aug_shared():
    bg = find("solid-color-background", "background")(
        {"color": [1.0, 1.0, 1.0], "random_aug": True, "random_aug_prob": 1.0, "random_aug_shared": True}).train()
    torch.manual_seed(0)
    out = bg(_dirs(B=4))
    assert torch.allclose(out, out[:1, :1, :1].expand_as(out))
    assert not torch.allclose(out, torch.ones_like(out))


def test_neural_env_shape_range_and_gradients():
    torch.manual_seed(0)
    bg = find("neural-environment-map-background", "background")({"n_neurons": 16})
    dirs = _dirs()
    out = bg(dirs)
    assert out.shape == (2, 4, 5, 3)
    assert out.min() >= 0 and out.max() <= 1
    # It depends on the direction, and not on its length.
    torch.testing.assert_close(bg(dirs * 3.0), out)
    assert (out[0, 0, 0] - out[1, 2, 3]).abs().max() > 1e-4
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bg.parameters())


def test_neural_env_fits_two_colours():
    torch.manual_seed(0)
    bg = find("neural-environment-map-background", "background")({"n_neurons": 32})
    dirs = _dirs(B=1, H=16, W=16)
    target = torch.where(dirs[..., 2:] > 0, torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0]))
    opt = torch.optim.Adam(bg.parameters(), lr=3e-2)
    first = None
    for _ in range(60):
        loss = ((bg(dirs) - target) ** 2).mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


def test_neural_env_eval_color_and_random_aug():
    bg = find("neural-environment-map-background", "background")(
        {"eval_color": [1.0, 1.0, 1.0], "random_aug": True, "random_aug_prob": 1.0})
    dirs = _dirs()
    torch.testing.assert_close(bg.eval()(dirs), torch.ones_like(dirs))
    torch.manual_seed(0)
    out = bg.train()(dirs)
    assert torch.allclose(out, out[:, :1, :1].expand_as(out))  # per-image random colour
    with pytest.raises(ValueError, match="eval_color"):
        find("neural-environment-map-background", "background")({"eval_color": [1.0, 1.0]})


def _textured(**cfg):
    return find("textured-background", "background")(cfg)


def test_textured_direction_mapping():
    bg = _textured(height=4, width=8, color_activation="none")
    with torch.no_grad():
        bg.texture.copy_(torch.arange(32, dtype=torch.float32).reshape(1, 4, 8).expand(3, 4, 8))
    # +x on the horizon sits between rows 1 and 2 and between columns 3 and 4 (the centre column).
    row1 = math.radians(22.5)  # elevation of row 1's centre
    dirs = torch.tensor([
        [1.0, 0.0, 0.0],  # centre of the map
        [math.cos(row1), 0.0, math.sin(row1)],  # row 1, between columns 3 and 4
        [0.0, math.cos(row1), math.sin(row1)],  # +y: a quarter from the left, between columns 1 and 2
        [math.cos(row1) * math.cos(math.radians(-22.5)), math.cos(row1) * math.sin(math.radians(-22.5)),
         math.sin(row1)],  # texel centre (row 1, column 4)
    ]).reshape(1, 1, 4, 3)
    out = bg(dirs)[0, 0, :, 0]
    tex = bg.texture[0].detach()
    expected = torch.stack([
        tex[1:3, 3:5].mean(), tex[1, 3:5].mean(), tex[1, 1:3].mean(), tex[1, 4],
    ])
    torch.testing.assert_close(out, expected)


def test_textured_shapes_init_and_gradients():
    bg = _textured(height=8, width=16, init_color=[0.2, 0.5, 0.9])
    dirs = _dirs()
    out = bg(dirs)
    assert out.shape == (2, 4, 5, 3)
    torch.testing.assert_close(out, torch.tensor([0.2, 0.5, 0.9]).expand_as(out), atol=1e-4, rtol=0)
    out.sum().backward()
    touched = bg.texture.grad.abs().sum(0) > 0
    assert 0 < touched.sum() <= 4 * 2 * 4 * 5  # only texels near the looked-up directions
    latent = _textured(channels=4, color_activation="none")
    assert latent(dirs).shape == (2, 4, 5, 4)
    torch.testing.assert_close(latent.export_texture(), latent.texture.detach().permute(1, 2, 0))
    with pytest.raises(ValueError, match="init_color"):
        _textured(init_color=[0.5, 0.5])


def test_textured_fits_a_sky():
    torch.manual_seed(0)
    bg = _textured(height=8, width=16)
    dirs = _dirs(B=1, H=16, W=16)
    target = torch.where(dirs[..., 2:] > 0, torch.tensor([0.2, 0.4, 0.9]), torch.tensor([0.3, 0.25, 0.2]))
    opt = torch.optim.Adam(bg.parameters(), lr=0.1)
    for _ in range(100):
        loss = ((bg(dirs) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 2e-3
