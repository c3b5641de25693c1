"""``viewdiff-guidance`` on the tiny random ViewDiff of tiny_viewdiff.py.

The reference SDS gradient is computed here from the raw parts (the VAE, the ViewDiffUNet called
directly with cameras, intrinsics and intensities built by hand), not through the adapter.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lift3d.config import ConfigError
from lift3d.guidance.base import CameraBatch, GuidanceInput
from lift3d.registry import find
from missing_weights import build_error, empty_hub  # noqa: F401 (fixture)
from tiny_viewdiff import RESOLUTION, tiny_viewdiff  # noqa: F401 (fixture)

NAME = "viewdiff-guidance"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prompt(tiny_viewdiff):
    cfg = {"prompt": "a red cube", "negative_prompt": "blue", "pretrained_model_name_or_path": str(tiny_viewdiff[0]),
           "use_cache": False, "view_dependent_prompting": False}
    return find("stable-diffusion-prompt-processor", "prompt-processor")(cfg)()


def guidance(tiny, **over):
    cfg = {"pretrained_model_name_or_path": str(tiny[0]), "weights": str(tiny[1]), "n_views": 2,
           "guidance_scale": 7.5, "half_precision_weights": False, **over}
    return find(NAME, "guidance")(cfg).eval()


def make_input(prompt, groups=2, n_views=2, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    el = (torch.rand(groups, generator=g) * 30).repeat_interleave(n_views)
    az = torch.rand(groups, generator=g).mul(360).sub(180).repeat_interleave(n_views)
    az = torch.remainder(az + torch.arange(n_views).repeat(groups) * 360.0 / n_views + 180, 360) - 180
    cams = CameraBatch.from_angles(el, az, distance=2.5, fovy=40.0, n_views=n_views)
    rgb = torch.rand(groups * n_views, size, size, 3, generator=g).requires_grad_(True)
    return GuidanceInput(cameras=cams, rgb=rgb, prompt=prompt)


def fixed(B, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {"t": torch.tensor([300, 300, 700, 700])[:B], "noise": torch.randn(B, 4, 8, 8, generator=g)}


def test_loss_sds_is_finite_and_reaches_the_renders(tiny_viewdiff, prompt):
    g = guidance(tiny_viewdiff)
    inp = make_input(prompt)
    out = g(inp, **fixed(4))
    loss = out.losses["loss_sds"]
    assert set(out.losses) == {"loss_sds"} and loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert inp.rgb.grad is not None and float(inp.rgb.grad.abs().sum()) > 0
    assert not [p for p in g.parameters() if p.requires_grad]  # nothing of the prior trains
    assert not [k for k, v in g.state_dict().items() if torch.is_tensor(v)]  # nor enters a checkpoint
    again = guidance(tiny_viewdiff)(make_input(prompt), **fixed(4))
    assert torch.equal(again.losses["loss_sds"], loss.detach())  # deterministic given t and noise


def test_the_gradient_is_sds_of_the_viewdiff_network_called_by_hand(tiny_viewdiff, prompt):
    from lift3d.priors.viewdiff.cameras import intrinsics_from_fovy

    g = guidance(tiny_viewdiff)
    inp = make_input(prompt)
    tn = fixed(4)
    out = g(inp, **tn)
    prior = g.prior
    with torch.no_grad():
        img = F.interpolate(inp.rgb.permute(0, 3, 1, 2), (RESOLUTION, RESOLUTION), mode="bilinear",
                            align_corners=False, antialias=True)
        x = prior.vae.encode(img * 2 - 1).latent_dist.mean * prior.vae.config.scaling_factor
        a = prior.alphas_cumprod[tn["t"]].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x + (1 - a).sqrt() * tn["noise"]
        K = intrinsics_from_fovy(torch.full((4,), 40.0))
        intensity = inp.rgb.mean(dim=(1, 2, 3))
        cond, uncond = prompt.get_text_embeddings(inp.cameras.elevation, inp.cameras.azimuth, inp.cameras.distance,
                                                  view_dependent_prompting=False)
        eps = [prior.unet(x_t, tn["t"], text, inp.cameras.c2w, K, intensity, n_views=2) for text in (cond, uncond)]
        e_cfg = eps[1] + 7.5 * (eps[0] - eps[1])
        grad = (1 - a) * (e_cfg - tn["noise"])
    torch.testing.assert_close(out["grad_norm"], grad.norm(), rtol=1e-4, atol=1e-6)
    # the cameras and the intensity enter the prediction: fixing another intensity changes it
    other = guidance(tiny_viewdiff, intensity=0.95)(make_input(prompt), **tn)
    assert abs(float(other["grad_norm"]) - float(grad.norm())) > 1e-6


def test_one_timestep_per_view_group(tiny_viewdiff, prompt):
    g = guidance(tiny_viewdiff)
    torch.manual_seed(0)
    t = g(make_input(prompt, groups=3))["t"]
    assert t.shape == (6,) and all(len(set(t[2 * k: 2 * k + 2].tolist())) == 1 for k in range(3))


def test_a_batch_that_is_not_whole_view_groups_is_refused(tiny_viewdiff, prompt):
    g = guidance(tiny_viewdiff, n_views=4)
    with pytest.raises(ValueError, match=r"batch has 6 views, which is not a multiple of 4.*data\.batch_size"):
        g(make_input(prompt, groups=3, n_views=2))
    with pytest.raises(ValueError, match=r"n_views=1.*set data\.n_views: 4"):
        g(make_input(prompt, groups=4, n_views=1))


def test_it_moves_to_float64_with_its_prior(tiny_viewdiff, prompt):
    g = guidance(tiny_viewdiff).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in g.prior.parameters())
    inp = make_input(prompt)
    inp.rgb = inp.rgb.detach().double().requires_grad_(True)
    tn = {k: (v.double() if v.is_floating_point() else v) for k, v in fixed(4).items()}
    loss = g(inp, **tn).losses["loss_sds"]
    assert loss.dtype == torch.float64 and torch.isfinite(loss)


def test_the_config_is_strict(tiny_viewdiff):
    with pytest.raises(ConfigError, match="no_such_option"):
        guidance(tiny_viewdiff, no_such_option=1)
    with pytest.raises(ConfigError, match="intensity"):
        guidance(tiny_viewdiff, intensity=1.5)


# -- missing weights -------------------------------------------------------------------------------


def test_missing_weights_name_the_keys_and_the_train_command(empty_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default weights path is relative: make sure nothing is there
    msg = build_error(NAME)
    assert "system.guidance.weights" in msg and "'outputs/viewdiff/viewdiff.safetensors'" in msg
    assert "python -m lift3d.priors.viewdiff train root=" in msg
    # the base model is missing too, and said so in the same message
    assert "system.guidance.pretrained_model_name_or_path" in msg
    assert "hf download stabilityai/stable-diffusion-2-1-base" in msg


def test_weights_that_are_not_viewdiffs_are_explained(tiny_viewdiff, tmp_path):
    from safetensors.torch import save_file

    cls = find(NAME, "guidance")
    base = str(tiny_viewdiff[0])
    assert cls.missing_weights(cls.Config(pretrained_model_name_or_path=base, weights=str(tiny_viewdiff[1]))) is None
    # a folder holding viewdiff.safetensors (train's out_dir) is accepted too
    assert cls.missing_weights(cls.Config(pretrained_model_name_or_path=base,
                                          weights=str(tiny_viewdiff[1].parent))) is None
    other = tmp_path / "lora.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    msg = cls.missing_weights(cls.Config(pretrained_model_name_or_path=base, weights=str(other)))
    assert "holds no ViewDiff weights" in msg and "system.guidance.weights" in msg


def test_the_recipe_without_its_weights_stops_at_start_up(empty_hub, tmp_path, tiny_viewdiff, capsys):
    from lift3d.launch import main

    with pytest.raises(SystemExit) as ex:
        main(["--config", str(REPO / "configs" / "viewdiff.yaml"), "--train", f"exp_root_dir={tmp_path / 'out'}",
              f"sd_model={tiny_viewdiff[0]}", f"system.guidance.weights={tmp_path / 'absent.safetensors'}"])
    err = capsys.readouterr().err
    assert ex.value.code == 2
    assert "system.guidance.weights" in err and "python -m lift3d.priors.viewdiff train" in err
    assert not (tmp_path / "out").exists()
