"""zero123-guidance and stable-zero123-guidance on a tiny random Zero123 (tests/guidance/tiny_zero123.py).

Reference values are computed here from the raw networks, not through the adapter, and the
original-layout key map is checked against implementations that are not ours: diffusers' own ldm
converter (UNet, moving average, VAE), a plain-torch OpenAI CLIP image tower (CLIP) and Zero123's
own cartesian-to-spherical formula (the camera numbers).
"""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lift3d.config import ConfigError
from lift3d.guidance.base import CameraBatch, GuidanceInput
from lift3d.guidance.zero123 import camera_vector
from lift3d.priors.zero123 import (Architecture, CheckpointLayoutError, load_original, main as convert_main,
                                          read_state_dict)
from lift3d.registry import find
from lift3d.utils.hub import MissingWeightsError
from tiny_zero123 import (CKPT, LATENT_SIZE, RESOLUTION, STABLE_CKPT, original_checkpoint, tiny_networks,  # noqa: F401
                          tiny_zero123)

REPO = Path(__file__).resolve().parents[2]
KEY = "system.guidance.pretrained_model_name_or_path"


def guidance(path, name="zero123-guidance", **over):
    cfg = {"pretrained_model_name_or_path": str(path), "half_precision_weights": False, **over}
    return find(name, "guidance")(cfg).eval()


def from_ckpt(folder, file=CKPT, name="zero123-guidance", **over):
    """The guidance on an original-layout file of the tiny model (its architecture from the folder's configs)."""
    return guidance(Path(folder) / file, name, original_architecture=str(folder), **over)


def make_input(B=2, size=12, seed=0, cond_elevation=0.0):
    g = torch.Generator().manual_seed(seed)
    cams = CameraBatch.from_angles(torch.tensor([10.0, 35.0][:B]), torch.tensor([40.0, -120.0][:B]),
                                   torch.tensor([2.0, 2.3][:B]))
    rgb = torch.rand(B, size, size, 3, generator=g).requires_grad_(True)
    cond = torch.rand(1, 20, 20, 3, generator=g)
    return GuidanceInput(cameras=cams, rgb=rgb, cond_image=cond, cond_mask=torch.ones(1, 20, 20, 1),
                         cond_cameras=CameraBatch.from_angles([cond_elevation], [0.0], [2.0]))


def fixed(B=2):
    g = torch.Generator().manual_seed(7)
    return torch.tensor([300, 700][:B]), torch.randn(B, 4, LATENT_SIZE, LATENT_SIZE, generator=g)


def states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def raw_embeddings(prior, inp, mode="relative"):
    """The conditional branch from the raw networks: projected [CLIP embedding, camera] and the image's latent mode."""
    img = F.interpolate(inp.cond_image.permute(0, 3, 1, 2), (RESOLUTION, RESOLUTION), mode="bilinear",
                        align_corners=False, antialias=True)
    latent = prior.vae.encode(img * 2 - 1).latent_dist.mode()
    size = prior.image_encoder.config.image_size
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    pix = (F.interpolate(img, (size, size), mode="bicubic", align_corners=True) - mean) / std
    clip = prior.image_encoder(pixel_values=pix).image_embeds
    c, r = inp.cameras, inp.cond_cameras
    T = camera_vector(c.elevation, c.azimuth, c.distance, r.elevation, r.azimuth, r.distance, mode)
    B = len(c)
    token = prior.projection(torch.cat([clip.expand(B, -1), T], -1))[:, None]
    return token, latent.expand(B, -1, -1, -1)


# -- loading: both layouts, the key map checked both ways ------------------------------------------


def test_both_layouts_load_the_same_networks_and_score_alike(tiny_zero123):
    folder = guidance(tiny_zero123)
    as_file = from_ckpt(tiny_zero123)
    in_folder = guidance(tiny_zero123, checkpoint_file=CKPT, original_architecture=str(tiny_zero123))
    for other in (as_file, in_folder):
        for net in ("unet", "vae", "image_encoder", "projection"):
            assert states_equal(getattr(folder.prior, net), getattr(other.prior, net)), net
        torch.testing.assert_close(other.prior.alphas_cumprod, folder.prior.alphas_cumprod)
    t, noise = fixed()
    outs, grads = [], []
    for g in (folder, as_file):
        inp = make_input()
        loss = g(inp, t=t, noise=noise).losses["loss_sds"]
        outs.append(loss)
        grads.append(torch.autograd.grad(loss, inp.rgb)[0])
    assert outs[0] > 0 and grads[0].abs().max() > 0
    assert torch.equal(outs[0], outs[1])
    # The gradients agree to float32 round-off, not bit for bit: in a fresh install of 2026-12-08
    # the two paths' backward passes differed by 1.4e-7 on gradients up to 0.16
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_the_key_map_agrees_with_diffusers_own_ldm_converter(tiny_zero123):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    nets = tiny_networks()
    state = torch.load(tiny_zero123 / CKPT, weights_only=True)["state_dict"]
    for ema in (False, True):
        # Our file holds the UNet twice; diffusers reads the moving-average copy when asked.
        unet = convert_ldm_unet_checkpoint(state, dict(nets["unet"].config), extract_ema=ema)
        want = nets["unet"].state_dict()
        assert unet.keys() == want.keys() and all(torch.equal(unet[k], want[k]) for k in want)
    vae = convert_ldm_vae_checkpoint(state, dict(nets["vae"].config))
    want = nets["vae"].state_dict()
    assert vae.keys() == want.keys()
    assert all(torch.equal(vae[k].reshape(want[k].shape), want[k]) for k in want)


def test_the_published_architecture_maps_to_the_released_checkpoints_names_and_shapes():
    """Names and shapes of Stable Diffusion 1.x / Zero123 ldm checkpoints, written out by hand: the
    upsamplers ride in slot 2 of output blocks with attention and slot 1 without, the decoder counts
    its levels from the bottom, CLIP's projection is stored transposed. Built on the meta device."""
    pytest.importorskip("accelerate")  # empty (meta) weights: the real sizes cost no memory
    from lift3d.priors.zero123 import build_networks, original_state_dict

    nets = build_networks(Architecture.published(), 772)
    assert nets["unet"].conv_in.weight.is_meta
    names = {k: tuple(v.shape) for k, v in original_state_dict(**nets).items()}
    d, f, v = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.model.visual."
    want = {
        d + "input_blocks.0.0.weight": (320, 8, 3, 3), d + "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        d + "input_blocks.9.0.op.weight": (1280, 1280, 3, 3), d + "time_embed.0.weight": (1280, 320),
        d + "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        d + "middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
        d + "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        d + "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3), d + "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        d + "output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
        d + "out.2.weight": (4, 320, 3, 3),
        f + "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        f + "encoder.mid.attn_1.q.weight": (512, 512, 1, 1), f + "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        f + "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        f + "quant_conv.weight": (8, 8, 1, 1),
        v + "conv1.weight": (1024, 3, 14, 14), v + "positional_embedding": (257, 1024), v + "class_embedding": (1024,),
        v + "transformer.resblocks.23.attn.in_proj_weight": (3072, 1024), v + "proj": (1024, 768),
        "cc_projection.weight": (768, 772),
    }
    assert {k: names.get(k) for k in want} == want
    for absent in (d + "output_blocks.5.1.conv.weight", d + "input_blocks.12.0.op.weight",
                   f + "decoder.up.0.upsample.conv.weight", f + "encoder.down.3.downsample.conv.weight"):
        assert absent not in names


def test_the_clip_tower_matches_openai_clip_computed_by_hand(tiny_zero123):
    """OpenAI's VisionTransformer written out from the checkpoint's ``visual.*`` tensors (fused attention
    projections, ``x @ proj``, QuickGELU) against the loaded transformers model."""
    state = torch.load(tiny_zero123 / CKPT, weights_only=True)["state_dict"]
    v = {k[len("cond_stage_model.model.visual."):]: t for k, t in state.items()
         if k.startswith("cond_stage_model.model.visual.")}
    encoder = from_ckpt(tiny_zero123).prior.image_encoder
    heads, width = encoder.config.num_attention_heads, v["class_embedding"].shape[0]
    pix = torch.randn(2, 3, 14, 14, generator=torch.Generator().manual_seed(1))
    ln = lambda x, n: F.layer_norm(x, (width,), v[f"{n}.weight"], v[f"{n}.bias"], 1e-5)  # noqa: E731
    x = F.conv2d(pix, v["conv1.weight"], stride=v["conv1.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([v["class_embedding"].expand(2, 1, width), x], dim=1) + v["positional_embedding"]
    x = ln(x, "ln_pre")
    n_layers = len({k.split(".")[2] for k in v if k.startswith("transformer.resblocks.")})
    for i in range(n_layers):
        p = f"transformer.resblocks.{i}"
        attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        attn.load_state_dict({"in_proj_weight": v[f"{p}.attn.in_proj_weight"],
                              "in_proj_bias": v[f"{p}.attn.in_proj_bias"],
                              "out_proj.weight": v[f"{p}.attn.out_proj.weight"],
                              "out_proj.bias": v[f"{p}.attn.out_proj.bias"]})
        h = ln(x, f"{p}.ln_1")
        x = x + attn(h, h, h, need_weights=False)[0]
        h = F.linear(ln(x, f"{p}.ln_2"), v[f"{p}.mlp.c_fc.weight"], v[f"{p}.mlp.c_fc.bias"])
        x = x + F.linear(h * torch.sigmoid(1.702 * h), v[f"{p}.mlp.c_proj.weight"], v[f"{p}.mlp.c_proj.bias"])
    want = ln(x[:, 0], "ln_post") @ v["proj"]
    with torch.no_grad():
        got = encoder(pixel_values=pix).image_embeds
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_moving_average_is_preferred_when_present(tiny_zero123):
    nets = tiny_networks()
    state = original_checkpoint(nets)["state_dict"]
    for k in [k for k in state if k.startswith("model.diffusion_model.")]:
        state[k] = state[k] + 1.0  # raw weights differ from the average
    arch = Architecture.from_folder(tiny_zero123)
    ema = load_original("mem.ckpt", arch, state=state)
    raw = load_original("mem.ckpt", arch, state=state, prefer_ema=False)
    assert ema.used_ema and not raw.used_ema
    assert states_equal(ema.unet, nets["unet"])
    shifted = {k: v + 1.0 for k, v in nets["unet"].state_dict().items()}
    assert all(torch.equal(raw.unet.state_dict()[k], shifted[k]) for k in shifted)
    # Without a moving average the raw weights are read, whatever prefer_ema says.
    plain = original_checkpoint(nets, ema=False)["state_dict"]
    only = load_original("mem.ckpt", arch, state=plain)
    assert not only.used_ema and states_equal(only.unet, nets["unet"])


def test_a_checkpoint_key_the_map_does_not_place_is_an_error_naming_it(tiny_zero123):
    state = original_checkpoint(tiny_networks())["state_dict"]
    state["model.diffusion_model.extra_block.weight"] = torch.zeros(3)
    state["first_stage_model.loss.logvar"] = torch.zeros(())
    with pytest.raises(CheckpointLayoutError, match="does not place") as exc:
        load_original("odd.ckpt", Architecture.from_folder(tiny_zero123), state=state, prefer_ema=False)
    assert "model.diffusion_model.extra_block.weight" in str(exc.value)
    assert "first_stage_model.loss.logvar" in str(exc.value)


def test_a_parameter_left_unfilled_is_an_error_naming_it(tiny_zero123):
    state = original_checkpoint(tiny_networks())["state_dict"]
    del state["cc_projection.bias"]
    del state["model_ema.diffusion_modelout2weight"]
    with pytest.raises(CheckpointLayoutError, match="unfilled") as exc:
        load_original("short.ckpt", Architecture.from_folder(tiny_zero123), state=state)
    msg = str(exc.value)
    assert "projection.proj.bias (from cc_projection.bias)" in msg
    assert "unet.conv_out.weight (from model_ema.diffusion_modelout2weight)" in msg


def test_tensors_of_another_shape_are_an_error_naming_them(tiny_zero123):
    state = original_checkpoint(tiny_networks())["state_dict"]
    state["first_stage_model.quant_conv.weight"] = torch.zeros(8, 4, 1, 1)
    with pytest.raises(CheckpointLayoutError, match="first_stage_model.quant_conv.weight"):
        load_original("big.ckpt", Architecture.from_folder(tiny_zero123), state=state)
    # Read as the published architecture, the tiny checkpoint lacks most of its parameters.
    with pytest.raises(CheckpointLayoutError, match="unfilled"):
        load_original("tiny.ckpt", None, state=original_checkpoint(tiny_networks())["state_dict"])


_UNPICKLED: list[str] = []


def _record(what: str) -> str:
    _UNPICKLED.append(what)
    return what


class _Payload:
    """An object whose unpickling is visible: it calls _record."""

    def __reduce__(self):
        return (_record, ("unpickled",))


def test_a_checkpoint_holding_pickled_objects_is_refused_with_the_converter_command(tiny_zero123, tmp_path):
    _UNPICKLED.clear()
    path = tmp_path / "lightning.ckpt"
    ckpt = torch.load(tiny_zero123 / CKPT, weights_only=True)
    torch.save({**ckpt, "hyper_parameters": _Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)

    cls = find("zero123-guidance", "guidance")
    cfg = {"pretrained_model_name_or_path": str(path), "original_architecture": str(tiny_zero123)}
    msg = cls.missing_weights(cls.Config(**cfg))  # the start-up check
    assert msg and "python -m lift3d.priors.zero123 convert" in msg and "--trust-pickle" in msg and str(path) in msg
    with pytest.raises(ConfigError, match="python -m lift3d.priors.zero123 convert"):
        guidance(path, original_architecture=str(tiny_zero123))
    with pytest.raises(CheckpointLayoutError, match="pickled"):
        read_state_dict(path)
    out = tmp_path / "lightning.safetensors"
    assert convert_main(["convert", str(path), str(out)]) == 2  # refuses without --trust-pickle
    assert not out.exists()
    assert _UNPICKLED == []  # nothing above unpickled the object

    assert convert_main(["convert", str(path), str(out), "--trust-pickle"]) == 0
    assert _UNPICKLED == ["unpickled"]  # the explicit flag did
    converted = guidance(out, original_architecture=str(tiny_zero123))
    assert cls.missing_weights(cls.Config(**{**cfg, "pretrained_model_name_or_path": str(out)})) is None
    assert states_equal(converted.prior.unet, guidance(tiny_zero123).prior.unet)


def test_the_converter_runs_as_a_module(tiny_zero123, tmp_path):
    out = tmp_path / "copy.safetensors"
    command = [sys.executable, "-m", "lift3d.priors.zero123", "convert", str(tiny_zero123 / CKPT), str(out)]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert read_state_dict(out).keys() == read_state_dict(tiny_zero123 / CKPT).keys()


def test_missing_weights_name_the_key_and_the_download(tmp_path, monkeypatch, tiny_zero123):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    for name, repo in (("zero123-guidance", "bennyguo/zero123-xl-diffusers"),
                       ("stable-zero123-guidance", "stabilityai/stable-zero123")):
        cls = find(name, "guidance")
        msg = cls.missing_weights(cls.Config())
        assert KEY in msg and repr(repo) in msg and f"hf download {repo}" in msg
        with pytest.raises(MissingWeightsError, match=KEY):
            cls({})
    # A folder in neither layout: what it lacks, and its checkpoints.
    half = tmp_path / "half"
    half.mkdir()
    (half / "zero123-xl.ckpt").write_bytes(b"")
    with pytest.raises(MissingWeightsError, match="clip_camera_projection") as exc:
        guidance(half)
    assert "zero123-xl.ckpt" in str(exc.value) and "checkpoint_file" in str(exc.value)
    with pytest.raises(MissingWeightsError, match="lacks nothing.ckpt"):
        guidance(tiny_zero123, checkpoint_file="nothing.ckpt")
    with pytest.raises(MissingWeightsError, match="no such file"):
        guidance(tmp_path / "moved" / "zero123-xl.ckpt")


# -- cameras ------------------------------------------------------------------------------------------


def test_camera_numbers_on_known_poses():
    def vec(el, az, dist, cel=0.0, caz=0.0, cdist=2.0, mode="relative"):
        t = lambda v: torch.tensor([float(v)])  # noqa: E731
        return camera_vector(t(el), t(az), t(dist), t(cel), t(caz), t(cdist), mode)[0]

    close = lambda a, b: torch.testing.assert_close(a, torch.tensor(b), atol=1e-6, rtol=0)  # noqa: E731
    close(vec(20, 30, 2.0, 20, 30, 2.0), [0.0, 0.0, 1.0, 0.0])  # the input view itself
    close(vec(0, 90, 2.0), [0.0, 1.0, 0.0, 0.0])  # a quarter turn towards +y
    close(vec(0, -90, 2.0), [0.0, -1.0, 0.0, 0.0])
    close(vec(0, 180, 2.0), [0.0, 0.0, -1.0, 0.0])
    close(vec(0, 170, 2.0, caz=-170), [0.0, -math.sin(math.radians(20)), math.cos(math.radians(20)), 0.0])  # wraps
    close(vec(30, 0, 2.0), [-math.pi / 6, 0.0, 1.0, 0.0])  # higher than the input: the polar angle shrinks
    close(vec(-15, 0, 2.0, cel=15), [math.pi / 6, 0.0, 1.0, 0.0])
    close(vec(0, 0, 2.5), [0.0, 0.0, 1.0, 0.5])  # farther away
    # Stable Zero123: the input view's polar angle instead of the distance change.
    close(vec(20, 30, 2.0, 20, 30, 2.0, mode="stable"), [0.0, 0.0, 1.0, math.radians(70)])
    close(vec(0, 90, 3.0, cel=5, mode="stable"), [math.radians(5), 1.0, 0.0, math.radians(85)])


def test_camera_numbers_match_zero123s_own_formula_on_lift3d_cameras():
    """Zero123's data code takes camera positions, converts them to (polar from +z, atan2(y, x), radius)
    and subtracts; here the positions are those of lift3d's own camera matrices."""

    def spherical(xyz):  # Zero123's cartesian_to_spherical
        xy = xyz[:, 0] ** 2 + xyz[:, 1] ** 2
        return np.arctan2(np.sqrt(xy), xyz[:, 2]), np.arctan2(xyz[:, 1], xyz[:, 0]), np.sqrt(xy + xyz[:, 2] ** 2)

    g = torch.Generator().manual_seed(3)
    el, az = torch.rand(16, generator=g) * 140 - 70, torch.rand(16, generator=g) * 360 - 180
    dist = 1.5 + torch.rand(16, generator=g)
    cel, caz, cdist = torch.tensor([12.0]), torch.tensor([-40.0]), torch.tensor([1.8])
    cams = CameraBatch.from_angles(el, az, dist)
    ref = CameraBatch.from_angles(cel, caz, cdist)
    th_t, az_t, r_t = spherical(cams.c2w[:, :3, 3].double().numpy())
    th_c, az_c, r_c = spherical(ref.c2w[:, :3, 3].double().numpy())
    d_az = (az_t - az_c) % (2 * np.pi)
    want = np.stack([th_t - th_c, np.sin(d_az), np.cos(d_az), r_t - r_c], axis=-1)
    got = camera_vector(cams.elevation, cams.azimuth, cams.distance, ref.elevation, ref.azimuth, ref.distance)
    np.testing.assert_allclose(got.double().numpy(), want, atol=2e-5)


# -- the conditioning and classifier-free guidance --------------------------------------------------


@pytest.mark.parametrize("name,mode", [("zero123-guidance", "relative"), ("stable-zero123-guidance", "stable")])
def test_the_unet_sees_the_image_and_camera_conditionally_and_zeros_unconditionally(tiny_zero123, name, mode):
    g = from_ckpt(tiny_zero123, STABLE_CKPT if mode == "stable" else CKPT, name)
    prior = g.prior
    seen = {}

    def hook(module, args, kwargs):
        seen["sample"], seen["tokens"] = args[0].clone(), kwargs["encoder_hidden_states"].clone()

    handle = prior.unet.register_forward_pre_hook(hook, with_kwargs=True)
    inp = make_input(cond_elevation=5.0)
    t, noise = fixed()
    try:
        x, t, noise, a, x_t, conds = g.noised(inp, t, noise)
        with torch.no_grad():
            g.guided(x_t, t, conds, 3.0)
    finally:
        handle.remove()
    with torch.no_grad():
        token, latent = raw_embeddings(prior, inp, mode)
    sample, tokens = seen["sample"], seen["tokens"]
    assert sample.shape == (4, 8, LATENT_SIZE, LATENT_SIZE) and tokens.shape == (4, 1, 16)
    torch.testing.assert_close(sample[:2, :4], x_t)  # the noisy latent first, in both branches
    torch.testing.assert_close(sample[2:, :4], x_t)
    torch.testing.assert_close(sample[:2, 4:], latent, rtol=1e-5, atol=1e-6)  # the image's unscaled mode
    torch.testing.assert_close(tokens[:2], token, rtol=1e-5, atol=1e-6)
    assert latent.abs().max() > 0 and token.abs().max() > 0
    assert torch.count_nonzero(sample[2:, 4:]) == 0 and torch.count_nonzero(tokens[2:]) == 0  # unconditional: zeros
    # The camera it was told: the change of view, and for Stable Zero123 the input's polar angle.
    cams = inp.cameras
    last = (cams.distance - 2.0) if mode == "relative" else torch.full((2,), math.radians(85.0))
    want = torch.stack([torch.deg2rad(5.0 - cams.elevation), torch.sin(torch.deg2rad(cams.azimuth)),
                        torch.cos(torch.deg2rad(cams.azimuth)), last], -1)
    torch.testing.assert_close(conds.cond["camera"], want)


def test_sds_gradient_is_the_weighted_guided_residual_pulled_back_through_the_encoder(tiny_zero123):
    scale = 4.0
    g = guidance(tiny_zero123, guidance_scale=scale)
    prior = g.prior
    inp = make_input()
    t, noise = fixed()
    got, = torch.autograd.grad(g(inp, t=t, noise=noise).losses["loss_sds"], inp.rgb)

    img = F.interpolate(inp.rgb.permute(0, 3, 1, 2), (RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)
    lat = prior.vae.encode(img * 2 - 1).latent_dist.mean * prior.vae.config.scaling_factor
    a = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        token, image_latent = raw_embeddings(prior, inp)
        x_t = a.sqrt() * lat + (1 - a).sqrt() * noise
        e_c = prior.unet(torch.cat([x_t, image_latent], 1), t, encoder_hidden_states=token).sample
        e_u = prior.unet(torch.cat([x_t, torch.zeros_like(image_latent)], 1), t,
                         encoder_hidden_states=torch.zeros_like(token)).sample
        residual = (1 - a) * (e_u + scale * (e_c - e_u) - noise)
    want, = torch.autograd.grad(lat, inp.rgb, grad_outputs=residual / 2)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_the_working_resolution_comes_from_the_model_config(tiny_zero123):
    g = guidance(tiny_zero123)
    assert g.resolution == (RESOLUTION, RESOLUTION) == (16, 16)  # sample_size 8 times the VAE's factor 2
    x = g.prior.encode(torch.rand(3, 40, 24, 3))
    assert x.shape == (3, 4, LATENT_SIZE, LATENT_SIZE)


def test_the_input_image_is_embedded_once_while_it_stays_the_same(tiny_zero123):
    g = guidance(tiny_zero123)
    calls = []
    handle = g.prior.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    t, noise = fixed()
    try:
        first = g(make_input(seed=0), t=t, noise=noise).losses["loss_sds"]
        again = g(make_input(seed=0), t=t, noise=noise).losses["loss_sds"]  # equal tensors, fresh objects
        assert len(calls) == 1 and torch.equal(first, again)
        g(make_input(seed=1), t=t, noise=noise)  # another image
        assert len(calls) == 2
    finally:
        handle.remove()


def test_without_the_input_image_the_error_says_which_data_module_gives_it(tiny_zero123):
    g = guidance(tiny_zero123)
    inp = make_input()
    inp.cond_image = None
    with pytest.raises(ValueError, match="single-image-datamodule"):
        g(inp)
    assert "cond_image" in find("zero123-guidance").requires(g.cfg)
