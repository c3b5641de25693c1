"""implicit-volume: config, density bias, normals, isosurface, conversion."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lift3d.config import ConfigError
from lift3d.geometry.base import IsosurfaceError
from lift3d.geometry.implicit_volume import trunc_exp
from lift3d.registry import find


SMALL = {"pos_encoding_config": {"n_levels": 6, "log2_hashmap_size": 12, "base_resolution": 8},
         "backend": "torch"}


def make(**over):
    cfg = {**SMALL, **over}
    torch.manual_seed(0)
    return find("implicit-volume")(cfg)


def test_defaults_and_parameter_groups():
    g = find("implicit-volume")({"backend": "torch"})
    enc = g.encoding
    assert (enc.n_levels, enc.n_features_per_level, enc.log2_hashmap_size) == (16, 2, 19)
    assert g.cfg.density_activation == "shifted_trunc_exp" and g.cfg.density_bias == "blob_magic3d"
    assert g.cfg.normal_type == "finite_difference" and g.cfg.n_feature_dims == 3
    names = {n.split(".")[0] for n, _ in g.named_parameters()}
    assert names == {"encoding", "density_network", "feature_network"}
    # Hidden width 64, one hidden layer.
    assert [layer.out_features for layer in g.density_network.layers] == [64, 1]


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="density_bais"):
        find("implicit-volume")({"density_bais": 1.0})
    with pytest.raises(ValueError, match="density_bias"):
        find("implicit-volume")({**SMALL, "density_bias": "blob"})


@pytest.mark.parametrize("name", ["implicit-volume", "implicit-sdf"])
def test_old_implementation_key_says_it_is_now_backend(name):
    with pytest.raises(ConfigError, match=r"'geometry\.implementation'.* renamed to 'backend'; write 'backend: torch' "
                                          r"\(one of 'auto', 'torch', 'tcnn'\)"):
        find(name)({"implementation": "torch"}, cfg_key="geometry")
    with pytest.raises(ConfigError, match=r"expected one of 'auto', 'torch', 'tcnn'"):
        find(name)({"backend": "cuda"})


@pytest.mark.parametrize("bias", ["blob_magic3d", "blob_dreamfusion", 2.0])
def test_density_is_activated_bias_at_init(bias):
    g = make(density_bias=bias, density_blob_scale=6.0, density_blob_std=0.4)
    p = torch.tensor([[0.0, 0.0, 0.0], [0.2, 0.0, 0.0], [0.0, 0.7, 0.1]])
    r = p.norm(dim=-1, keepdim=True)
    if bias == "blob_magic3d":
        b = 6.0 * (1 - r / 0.4)
    elif bias == "blob_dreamfusion":
        b = 6.0 * torch.exp(-0.5 * r**2 / 0.4**2)
    else:
        b = torch.full_like(r, 2.0)
    out = g(p)
    assert out["density"].shape == (3, 1) and out["features"].shape == (3, 3)
    assert torch.all(out["density"] >= 0)
    # Bias-free MLPs on a ~1e-4 table: raw density ~ 0, so density ~ exp(bias - 1).
    torch.testing.assert_close(out["density"], torch.exp(b - 1.0), rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("normal_type", ["finite_difference", "finite_difference_forward", "analytic"])
def test_normals_point_outward_of_the_blob(normal_type):
    g = make(normal_type=normal_type)
    p = F.normalize(torch.randn(64, 3), dim=-1) * 0.3
    out = g(p, output_normal=True)
    n = out["normal"]
    torch.testing.assert_close(n.norm(dim=-1), torch.ones(64), atol=1e-4, rtol=0)
    cos = (n * F.normalize(p, dim=-1)).sum(-1)
    assert cos.min() > 0.98
    assert torch.equal(out["shading_normal"], n)


def test_analytic_normals_carry_gradients_in_training_and_not_in_eval():
    g = make(normal_type="analytic")
    p = torch.rand(32, 3) - 0.5
    out = g(p, output_normal=True)
    (out["normal"][:, 0].sum()).backward()
    assert g.encoding.embeddings.grad is not None and g.encoding.embeddings.grad.abs().sum() > 0
    with torch.no_grad():
        out = g(p, output_normal=True)
    assert not out["normal"].requires_grad and not out["density"].requires_grad


def test_pred_normals_are_unit():
    g = make(normal_type="pred")
    n = g(torch.rand(10, 3), output_normal=True)["normal"]
    torch.testing.assert_close(n.norm(dim=-1), torch.ones(10))


def test_isosurface_of_blob_is_the_expected_sphere():
    # exp(10 (1 - r / 0.5) - 1) = 1  <=>  r = 0.45
    g = make(isosurface_threshold=1.0, isosurface_resolution=40)
    mesh = g.isosurface()
    r = mesh.v_pos.norm(dim=-1)
    assert abs(float(r.mean()) - 0.45) < 0.01 and float(r.std()) < 0.01
    centroids = mesh.v_pos[mesh.t_pos_idx].mean(1)
    assert (mesh.face_normals() * F.normalize(centroids, dim=-1)).sum(-1).min() > 0.5  # outward
    # "auto" always yields a surface; an impossible threshold raises a helpful error.
    g.cfg.isosurface_threshold = "auto"
    assert g.isosurface().n_faces > 0
    g.cfg.isosurface_threshold = 1e9
    with pytest.raises(IsosurfaceError, match="threshold"):
        g.isosurface()


def test_forward_level_sign_and_export_attributes():
    g = make(isosurface_threshold=1.0)
    p = torch.tensor([[0.0, 0.0, 0.0], [0.9, 0.9, 0.9]])
    level = g.forward_level(g.forward_field(p))
    assert level[0, 0] < 0 < level[1, 0]  # negative inside
    attrs = g.export_attributes(torch.rand(7, 3))
    assert attrs["features"].shape == (7, 3)


def test_create_from_copies_weights_and_progressive_band_steps():
    g = make(pos_encoding_config={"otype": "ProgressiveBandHashGrid", "n_levels": 6, "log2_hashmap_size": 12,
                                  "start_level": 2, "start_step": 0, "update_steps": 10})
    with torch.no_grad():
        g.encoding.embeddings.uniform_(-1, 1)
    g.update_step(0, 0)
    assert g.encoding.current_level == 2
    g.update_step(0, 25)
    assert g.encoding.current_level == 4
    h = type(g).create_from(g, g.cfg)
    h.update_step(0, 25)
    p = torch.rand(5, 3)
    torch.testing.assert_close(g(p)["features"], h(p)["features"])


def test_trunc_exp_gradient_is_clamped():
    x = torch.tensor([1.0, 50.0], requires_grad=True)
    trunc_exp(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert math.isclose(float(x.grad[0]), math.e, rel_tol=1e-5)
    assert math.isclose(float(x.grad[1]), math.exp(15.0), rel_tol=1e-5)


def test_forward_differences_evaluate_half_the_points_and_agree_with_central_ones():
    calls = {}
    normals = {}
    p = F.normalize(torch.randn(64, 3), dim=-1) * 0.3
    for kind in ("finite_difference", "finite_difference_forward"):
        g = make(normal_type=kind)
        seen = []
        g.encoding.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
        out = g(p, output_normal=True)
        calls[kind], normals[kind] = sum(seen), out["normal"]
        out["normal"][:, 0].sum().backward()  # the normals carry gradients to the table
        assert g.encoding.embeddings.grad.abs().sum() > 0
    assert calls["finite_difference"] == 7 * 64 and calls["finite_difference_forward"] == 4 * 64
    cos = (normals["finite_difference"] * normals["finite_difference_forward"]).sum(-1)
    assert cos.min() > 0.99
