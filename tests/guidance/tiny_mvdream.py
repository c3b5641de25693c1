"""A tiny random MVDream checkpoint in the original (LDM) key layout, for tests.

:func:`make_tiny_mvdream` builds the three networks lift3d loads (the multi-view UNet, the KL
autoencoder and the CLIP text model) at toy size with random weights, turns their state dicts into
the original layout with lift3d's key map run backwards (:func:`~lift3d.priors.mvdream.checkpoint.to_original`),
adds what the map reads but does not use (the text tower's last layer, CLIP's projection head and
temperature, the schedule buffers), and saves it all as ``sd-v2.1-base-4view.pt`` (or a
``.safetensors`` twin), with a CLIP BPE ``tokenizer/`` folder beside it. Loading it back through the
key map is then a round trip whose every tensor is known.

Shapes: 8x8 latents with 4 channels, a VAE that halves once (working resolution 16), two UNet levels
of 32 and 64 channels (attention on the first only; the middle block always has it), text states
``[77, 32]`` from a 3-layer tower of which 2 layers are used. Seeded: same arguments, same weights.
No weight is zero (diffusers zero-initialises some output layers; a zero layer would hide mistakes).

``variant="sd-v1.5"`` writes the SD 1.5 model's layout instead (``sd-v1.5-4view.pt``): 8 heads per
UNet level, 1x1-convolution transformer projections, and a 2-layer CLIP text model (quick-GELU, all
layers used) under ``cond_stage_model.transformer.text_model.*`` with its ``position_ids`` buffer,
as older transformers saved it.
"""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import pytest
import torch

from lift3d.priors.mvdream.checkpoint import (
    CLIP_TEXT_PREFIX,
    DEFAULT_MVDREAM_FILE,
    SD15,
    TEXT_PREFIX,
    TEXT_LAYER_KEYS,
    MVDreamArch,
    TextArch,
    VaeArch,
    build_key_map,
    build_models,
    default_alphas_cumprod,
    to_original,
)
from lift3d.priors.mvdream.network import UNetArch

LATENT_SIZE, VAE_FACTOR, TEXT_DIM, LATENT_CHANNELS = 8, 2, 32, 4
RESOLUTION = LATENT_SIZE * VAE_FACTOR

# tiny_sd.py holds the toy CLIP vocabulary; loaded by path so this file also works through runpy.
_TINY_SD = runpy.run_path(str(Path(__file__).with_name("tiny_sd.py")))
VOCAB: dict[str, int] = _TINY_SD["clip_vocab"]()
MERGES: list[str] = _TINY_SD["MERGES"]

TINY_ARCH = MVDreamArch(
    unet=UNetArch(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention=(True, False),
                  context_dim=TEXT_DIM, camera_dim=16, sample_size=LATENT_SIZE),
    vae=VaeArch(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=LATENT_CHANNELS, sample_size=RESOLUTION),
    text=TextArch(vocab_size=len(VOCAB), width=TEXT_DIM, layers=3, heads=1, mlp_width=64, context_length=77),
)

TINY_ARCH_V15 = MVDreamArch(
    unet=UNetArch(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention=(True, False), num_heads=8,
                  context_dim=TEXT_DIM, camera_dim=16, linear_projection=False, sample_size=LATENT_SIZE),
    vae=TINY_ARCH.vae,
    text=TextArch(vocab_size=len(VOCAB), width=TEXT_DIM, layers=2, heads=1, mlp_width=64, context_length=77,
                  skip_last=False, activation="quick_gelu"),
    variant=SD15,
)
ARCHS = {"sd-v2.1-base": TINY_ARCH, "sd-v1.5": TINY_ARCH_V15}


def tiny_models(seed: int = 0, variant: str = "sd-v2.1-base") -> dict[str, torch.nn.Module]:
    """The three networks at toy size, seeded, with no all-zero parameter."""
    torch.manual_seed(seed)
    models = build_models(ARCHS[variant], empty=False)
    with torch.no_grad():
        for m in models.values():
            for p in m.parameters():
                if not bool(p.abs().max() > 0):
                    p.normal_(0.0, 0.05)
    return {k: m.eval() for k, m in models.items()}


def state_dicts(models: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """Each part's tensors in lift3d's naming (the UNet's without the wrapper's ``unet.`` prefix)."""
    out = {part: dict((m.unet if part == "unet" else m).state_dict()) for part, m in models.items()}
    out["schedule"] = {"alphas_cumprod": default_alphas_cumprod()}
    return out


def schedule_buffers() -> dict[str, torch.Tensor]:
    """The noise-schedule buffers the original interface saves beside the networks."""
    betas = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=torch.float64) ** 2
    a = torch.cumprod(1 - betas, 0)
    a_prev = torch.cat([torch.ones(1, dtype=a.dtype), a[:-1]])
    post_var = betas * (1 - a_prev) / (1 - a)
    buffers = {"betas": betas, "alphas_cumprod": a, "alphas_cumprod_prev": a_prev, "sqrt_alphas_cumprod": a.sqrt(),
               "sqrt_one_minus_alphas_cumprod": (1 - a).sqrt(), "log_one_minus_alphas_cumprod": (1 - a).log(),
               "sqrt_recip_alphas_cumprod": (1 / a).sqrt(), "sqrt_recipm1_alphas_cumprod": (1 / a - 1).sqrt(),
               "posterior_variance": post_var, "posterior_log_variance_clipped": post_var.clamp_min(1e-20).log(),
               "posterior_mean_coef1": betas * a_prev.sqrt() / (1 - a),
               "posterior_mean_coef2": (1 - a_prev) * (1 - betas).sqrt() / (1 - a)}
    return {k: v.float() for k, v in buffers.items()}


def unused_text_tensors(seed: int = 1) -> dict[str, torch.Tensor]:
    """What the original text tower holds beyond the layers lift3d uses, at the tiny size."""
    g = torch.Generator().manual_seed(seed)
    t = TINY_ARCH.text
    w, m = t.width, t.mlp_width
    shapes = {"ln_1.weight": (w,), "ln_1.bias": (w,), "attn.in_proj_weight": (3 * w, w), "attn.in_proj_bias": (3 * w,),
              "attn.out_proj.weight": (w, w), "attn.out_proj.bias": (w,), "ln_2.weight": (w,), "ln_2.bias": (w,),
              "mlp.c_fc.weight": (m, w), "mlp.c_fc.bias": (m,), "mlp.c_proj.weight": (w, m), "mlp.c_proj.bias": (w,)}
    assert set(shapes) == set(TEXT_LAYER_KEYS)
    last = f"{TEXT_PREFIX}transformer.resblocks.{t.layers - 1}."
    out = {last + k: torch.randn(s, generator=g) for k, s in shapes.items()}
    out[TEXT_PREFIX + "text_projection"] = torch.randn(w, w, generator=g)
    out[TEXT_PREFIX + "logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return out


def original_state(seed: int = 0, variant: str = "sd-v2.1-base"
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.nn.Module]]:
    """(the checkpoint's tensors in the original layout, the networks they came from)."""
    models = tiny_models(seed, variant)
    sds = state_dicts(models)
    km = build_key_map(ARCHS[variant], {part: set(sd) for part, sd in sds.items() if part != "schedule"})
    state = to_original(km, sds)
    if variant == "sd-v1.5":
        state[CLIP_TEXT_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    else:
        state.update(unused_text_tensors(seed + 1))
    state.update(schedule_buffers())
    return state, models


def write_tokenizer(folder: Path, pad_token: str = "!") -> Path:
    """A CLIP BPE tokenizer with the toy vocabulary (padding is done by the prompt processor)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(VOCAB))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token}))
    return folder


def make_tiny_mvdream(folder: str | Path, seed: int = 0, fmt: str = "pt", variant: str = "sd-v2.1-base",
                      tokenizer: bool = True) -> Path:
    """Write the tiny checkpoint (``pt`` or ``safetensors``) and a ``tokenizer/`` beside it; returns the file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state, _ = original_state(seed, variant)
    name = ARCHS[variant].variant.filename
    if fmt == "pt":
        path = folder / name
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        path = folder / name.replace(".pt", ".safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    if tokenizer:
        write_tokenizer(folder / "tokenizer", "<|endoftext|>" if variant == "sd-v1.5" else "!")
    return path


def smoke_overrides(tmp_path: Path) -> dict:
    """Guidance config overrides that put a recipe on the tiny model (the config smoke test's factory)."""
    path = tmp_path / "tiny-mvdream" / DEFAULT_MVDREAM_FILE
    if not path.is_file():
        make_tiny_mvdream(path.parent)
    return {"pretrained_model_name_or_path": str(path), "image_size": RESOLUTION}


def smoke_overrides_v15(tmp_path: Path) -> dict:
    """As :func:`smoke_overrides`, on the tiny SD 1.5-layout checkpoint."""
    path = tmp_path / "tiny-mvdream-v15" / SD15.filename
    if not path.is_file():
        make_tiny_mvdream(path.parent, variant="sd-v1.5")
    return {"pretrained_model_name_or_path": str(path), "image_size": RESOLUTION}


@pytest.fixture(scope="session")
def tiny_mvdream_v15(tmp_path_factory) -> Path:
    """The tiny SD 1.5-layout checkpoint file, with its tokenizer folder beside it."""
    return make_tiny_mvdream(tmp_path_factory.mktemp("tiny-mvdream-v15"), variant="sd-v1.5")


@pytest.fixture(scope="session")
def tiny_mvdream(tmp_path_factory) -> Path:
    """The tiny checkpoint file (original layout), with its tokenizer folder beside it."""
    return make_tiny_mvdream(tmp_path_factory.mktemp("tiny-mvdream"))
