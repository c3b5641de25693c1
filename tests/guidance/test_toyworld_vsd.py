from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch

from conftest import tiny_system_config
from lift3d.config import ConfigError
from lift3d.data.random_cameras import RandomCameraDataModule
from lift3d.guidance.toyworld import ToyWorldGuidance, ToyWorldVSDGuidance
from lift3d.priors.toyworld.data import camera_vector
from lift3d.priors.toyworld.model import ToyWorldPrior, predict_eps_x0
from lift3d.priors.toyworld.vocab import pad_tokens, tokenize
from lift3d.registry import find
from lift3d.systems.text_to_3d import TextTo3DSystem
from lift3d.utils.checkpoint import AtomicCheckpointIO, LastCheckpoint
from tiny_prior import TINY_PRIOR as TINY
from tiny_prior import call

CAMS = dict(elevation=torch.tensor([10.0, 30.0]), azimuth=torch.tensor([0.0, 90.0]),
            camera_distances=torch.tensor([2.0, 2.0]))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    # torch's default init, unlike the SDS test's small normal one: signals (and so LoRA gradients)
    # reach every layer, the mid-block attention included.
    torch.manual_seed(0)
    return ToyWorldPrior(TINY).save(tmp_path_factory.mktemp("w") / "tiny.safetensors")


def _guidance(weights, **cfg):
    return ToyWorldVSDGuidance({"pretrained": str(weights), **cfg})


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    rgb = torch.rand(2, 16, 16, 3, generator=gen).requires_grad_(True)
    return rgb, torch.tensor([300, 700]), torch.randn(2, 3, 16, 16, generator=gen)


def _images(n=4, seed=0):
    """Smooth images in [-1, 1], [n, 3, 16, 16], with the tokens and cameras to go with them."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=gen), (16, 16), mode="bilinear") * 2 - 1
    cam = camera_vector(torch.linspace(0, 40, n), torch.linspace(-90, 90, n), torch.full((n,), 2.0))
    return x0, cam


def _tokens(n, prompt="a red cube"):
    return pad_tokens([tokenize(prompt)] * n)


def _cond(cam, prompt="a red cube"):
    """The toy adapter's conditional branch for cameras ``cam`` [n, 4]."""
    n = cam.shape[0]
    return {"tokens": _tokens(n, prompt), "camera": cam, "drop": torch.zeros(n, dtype=torch.bool)}


def _lora_state(g):
    return {n: p.detach().clone() for n, p in g.phi.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_gradient_is_exactly_zero_at_initialisation_when_scales_match(weights, scale):
    g = _guidance(weights, guidance_scale=scale, lora_guidance_scale=scale)
    rgb, t, noise = _inputs()
    out = call(g, rgb, "a red cube", **CAMS, t=t, noise=noise)
    out["loss_vsd"].backward()
    assert torch.equal(rgb.grad, torch.zeros_like(rgb)) and float(out["loss_vsd"].detach()) == 0.0
    # The forward also took a LoRA step, after scoring: now phi differs from the prior.
    rgb2 = rgb.detach().clone().requires_grad_(True)
    call(g, rgb2, "a red cube", **CAMS, t=t, noise=noise)["loss_vsd"].backward()
    assert float(rgb2.grad.abs().max()) > 0


def test_gradient_with_guidance_is_the_cfg_difference_at_initialisation(weights):
    s = 5.0
    g = _guidance(weights, guidance_scale=s, weighting="sds")
    rgb, t, noise = _inputs()
    out = call(g, rgb, "a red cube", **CAMS, t=t, noise=noise)
    out["loss_vsd"].backward()
    a = g.alphas_cumprod[t]
    x = rgb.detach().permute(0, 3, 1, 2) * 2 - 1
    x_t = a.sqrt().view(-1, 1, 1, 1) * x + (1 - a).sqrt().view(-1, 1, 1, 1) * noise
    tokens = _tokens(2)
    cam = camera_vector(CAMS["elevation"], CAMS["azimuth"], CAMS["camera_distances"])
    net = g.prior.model
    with torch.no_grad():
        e_c = predict_eps_x0(net.cfg, net(x_t, t, tokens, cam, torch.tensor([False, False])), x_t, a)[0]
        e_u = predict_eps_x0(net.cfg, net(x_t, t, tokens, cam, torch.tensor([True, True])), x_t, a)[0]
    # phi == prior: grad = w(t) (e_u + s (e_c - e_u) - e_c) = w(t) (s - 1) (e_c - e_u), w = 1 - a;
    # d loss / d x = grad / B, and x = 2 rgb - 1 doubles it for rgb.
    expected = (1 - a).view(-1, 1, 1, 1) * (s - 1) * (e_c - e_u) * 2 / rgb.shape[0]
    assert float(expected.abs().max()) > 1e-3
    # (batched and unbatched UNet passes differ in the last bits)
    atol = 1e-4 * float(expected.abs().max())
    torch.testing.assert_close(rgb.grad.permute(0, 3, 1, 2), expected, rtol=1e-4, atol=atol)


def test_lora_steps_lower_its_loss_and_train_only_lora_and_camera(weights):
    g = _guidance(weights, lora_lr=1e-2)
    x0, cam = _images()
    cond = _cond(cam)
    gen = torch.Generator().manual_seed(3)
    t, noise = torch.tensor([100, 400, 600, 900]), torch.randn(4, 3, 16, 16, generator=gen)
    frozen = {n: p.detach().clone() for n, p in g.phi.named_parameters() if not p.requires_grad}
    prior = {n: p.detach().clone() for n, p in g.prior.named_parameters()}
    lora = _lora_state(g)
    assert any("lora_B" in n for n in lora) and any("camera_mlp" in n for n in lora)
    assert not any("base_layer" in n or "text_proj" in n for n in lora)
    with torch.no_grad():
        before = float(g.lora_loss(x0, cond, t, noise))
    torch.manual_seed(0)
    mean = g.train_lora(x0, cond, n_steps=20)
    with torch.no_grad():
        after = float(g.lora_loss(x0, cond, t, noise))
    assert after < 0.93 * before and torch.isfinite(mean)
    assert g.lora_steps_taken == 20
    for n, p in g.phi.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"
    for n, p in g.prior.named_parameters():
        assert torch.equal(p, prior[n]), f"prior {n} changed"
    moved = {n for n, p in _lora_state(g).items() if not torch.equal(p, lora[n])}
    assert moved == set(lora)  # every adapter and the camera MLP took part


def test_state_dict_holds_only_lora_and_round_trips_with_the_optimizer(weights):
    x0, cam = _images(2)
    g1 = _guidance(weights)
    cond = _cond(cam)
    torch.manual_seed(1)
    g1.train_lora(x0, cond, n_steps=3)
    sd = g1.state_dict()
    tensors = {k for k, v in sd.items() if torch.is_tensor(v)}
    assert tensors == {f"phi.{n}" for n in _lora_state(g1)} and set(sd) == tensors | {"_extra_state"}
    assert sd["_extra_state"]["lora_steps_taken"] == 3

    g2 = _guidance(weights)
    g2.load_state_dict(sd)  # strict: the frozen base is not expected in it
    g3 = _guidance(weights)  # the weights without the optimizer state
    g3.load_state_dict({k: v for k, v in sd.items() if k != "_extra_state"}, strict=False)
    a = g1.alphas_cumprod[torch.tensor([300, 600])].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn_like(x0)
    with torch.no_grad():
        assert torch.equal(g1.phi.predict(x_t, torch.tensor([300, 600]), cond),
                           g2.phi.predict(x_t, torch.tensor([300, 600]), cond))
    for g in (g1, g2, g3):
        torch.manual_seed(2)
        g.train_lora(x0, cond, n_steps=1)
    s1, s2, s3 = _lora_state(g1), _lora_state(g2), _lora_state(g3)
    for n in s1:
        assert torch.equal(s1[n], s2[n]), f"{n} differs after one more step"
    assert any(not torch.equal(s1[n], s3[n]) for n in s1)  # Adam's moments matter, so they must be saved


def test_to_moves_prior_copy_and_optimizer_state(weights):
    g = _guidance(weights, guidance_scale=3.0)
    rgb, t, noise = _inputs()
    call(g, rgb, "a red cube", **CAMS, t=t, noise=noise)  # creates AdamW moments
    g.double()
    tensors = [*g.prior.parameters(), *g.phi.parameters(), g.alphas_cumprod]
    tensors += [v for st in g.lora_optimizer.state.values() for k, v in st.items() if k != "step"]
    assert all(v.dtype == torch.float64 for v in tensors)
    out = call(g, rgb.detach().double().requires_grad_(True), "a red cube", **CAMS, t=t, noise=noise.double())
    assert out["loss_vsd"].dtype == torch.float64 and torch.isfinite(out["lora_loss"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_cuda_moves_everything_and_matches_cpu(weights):
    g = _guidance(weights, guidance_scale=3.0)
    rgb, t, noise = _inputs()
    call(g, rgb, "a red cube", **CAMS, t=t, noise=noise)
    ref = copy.deepcopy(g)
    g.to("cuda")
    tensors = [*g.prior.parameters(), *g.phi.parameters(), g.alphas_cumprod]
    tensors += [v for st in g.lora_optimizer.state.values() for k, v in st.items() if k != "step"]
    assert all(v.is_cuda for v in tensors)
    cams = {k: v.cuda() for k, v in CAMS.items()}
    out = call(g, rgb.detach().cuda(), "a red cube", **cams, t=t.cuda(), noise=noise.cuda())
    out_ref = call(ref, rgb.detach(), "a red cube", **CAMS, t=t, noise=noise)
    torch.testing.assert_close(out["loss_vsd"].cpu(), out_ref["loss_vsd"], rtol=1e-3, atol=1e-6)


@pytest.mark.skipif(not hasattr(ToyWorldGuidance.Config, "image"), reason="toyworld-guidance has no image option")
def test_normal_image_mode_scores_and_fits_the_normal_map(weights):
    g = _guidance(weights, image="normal", guidance_scale=3.0)
    rgb, t, noise = _inputs()
    normal = torch.rand(2, 16, 16, 3, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    call(g, rgb, "a red cube", **CAMS, t=t, noise=noise, normal=normal)["loss_vsd"].backward()
    assert rgb.grad is None and float(normal.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="comp_normal"):
        call(g, rgb, "a red cube", **CAMS)


def test_registered_and_bad_options_name_the_key(weights):
    assert find("toyworld-vsd-guidance", "guidance") is ToyWorldVSDGuidance
    with pytest.raises(ConfigError, match="lora_rank must be a positive integer, got 0"):
        _guidance(weights, lora_rank=0)
    with pytest.raises(ConfigError, match="lora_targets entry 'conv9' .* conv1"):
        _guidance(weights, lora_targets=["conv9"])


# ---------------------------------------------------------------------------------------------
# In a system

DATA = {"height": 4, "width": 4, "eval_height": 4, "eval_width": 4, "n_val_views": 1, "n_test_views": 2}


def _system(weights):
    cfg = tiny_system_config(guidance_type="toyworld-vsd-guidance",
                             guidance={"pretrained": str(weights), "guidance_scale": 3.0, "lora_lr": 3e-3},
                             prompt_processor_type="toyworld-prompt-processor",
                             prompt_processor={"prompt": "a red cube"}, loss={"lambda_vsd": 1.0})
    return TextTo3DSystem(copy.deepcopy(cfg), seed=5)


def _fit(system, steps, tmp, ckpt=None):
    dm = RandomCameraDataModule(DATA, seed=system.seed, stage_plan=[])
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, plugins=[AtomicCheckpointIO()], callbacks=[LastCheckpoint(tmp / "ckpts", 0)],
        default_root_dir=str(tmp),
    )
    trainer.fit(system, datamodule=dm, ckpt_path=ckpt, weights_only=True)
    return trainer


def test_system_trains_the_lora_and_resumes_exactly(weights, tmp_path):
    full = _system(weights)
    init = _lora_state(full.guidance)
    trainer = _fit(full, 4, tmp_path / "full")
    assert torch.isfinite(trainer.callback_metrics["train/loss_vsd"])
    assert torch.isfinite(trainer.callback_metrics["train/lora_loss"])
    assert full.guidance.lora_steps_taken == 4
    assert all(not torch.equal(p, init[n]) for n, p in _lora_state(full.guidance).items())
    # Nothing of the guidance reaches the system's optimizer or its state dict.
    assert not any(k.startswith("guidance") for k in full.state_dict())

    _fit(_system(weights), 2, tmp_path / "part")
    resumed = _system(weights)
    _fit(resumed, 4, tmp_path / "res", ckpt=str(tmp_path / "part" / "ckpts" / "last.ckpt"))
    assert resumed.guidance.lora_steps_taken == 4
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-6, atol=1e-7, msg=f"{k} differs after resume")
    a, b = _lora_state(full.guidance), _lora_state(resumed.guidance)
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-6, atol=1e-7, msg=f"LoRA {n} differs after resume")


def test_the_lora_copy_runs_in_eval_mode_like_the_prior(weights):
    g = _guidance(weights)
    assert not g.prior.training and not g.phi.training and not any(m.training for m in g.phi.modules())
