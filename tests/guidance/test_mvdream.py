"""MVDream: the key map, the multi-view network, the camera convention and ``mvdream-guidance``, on
the tiny random checkpoint of tests/guidance/tiny_mvdream.py (original LDM key layout).

References are computed here from the raw networks and tensors (the source models the checkpoint
was written from, the original-layout tensors, a hand-written OpenCLIP block, MVDream's camera
construction), not through the code under test.
"""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lift3d.guidance.base import CameraBatch, GuidanceInput
from lift3d.priors.mvdream.cameras import mvdream_azimuth, mvdream_camera
from lift3d.priors.mvdream.checkpoint import (
    SCALING_FACTOR,
    CheckpointLayoutError,
    MVDreamArch,
    TextArch,
    VaeArch,
    build_key_map,
    build_models,
    infer_architecture,
    load_mvdream,
    to_original,
)
from lift3d.priors.mvdream.network import SD15_UNET, SD21_BASE_UNET, MultiViewAttnProcessor
from lift3d.registry import find
from missing_weights import build_error, empty_hub  # noqa: F401 (fixture)
from tiny_mvdream import (  # noqa: F401 (fixtures)
    LATENT_SIZE,
    RESOLUTION,
    TINY_ARCH,
    TINY_ARCH_V15,
    original_state,
    tiny_mvdream,
    tiny_mvdream_v15,
)

NAME = "mvdream-guidance"
REPO = Path(__file__).resolve().parents[2]
U = "model.diffusion_model."


@pytest.fixture(scope="module")
def source():
    """(original-layout tensors, the networks they were written from): the same seed as the file."""
    return original_state(seed=0)


@pytest.fixture(scope="module")
def loaded(tiny_mvdream):
    return load_mvdream(tiny_mvdream, image_size=RESOLUTION)


@pytest.fixture(scope="module")
def prompt(tiny_mvdream):
    cfg = {"prompt": "a red cube", "negative_prompt": "blue", "pretrained_model_name_or_path": str(tiny_mvdream),
           "use_cache": False}
    return find("mvdream-prompt-processor", "prompt-processor")(cfg)()


def guidance(path, **over):
    return find(NAME, "guidance")({"pretrained_model_name_or_path": str(path), "image_size": RESOLUTION, **over}).eval()


def make_input(prompt, groups=2, n_views=4, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    el = (torch.rand(groups, generator=g) * 30).repeat_interleave(n_views)
    az = torch.rand(groups, generator=g).mul(360).sub(180).repeat_interleave(n_views)
    az = torch.remainder(az + torch.arange(n_views).repeat(groups) * 360.0 / n_views + 180, 360) - 180
    cams = CameraBatch.from_angles(el, az, distance=2.5, n_views=n_views)
    rgb = torch.rand(groups * n_views, size, size, 3, generator=g).requires_grad_(True)
    return GuidanceInput(cameras=cams, rgb=rgb, prompt=prompt)


def close(got, want, rel=1e-4):
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * float(want.abs().max()))


def params_of(models, part):
    m = models[part]
    return dict((m.unet if part == "unet" else m).state_dict())


# -- the key map ------------------------------------------------------------------------------------


def test_key_map_round_trip_fills_every_parameter_with_its_source_tensor(loaded, source):
    state, models = source
    for part, got in (("unet", loaded.unet.unet), ("vae", loaded.vae), ("text", loaded.text_encoder)):
        want = params_of(models, part)
        have = dict(got.state_dict())
        assert set(have) == set(want), part
        for k, v in want.items():
            assert torch.equal(have[k], v), f"{part}.{k}"
    # The file holds the original names, the text tower's fused projection included.
    assert f"{U}input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in state
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in state
    assert not any(k.startswith(("unet.", "class_embedding", "down_blocks")) for k in state)
    torch.testing.assert_close(loaded.alphas_cumprod, state["alphas_cumprod"])


def test_a_safetensors_file_with_the_same_keys_loads_the_same(source, loaded, tmp_path):
    from safetensors.torch import save_file

    state, _ = source
    path = tmp_path / "mvdream.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    other = load_mvdream(path, parts=("unet",), image_size=RESOLUTION)
    for k, v in loaded.unet.state_dict().items():
        assert torch.equal(other.unet.state_dict()[k], v), k


def test_the_architecture_is_read_off_the_shapes(source):
    state, _ = source
    arch = infer_architecture({k: tuple(v.shape) for k, v in state.items()}, image_size=RESOLUTION)
    assert arch == TINY_ARCH


def _key_map_filling_every_parameter(arch):
    """The networks of ``arch`` (on the meta device), their state dicts and the key map, checked to fill every
    parameter."""
    models = build_models(arch)
    tensors = {p: dict((m.unet if p == "unet" else m).state_dict()) for p, m in models.items()}
    km = build_key_map(arch, {p: set(t) for p, t in tensors.items()})
    for part, t in tensors.items():
        filled = {tg.key for tgs in km.targets.values() for tg in tgs if tg.part == part}
        assert set(t) - filled == set(), part
    return models, tensors, km


def test_the_published_layout_maps_to_diffusers_names_and_keeps_the_camera_mlp():
    """SD 2.1-base's architecture, built on the meta device (no weights): the map covers every
    parameter, places the well-known LDM names where diffusers keeps them, and the original-layout
    shapes it implies are read back as the same architecture."""
    arch = MVDreamArch(unet=SD21_BASE_UNET, vae=VaeArch(), text=TextArch())
    models, tensors, km = _key_map_filling_every_parameter(arch)
    where = {k: [(tg.part, tg.key) for tg in v] for k, v in km.targets.items()}
    assert where[f"{U}camera_embed.0.weight"] == [("unet", "class_embedding.linear_1.weight")]
    assert where[f"{U}camera_embed.2.bias"] == [("unet", "class_embedding.linear_2.bias")]
    assert where[f"{U}input_blocks.3.0.op.weight"] == [("unet", "down_blocks.0.downsamplers.0.conv.weight")]
    assert where[f"{U}input_blocks.4.0.skip_connection.weight"] == [
        ("unet", "down_blocks.1.resnets.0.conv_shortcut.weight")]
    assert where[f"{U}middle_block.1.proj_in.weight"] == [("unet", "mid_block.attentions.0.proj_in.weight")]
    # the deepest level has no attention: its upsampler is the block's second module, later ones' third
    assert where[f"{U}output_blocks.2.1.conv.weight"] == [("unet", "up_blocks.0.upsamplers.0.conv.weight")]
    assert where[f"{U}output_blocks.5.2.conv.weight"] == [("unet", "up_blocks.1.upsamplers.0.conv.weight")]
    assert where[f"{U}output_blocks.11.1.proj_out.weight"] == [("unet", "up_blocks.3.attentions.2.proj_out.weight")]
    assert where["first_stage_model.decoder.up.3.upsample.conv.weight"] == [
        ("vae", "decoder.up_blocks.0.upsamplers.0.conv.weight")]
    qkv = where["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"]
    assert [k.rsplit(".", 2)[-2] for _, k in qkv] == ["q_proj", "k_proj", "v_proj"]
    assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in km.unused  # penultimate
    # SD 2.1's UNet (865,910,724 parameters) plus MVDream's camera MLP, 16 -> 1280 -> 1280.
    n_unet = sum(p.numel() for p in models["unet"].parameters())
    assert n_unet == 865_910_724 + (16 * 1280 + 1280) + (1280 * 1280 + 1280)
    shapes = {k: tuple(v.shape) for k, v in to_original(km, tensors).items()}
    shapes.update({k: (1024,) for k in km.unused if ".resblocks.23." in k})  # any shape: only their names count
    assert infer_architecture(shapes) == arch


def test_a_key_the_map_does_not_place_is_an_error_naming_it(source):
    state, _ = source
    extra = {**state, f"{U}extra_head.weight": torch.zeros(3), "model_ema.decay": torch.tensor(0.99)}
    with pytest.raises(CheckpointLayoutError) as info:
        load_mvdream("tiny.pt", parts=("unet",), image_size=RESOLUTION, state=extra)
    msg = str(info.value)
    assert "2 key(s)" in msg and f"{U}extra_head.weight" in msg and "model_ema.decay" in msg


def test_a_missing_key_is_an_error_naming_the_parameter_and_the_key(source):
    state, _ = source
    gone = f"{U}output_blocks.1.0.in_layers.2.weight"
    partial = {k: v for k, v in state.items() if k != gone}
    with pytest.raises(CheckpointLayoutError) as info:
        load_mvdream("tiny.pt", parts=("unet",), image_size=RESOLUTION, state=partial)
    msg = str(info.value)
    assert "1 parameter(s) left unfilled" in msg and f"up_blocks.0.resnets.1.conv1.weight (from {gone})" in msg
    # A tensor of the wrong shape is named too.
    bad = {**state, f"{U}out.2.bias": torch.zeros(5)}
    with pytest.raises(CheckpointLayoutError, match=r"out\.2\.bias \(5,\) for conv_out\.bias \(4,\)"):
        load_mvdream("tiny.pt", parts=("unet",), image_size=RESOLUTION, state=bad)


class _NotATensor:
    pass


def test_only_plain_tensor_files_are_read(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"model.diffusion_model.x": _NotATensor()}, path)
    with pytest.raises(CheckpointLayoutError, match="weights_only=True"):
        load_mvdream(path)  # nothing is unpickled beyond tensors and containers
    torch.save({"model.diffusion_model.x": 3}, path)
    with pytest.raises(CheckpointLayoutError, match="not tensors: model.diffusion_model.x"):
        load_mvdream(path)


def test_camera_embed_is_loaded_not_dropped(loaded, source, tiny_mvdream):
    state, _ = source
    emb = loaded.unet.unet.class_embedding
    assert torch.equal(emb.linear_1.weight, state[f"{U}camera_embed.0.weight"])
    assert torch.equal(emb.linear_2.bias, state[f"{U}camera_embed.2.bias"])
    # The cameras change the prediction (the MLP is wired into the time embedding).
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(4, 4, LATENT_SIZE, LATENT_SIZE, generator=g), torch.randn(4, 77, 32, generator=g)
    cams = mvdream_camera(CameraBatch.from_angles(15.0, [0.0, 90.0, 180.0, -90.0]).c2w)
    with torch.no_grad():
        a = loaded.unet(x, torch.full((4,), 500), ctx, cams, 4)
        b = loaded.unet(x, torch.full((4,), 500), ctx, cams.roll(1, 0), 4)
    assert (a - b).abs().max() > 1e-3
    # A file without the camera MLP (what a Stable Diffusion conversion would make of it) does not load.
    no_camera = {k: v for k, v in state.items() if "camera_embed" not in k}
    with pytest.raises(CheckpointLayoutError, match="camera_embed"):
        load_mvdream("tiny.pt", parts=("unet",), image_size=RESOLUTION, state=no_camera)


# -- the multi-view attention -----------------------------------------------------------------------


def _attn1(unet):
    return next(m for n, m in unet.named_modules() if n.endswith("attn1"))


def test_joint_attention_of_one_view_is_per_view_attention(loaded):
    from diffusers.models.attention_processor import AttnProcessor2_0

    attn = _attn1(loaded.unet.unet)
    h = torch.randn(3, 10, attn.to_q.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = AttnProcessor2_0()(attn, h)
        assert torch.equal(MultiViewAttnProcessor(joint=True)(attn, h, num_views=1), want)
        # the whole network: num_views=1 is the plain diffusers UNet with its default attention
        plain = copy.deepcopy(loaded.unet.unet)
        plain.set_attn_processor(AttnProcessor2_0())
        g = torch.Generator().manual_seed(2)
        x, ctx = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 77, 32, generator=g)
        cams = torch.randn(4, 16, generator=g)
        t = torch.tensor([10, 300, 600, 900])
        close(loaded.unet(x, t, ctx, cams, 1), plain(x, t, encoder_hidden_states=ctx, class_labels=cams).sample, 1e-6)


def test_joint_attention_over_identical_views_is_per_view_attention_and_otherwise_not(loaded):
    """With f identical copies every key appears f times with the same score: softmax weights
    f e^s / (f sum e^s) = e^s / sum e^s and identical values, so joint attention returns what
    per-view attention returns on one copy. Distinct views do see each other."""
    attn = _attn1(loaded.unet.unet)
    joint = MultiViewAttnProcessor(joint=True)
    g = torch.Generator().manual_seed(3)
    one = torch.randn(2, 10, attn.to_q.in_features, generator=g)  # 2 groups, one view each
    copies = one.repeat_interleave(4, dim=0)  # [8, 10, C]: 2 groups of 4 identical views
    with torch.no_grad():
        per_view = joint(attn, one, num_views=1).repeat_interleave(4, dim=0)
        close(joint(attn, copies, num_views=4), per_view, 1e-5)
        distinct = copies + 0.5 * torch.randn(copies.shape, generator=g)
        assert (joint(attn, distinct, num_views=4) - joint(attn, distinct, num_views=1)).abs().max() > 1e-3

        # The same through the network: identical inputs per group, same t, text and camera.
        unet = loaded.unet
        x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
        cam, t = torch.randn(1, 16, generator=g), torch.tensor([400])
        single = unet(x, t, ctx, cam, 1)
        grouped = unet(x.repeat(4, 1, 1, 1), t.repeat(4), ctx.repeat(4, 1, 1), cam.repeat(4, 1), 4)
        close(grouped, single.repeat(4, 1, 1, 1), 1e-5)
        xs = torch.randn(4, 4, 8, 8, generator=g)
        assert (unet(xs, t.repeat(4), ctx.repeat(4, 1, 1), cam.repeat(4, 1), 4)
                - unet(xs, t.repeat(4), ctx.repeat(4, 1, 1), cam.repeat(4, 1), 1)).abs().max() > 1e-3


# -- cameras -------------------------------------------------------------------------------------------


def mvdream_reference_c2w(elevation: float, azimuth: float) -> torch.Tensor:
    """MVDream's training camera, built as its camera_utils does: y-up look-at from
    (cos e sin a, sin e, cos e cos a), OpenGL columns, then turned z-up by (x, y, z) -> (x, -z, y)."""
    e, a = math.radians(elevation), math.radians(azimuth)
    pos = torch.tensor([math.cos(e) * math.sin(a), math.sin(e), math.cos(e) * math.cos(a)], dtype=torch.float64)
    forward = -pos / pos.norm()
    right = torch.linalg.cross(forward, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    right = right / right.norm()
    up = torch.linalg.cross(right, forward)
    m = torch.eye(4, dtype=torch.float64)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = right, up / up.norm(), -forward, pos
    flip = torch.tensor([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.float64)
    return flip @ m


def test_camera_conversion_on_known_poses():
    # lift3d's front (azimuth 0, on +x) is MVDream's azimuth 90; MVDream's 0 (on -y) is lift3d's -90.
    assert mvdream_azimuth(torch.tensor([0.0, -90.0, 90.0, 180.0])).tolist() == [90.0, 0.0, -180.0, -90.0]
    front = mvdream_camera(CameraBatch.from_angles(0.0, 0.0, distance=3.0).c2w)[0].view(4, 4)
    torch.testing.assert_close(front[:3, 3], torch.tensor([1.0, 0.0, 0.0]))  # unit distance, row-major
    torch.testing.assert_close(front[:3, 2], torch.tensor([1.0, 0.0, 0.0]))  # looks along -x (back = +x)
    torch.testing.assert_close(front[:3, 1], torch.tensor([0.0, 0.0, 1.0]))  # up is +z
    torch.testing.assert_close(front.double(), mvdream_reference_c2w(0.0, 90.0), atol=1e-6, rtol=0)
    for el, az_mv in ((15.0, 0.0), (30.0, 45.0), (-10.0, 200.0), (60.0, -75.0), (5.0, 270.0)):
        ours = mvdream_camera(CameraBatch.from_angles(el, az_mv - 90.0, distance=2.7).c2w)[0].view(4, 4)
        torch.testing.assert_close(ours.double(), mvdream_reference_c2w(el, az_mv), atol=1e-6, rtol=0)
        # and not at the same azimuth label: the 90-degree offset is real
        same_label = mvdream_camera(CameraBatch.from_angles(el, az_mv, distance=2.7).c2w)[0].view(4, 4)
        assert (same_label.double() - mvdream_reference_c2w(el, az_mv)).abs().max() > 0.5


# -- the guidance ----------------------------------------------------------------------------------


def reference(prior, inp, t, noise):
    """(latents from the raw VAE, x_t, a, e_cond, e_uncond) with two raw UNet calls."""
    img = F.interpolate(inp.rgb.permute(0, 3, 1, 2), (RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)
    lat = prior.vae.encode(img * 2 - 1).latent_dist.mean * SCALING_FACTOR
    a = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    cams = mvdream_camera(inp.cameras.c2w)
    cond, uncond = inp.prompt.get_text_embeddings(inp.cameras.elevation, inp.cameras.azimuth, inp.cameras.distance,
                                                  False)
    with torch.no_grad():
        x_t = a.sqrt() * lat + (1 - a).sqrt() * noise
        e_c = prior.unet(x_t, t, cond, cams, 4)
        e_u = prior.unet(x_t, t, uncond, cams, 4)
    return lat, x_t, a, e_c, e_u


def fixed(B=8):
    g = torch.Generator().manual_seed(7)
    return torch.tensor([300, 700]).repeat_interleave(4)[:B], torch.randn(B, 4, LATENT_SIZE, LATENT_SIZE, generator=g)


def test_sds_gradient_is_the_weighted_residual_pulled_back_through_the_vae(tiny_mvdream, prompt):
    g = guidance(tiny_mvdream, guidance_scale=50.0, recon_loss=False)
    inp = make_input(prompt)
    t, noise = fixed()
    got, = torch.autograd.grad(g(inp, t=t, noise=noise).losses["loss_sds"], inp.rgb)
    lat, _, a, e_c, e_u = reference(g.prior, inp, t, noise)
    residual = (1 - a) * (e_u + 50.0 * (e_c - e_u) - noise)
    want, = torch.autograd.grad(lat, inp.rgb, grad_outputs=residual / 8)
    assert want.abs().max() > 0
    close(got, want)


@pytest.mark.parametrize("rescale", [0.0, 0.5])
def test_x0_reconstruction_loss_and_its_cfg_rescale(tiny_mvdream, prompt, rescale):
    g = guidance(tiny_mvdream, guidance_scale=50.0, recon_std_rescale=rescale)
    inp = make_input(prompt)
    t, noise = fixed()
    got, = torch.autograd.grad(g(inp, t=t, noise=noise).losses["loss_sds"], inp.rgb)
    lat, x_t, a, e_c, e_u = reference(g.prior, inp, t, noise)
    e_cfg = e_u + 50.0 * (e_c - e_u)
    x0 = (x_t - (1 - a).sqrt() * e_cfg) / a.sqrt()
    if rescale == 0.0:
        # without the rescale, x - x0 is SDS weighted by sqrt((1 - a) / a)
        close(lat.detach() - x0, ((1 - a) / a).sqrt() * (e_cfg - noise), 1e-3)
    else:
        x0_c = (x_t - (1 - a).sqrt() * e_c) / a.sqrt()
        parts = []
        for k in range(2):  # per view group: std over its 4 views, channels and pixels
            sl = slice(4 * k, 4 * k + 4)
            factor = (x0_c[sl].std() + 1e-8) / (x0[sl].std() + 1e-8)
            parts.append(rescale * x0[sl] * factor + (1 - rescale) * x0[sl])
        x0 = torch.cat(parts)
    want, = torch.autograd.grad(lat, inp.rgb, grad_outputs=(lat.detach() - x0) / 8)
    close(got, want)


def test_one_timestep_per_view_group(tiny_mvdream, prompt):
    g = guidance(tiny_mvdream)
    torch.manual_seed(0)
    t = g(make_input(prompt, groups=3))["t"]
    assert t.shape == (12,) and all(len(set(t[4 * k: 4 * k + 4].tolist())) == 1 for k in range(3))


def test_a_batch_that_is_not_whole_view_groups_is_refused(tiny_mvdream, prompt):
    g = guidance(tiny_mvdream)
    inp = make_input(prompt, groups=3, n_views=2)  # 6 views
    with pytest.raises(ValueError, match=r"batch has 6 views, which is not a multiple of 4.*data\.batch_size"):
        g(inp)
    inp = make_input(prompt, groups=4, n_views=1)  # 4 independent cameras
    with pytest.raises(ValueError, match=r"n_views=1.*set data\.n_views: 4"):
        g(inp)


def test_the_prompt_processor_reads_the_penultimate_layer_through_the_key_map(prompt, source, tiny_mvdream):
    """A hand-written OpenCLIP text tower on the original-layout tensors (fused in_proj, GELU MLP,
    causal mask, all layers but the last, final norm) gives the processor's embeddings."""
    from transformers import CLIPTokenizer

    from lift3d.prompts.mvdream import open_clip_token_ids
    from tiny_mvdream import VOCAB

    state, _ = source
    P = "cond_stage_model.model."
    arch = TINY_ARCH.text
    # token ids as open_clip.tokenize makes them: start, the words, end, then zeros (not end tokens)
    tok = CLIPTokenizer.from_pretrained(str(tiny_mvdream.parent / "tokenizer"), local_files_only=True)
    ids = open_clip_token_ids(tok, ["a red cube"], 77)
    words = [VOCAB[w] for w in ("<|startoftext|>", "a</w>", "red</w>", "cube</w>", "<|endoftext|>")]
    assert ids[0, :5].tolist() == words and ids[0, 5:].eq(0).all()

    x = state[P + "token_embedding.weight"][ids] + state[P + "positional_embedding"]
    mask = torch.full((77, 77), float("-inf")).triu(1)
    for i in range(arch.layers - 1):
        b = f"{P}transformer.resblocks.{i}."
        mha = torch.nn.MultiheadAttention(arch.width, arch.heads, batch_first=True)
        mha.load_state_dict({k: state[b + "attn." + k] for k in ("in_proj_weight", "in_proj_bias")}
                            | {k: state[b + "attn." + k] for k in ("out_proj.weight", "out_proj.bias")})
        h = F.layer_norm(x, (arch.width,), state[b + "ln_1.weight"], state[b + "ln_1.bias"])
        with torch.no_grad():
            x = x + mha(h, h, h, attn_mask=mask, need_weights=False)[0]
        h = F.layer_norm(x, (arch.width,), state[b + "ln_2.weight"], state[b + "ln_2.bias"])
        h = F.gelu(F.linear(h, state[b + "mlp.c_fc.weight"], state[b + "mlp.c_fc.bias"]))
        x = x + F.linear(h, state[b + "mlp.c_proj.weight"], state[b + "mlp.c_proj.bias"])
    want = F.layer_norm(x, (arch.width,), state[P + "ln_final.weight"], state[P + "ln_final.bias"])
    close(prompt.text_embeddings, want, 1e-5)
    assert prompt.extras["null_text_embeddings"].shape == (1, 77, 32)
    assert not torch.allclose(prompt.text_embeddings, prompt.uncond_text_embeddings)  # "blue" differs


# -- missing weights -------------------------------------------------------------------------------


def test_missing_weights_name_the_key_the_file_and_where_to_get_it(empty_hub):
    msg = build_error(NAME)
    assert "system.guidance.pretrained_model_name_or_path" in msg and "'MVDream/MVDream'" in msg
    assert "hf download MVDream/MVDream sd-v2.1-base-4view.pt" in msg and "huggingface.co/MVDream/MVDream" in msg
    pp = find("mvdream-prompt-processor", "prompt-processor")
    assert "system.prompt_processor.pretrained_model_name_or_path" in pp.missing_weights(pp.Config())


def test_a_folder_a_file_and_the_tokenizer_are_found_or_explained(empty_hub, tiny_mvdream, tmp_path):
    cls = find(NAME, "guidance")
    pp = find("mvdream-prompt-processor", "prompt-processor")
    folder = tiny_mvdream.parent
    assert cls.missing_weights(cls.Config(pretrained_model_name_or_path=str(folder))) is None  # holds the file
    assert pp.missing_weights(pp.Config(pretrained_model_name_or_path=str(tiny_mvdream))) is None  # tokenizer beside
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no sd-v2.1-base-4view.pt" in cls.missing_weights(cls.Config(pretrained_model_name_or_path=str(empty)))
    # the file alone, without a tokenizer beside it or in the cache: say where the vocabulary comes from
    alone = tmp_path / "alone" / "mvdream.pt"
    alone.parent.mkdir()
    shutil.copy(tiny_mvdream, alone)
    msg = pp.missing_weights(pp.Config(pretrained_model_name_or_path=str(alone)))
    assert "tokenizer_name_or_path" in msg
    assert 'hf download stabilityai/stable-diffusion-2-1-base --include "tokenizer/*"' in msg
    ok = pp.Config(pretrained_model_name_or_path=str(alone), tokenizer_name_or_path=str(folder / "tokenizer"))
    assert pp.missing_weights(ok) is None


def test_the_recipe_without_its_weights_names_mvdream_model(empty_hub, tmp_path, capsys):
    from lift3d.launch import main

    with pytest.raises(SystemExit) as ex:
        main(["--config", str(REPO / "configs" / "mvdream.yaml"), "--train", f"exp_root_dir={tmp_path / 'out'}",
              f"mvdream_model={tmp_path / 'absent' / 'sd-v2.1-base-4view.pt'}"])
    err = capsys.readouterr().err
    assert ex.value.code == 2
    assert "mvdream_model" in err and "huggingface.co/MVDream/MVDream" in err and "sd-v2.1-base-4view.pt" in err
    assert not (tmp_path / "out").exists()


# -- MVDream's SD 1.5 model (sd-v1.5-4view.pt) -----------------------------------------------------

T15 = "cond_stage_model.transformer.text_model."


@pytest.fixture(scope="module")
def source_v15():
    return original_state(seed=0, variant="sd-v1.5")


@pytest.fixture(scope="module")
def loaded_v15(tiny_mvdream_v15):
    return load_mvdream(tiny_mvdream_v15, image_size=RESOLUTION)


def test_v15_is_detected_from_the_file_and_loads_every_tensor_where_it_came_from(loaded_v15, source_v15,
                                                                                 tiny_mvdream_v15):
    from lift3d.priors.mvdream.checkpoint import SD15

    state, models = source_v15
    assert tiny_mvdream_v15.name == "sd-v1.5-4view.pt"
    assert loaded_v15.arch == TINY_ARCH_V15 and loaded_v15.arch.variant is SD15
    for part, got in (("unet", loaded_v15.unet.unet), ("vae", loaded_v15.vae), ("text", loaded_v15.text_encoder)):
        want, have = params_of(models, part), dict(got.state_dict())
        assert set(have) == set(want), part
        for k, v in want.items():
            assert torch.equal(have[k], v), f"{part}.{k}"
    # the original layout: 1x1-convolution projections, transformers' names under cond_stage_model.transformer
    assert state[f"{U}middle_block.1.proj_in.weight"].dim() == 4
    assert f"{T15}encoder.layers.1.self_attn.q_proj.weight" in state and f"{T15}embeddings.position_ids" in state
    assert not any(k.startswith("cond_stage_model.model.") for k in state)
    # heads by count: 8 at every level, whatever its width
    cfg = loaded_v15.unet.config
    assert tuple(cfg.attention_head_dim) == (8, 8) and cfg.cross_attention_dim == 32 and not cfg.use_linear_projection
    assert loaded_v15.text_encoder.config.hidden_act == "quick_gelu"
    assert loaded_v15.text_encoder.config.num_hidden_layers == TINY_ARCH_V15.text.layers  # every layer used
    # the loaded UNet predicts what the network the file was written from predicts
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(4, 4, LATENT_SIZE, LATENT_SIZE, generator=g), torch.randn(4, 77, 32, generator=g)
    cams = mvdream_camera(CameraBatch.from_angles(15.0, [0.0, 90.0, 180.0, -90.0]).c2w)
    with torch.no_grad():
        close(loaded_v15.unet(x, torch.full((4,), 400), ctx, cams, 4), models["unet"](x, 400, ctx, cams, 4), 1e-5)


def test_the_variant_is_read_from_the_text_tower_or_else_the_unet_and_mixed_files_are_refused(source, source_v15):
    from lift3d.priors.mvdream.checkpoint import SD15, SD21, detect_variant

    v21 = {k: tuple(v.shape) for k, v in source[0].items()}
    v15 = {k: tuple(v.shape) for k, v in source_v15[0].items()}
    assert detect_variant(v21) is SD21 and detect_variant(v15) is SD15
    # without a text tower (a UNet-and-VAE file) the projections' shape tells
    no_text = {k: s for k, s in v15.items() if not k.startswith("cond_stage_model.")}
    assert detect_variant(no_text) is SD15
    assert infer_architecture(no_text, image_size=RESOLUTION).unet == TINY_ARCH_V15.unet
    assert detect_variant({k: s for k, s in v21.items() if not k.startswith("cond_stage_model.")}) is SD21
    # SD 1.5's text tower on a 2.1 UNet (linear projections) is neither model
    mixed = {**{k: s for k, s in v21.items() if not k.startswith("cond_stage_model.")},
             **{k: s for k, s in v15.items() if k.startswith("cond_stage_model.")}}
    with pytest.raises(CheckpointLayoutError, match=r"sd-v1.5.*middle_block\.1\.proj_in\.weight"):
        detect_variant(mixed)
    with pytest.raises(CheckpointLayoutError, match="two text towers"):
        detect_variant({**v21, **{k: s for k, s in v15.items() if k.startswith("cond_stage_model.")}})


def test_v15_unplaced_missing_and_misshaped_keys_are_errors_naming_them(source_v15):
    state, _ = source_v15
    extra = {**state, f"{T15}encoder.layers.9.mlp.fc1.weight": torch.zeros(3),
             "cond_stage_model.transformer.logit_scale": torch.tensor(1.0)}
    with pytest.raises(CheckpointLayoutError) as info:
        load_mvdream("v15.pt", parts=("text",), image_size=RESOLUTION, state=extra)
    msg = str(info.value)
    assert "2 key(s)" in msg and f"{T15}encoder.layers.9.mlp.fc1.weight" in msg
    assert "cond_stage_model.transformer.logit_scale" in msg
    gone = f"{T15}encoder.layers.1.self_attn.v_proj.weight"
    with pytest.raises(CheckpointLayoutError) as info:
        load_mvdream("v15.pt", parts=("text",), image_size=RESOLUTION,
                     state={k: v for k, v in state.items() if k != gone})
    assert "1 parameter(s) left unfilled" in str(info.value) and f"(from {gone})" in str(info.value)
    # a transformer projection of the wrong shape (still a convolution: the variant stays 1.5)
    key = f"{U}input_blocks.1.1.proj_out.weight"
    bad = {**state, key: torch.zeros(32, 32, 3, 3)}
    with pytest.raises(CheckpointLayoutError, match=r"proj_out\.weight \(32, 32, 3, 3\) for "
                                                    r"down_blocks\.0\.attentions\.0\.proj_out\.weight"):
        load_mvdream("v15.pt", parts=("unet",), image_size=RESOLUTION, state=bad)
    # the position index buffer is optional: files from newer transformers lack it
    lean = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    assert load_mvdream("v15.pt", parts=("text",), image_size=RESOLUTION, state=lean).text_encoder is not None


def test_the_published_v15_layout_maps_to_diffusers_and_transformers_names():
    """MVDream sd-v1.yaml's architecture on the meta device: SD 1.5's UNet with the camera MLP, CLIP ViT-L/14's
    text model; the map fills every parameter and its implied shapes read back as the same architecture."""
    from lift3d.priors.mvdream.checkpoint import SD15

    text = TextArch(vocab_size=49408, width=768, layers=12, heads=12, mlp_width=3072, skip_last=False,
                    activation="quick_gelu")
    arch = MVDreamArch(unet=SD15_UNET, vae=VaeArch(), text=text, variant=SD15)
    models, tensors, km = _key_map_filling_every_parameter(arch)
    where = {k: [(tg.part, tg.key, tg.flatten) for tg in v] for k, v in km.targets.items()}
    assert where[f"{U}camera_embed.0.weight"] == [("unet", "class_embedding.linear_1.weight", False)]
    assert where[f"{U}middle_block.1.proj_in.weight"] == [("unet", "mid_block.attentions.0.proj_in.weight", False)]
    root = next(iter(tensors["text"])).split("embeddings.")[0] if "text_model." in next(iter(tensors["text"])) else ""
    assert where[f"{T15}encoder.layers.11.mlp.fc2.weight"] == [("text", f"{root}encoder.layers.11.mlp.fc2.weight",
                                                                 False)]
    assert where[f"{T15}final_layer_norm.bias"] == [("text", f"{root}final_layer_norm.bias", False)]
    # SD 1.5's UNet (859,520,964 parameters) plus the camera MLP; CLIP ViT-L/14's text model (123,060,480)
    n_unet = sum(p.numel() for p in models["unet"].parameters())
    assert n_unet == 859_520_964 + (16 * 1280 + 1280) + (1280 * 1280 + 1280)
    assert sum(p.numel() for p in models["text"].parameters()) == 123_060_480
    assert models["unet"].unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 8
    assert models["unet"].unet.down_blocks[2].attentions[0].transformer_blocks[0].attn1.heads == 8
    shapes = {k: tuple(v.shape) for k, v in to_original(km, tensors).items()}
    assert infer_architecture(shapes) == arch


@pytest.fixture(scope="module")
def prompt_v15(tiny_mvdream_v15):
    cfg = {"prompt": "a red cube", "negative_prompt": "blue", "pretrained_model_name_or_path": str(tiny_mvdream_v15),
           "use_cache": False}
    return find("mvdream-prompt-processor", "prompt-processor")(cfg)()


def test_the_v15_prompt_processor_runs_clip_whole_with_end_token_padding(prompt_v15, source_v15, tiny_mvdream_v15):
    """A hand-written CLIP ViT-L-style text model (separate q/k/v, quick-GELU, causal mask, every layer, final
    norm) on the original tensors, fed ids padded with the end token, gives the processor's embeddings."""
    from transformers import CLIPTokenizer

    from lift3d.prompts.mvdream import open_clip_token_ids
    from tiny_mvdream import VOCAB

    state, _ = source_v15
    arch = TINY_ARCH_V15.text
    tok = CLIPTokenizer.from_pretrained(str(tiny_mvdream_v15.parent / "tokenizer"), local_files_only=True)
    end = VOCAB["<|endoftext|>"]
    ids = open_clip_token_ids(tok, ["a red cube"], 77, pad_id=end)
    assert ids[0, :5].tolist() == [VOCAB[w] for w in ("<|startoftext|>", "a</w>", "red</w>", "cube</w>")] + [end]
    assert ids[0, 5:].eq(end).all()

    def lin(h, name):
        return F.linear(h, state[name + ".weight"], state[name + ".bias"])

    def norm(h, name):
        return F.layer_norm(h, (arch.width,), state[name + ".weight"], state[name + ".bias"])

    x = state[T15 + "embeddings.token_embedding.weight"][ids] + state[T15 + "embeddings.position_embedding.weight"]
    mask = torch.full((77, 77), float("-inf")).triu(1)
    for i in range(arch.layers):
        b = f"{T15}encoder.layers.{i}."
        h = norm(x, b + "layer_norm1")
        q, k, v = (lin(h, b + f"self_attn.{n}_proj") for n in "qkv")
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(arch.width) + mask, dim=-1)  # one head
        x = x + lin(att @ v, b + "self_attn.out_proj")
        h = lin(norm(x, b + "layer_norm2"), b + "mlp.fc1")
        x = x + lin(h * torch.sigmoid(1.702 * h), b + "mlp.fc2")
    want = norm(x, T15 + "final_layer_norm")
    close(prompt_v15.text_embeddings, want, 1e-5)
    assert prompt_v15.text_embeddings.shape == (1, 77, 32)
    assert prompt_v15.extras["null_text_embeddings"].shape == (1, 77, 32)
    assert not torch.allclose(prompt_v15.text_embeddings, prompt_v15.uncond_text_embeddings)  # "blue" differs


def test_the_v15_tokenizer_defaults_to_openai_clip_and_is_never_downloaded(empty_hub, tmp_path):
    from tiny_mvdream import make_tiny_mvdream

    pp = find("mvdream-prompt-processor", "prompt-processor")
    alone = make_tiny_mvdream(tmp_path / "alone", variant="sd-v1.5", tokenizer=False)
    msg = pp.missing_weights(pp.Config(pretrained_model_name_or_path=str(alone)))
    assert "tokenizer_name_or_path" in msg and "openai/clip-vit-large-patch14" in msg
    assert "hf download openai/clip-vit-large-patch14 vocab.json merges.txt" in msg
    assert "stable-diffusion-2-1-base" not in msg
    # a safetensors twin is recognised from its header alone
    st = make_tiny_mvdream(tmp_path / "st", variant="sd-v1.5", fmt="safetensors", tokenizer=False)
    assert "openai/clip-vit-large-patch14" in pp.missing_weights(pp.Config(pretrained_model_name_or_path=str(st)))
    # an absent file named after the SD 1.5 model: the message says how to fetch that one
    cls = find(NAME, "guidance")
    absent = cls.missing_weights(cls.Config(pretrained_model_name_or_path=str(tmp_path / "x" / "sd-v1.5-4view.pt")))
    assert "hf download MVDream/MVDream sd-v1.5-4view.pt" in absent


def test_the_recipe_runs_two_steps_on_the_tiny_v15_checkpoint(empty_hub, tmp_path):
    """configs/mvdream.yaml unchanged, mvdream_model= the SD 1.5-layout file: the config smoke run with it."""
    import runpy

    smoke = runpy.run_path(str(REPO / "tests" / "core" / "test_configs_smoke.py"))
    tiny = runpy.run_path(str(Path(__file__).with_name("tiny_mvdream.py")))
    smoke["TINY_PRIORS"]["mvdream"] = tiny["smoke_overrides_v15"]
    smoke["test_two_step_smoke_run"](REPO / "configs" / "mvdream.yaml", tmp_path)
    parsed = next((tmp_path / "out").glob("*/*/configs/parsed.yaml")).read_text()
    assert "sd-v1.5-4view.pt" in parsed
