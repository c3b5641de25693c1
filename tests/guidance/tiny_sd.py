"""A tiny random Stable Diffusion in the diffusers folder layout, for tests (diffusers' dummy components).

``make_tiny_sd(folder)`` writes what ``hf download stabilityai/stable-diffusion-2-1-base`` would
hold, at toy size: ``model_index.json``, ``unet/``, ``vae/``, ``scheduler/``, ``text_encoder/`` and a
CLIP BPE ``tokenizer/`` (``vocab.json`` + ``merges.txt``). The UNet's latents are 8x8 with 4 channels
and the VAE halves the size once, so the working resolution is 16x16; the text encoder's hidden
states are ``[77, 32]``. Seeded: the same arguments give the same weights.

Import the fixtures ``tiny_sd`` (epsilon) and ``tiny_sd_v`` (v-prediction) by name, or call
:func:`smoke_overrides` for a recipe's guidance (the config smoke test does).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

#: The tiny model's shape: latent size, pixels per latent, text width, latent channels.
LATENT_SIZE, VAE_FACTOR, TEXT_DIM, LATENT_CHANNELS = 8, 2, 32, 4
RESOLUTION = LATENT_SIZE * VAE_FACTOR
MAX_TOKENS = 77

#: A few merges, so common words become single tokens as they would with the real vocabulary.
MERGES = ["r e", "re d</w>", "c u", "cu b", "cub e</w>", "b l", "bl u", "blu e</w>"]


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2 and CLIP share them)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def clip_vocab() -> dict[str, int]:
    """Every byte with and without the end-of-word mark, the merges' results, then the two specials."""
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in MERGES]:
        vocab.setdefault(s, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def make_tiny_sd(folder: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Write a tiny random Stable Diffusion to ``folder`` (created); returns it."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=2, attention_head_dim=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
    ).save_pretrained(folder / "unet")
    AutoencoderKL(
        block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, norm_num_groups=2,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=RESOLUTION,
    ).save_pretrained(folder / "vae")
    # Stable Diffusion's noise schedule; the parameterisation is what the test varies.
    DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type=prediction_type, clip_sample=False, steps_offset=1).save_pretrained(folder / "scheduler")
    vocab = clip_vocab()
    eos = vocab["<|endoftext|>"]
    CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos,
    )).save_pretrained(folder / "text_encoder")
    tok = folder / "tokenizer"
    tok.mkdir(exist_ok=True)
    (tok / "vocab.json").write_text(json.dumps(vocab))
    (tok / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    (tok / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_TOKENS, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}, indent=2))
    return folder


def smoke_overrides(tmp_path: Path) -> dict:
    """Guidance config overrides that put a recipe on the tiny model (the config smoke test's factory)."""
    folder = tmp_path / "tiny-sd"
    if not (folder / "model_index.json").is_file():
        make_tiny_sd(folder)
    return {"pretrained_model_name_or_path": str(folder)}


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny epsilon-prediction Stable Diffusion folder."""
    return make_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "sd")


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> Path:
    """The same tiny model with a v-prediction scheduler config."""
    return make_tiny_sd(tmp_path_factory.mktemp("tiny-sd-v") / "sd", prediction_type="v_prediction")
