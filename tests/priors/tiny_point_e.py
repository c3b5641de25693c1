"""A tiny random Point-E in the ORIGINAL formats, for tests (diffusers' dummy-components idea).

``make_tiny_point_e(folder)`` writes what the real setup holds, at toy size:

* ``base.pt``: a ``state_dict`` with Point-E's original keys (``time_embed.c_fc``, ``backbone.resblocks.N...``,
  ``clip_embed``) for a text-vector base model of width :data:`WIDTH`, :data:`LAYERS` blocks, condition size
  :data:`COND_DIM`; the key list is written here from the reference's module layout, independently of our key
  map, so a test that loads it checks the map;
* ``upsampler.pt``: the upsampler in the same way (``cond_point_proj``, ``channel_scales``, ``clip_embed.0/1``);
* ``clip/``: a transformers ``CLIPTextModelWithProjection`` (projection size :data:`COND_DIM`) with a byte-level
  CLIP BPE tokenizer.

All values are seeded random (including the output projection, zero in a fresh reference model), so the
model's output depends on every weight. Load with ``heads=HEADS, n_ctx=N_CTX, upsampler_n_ctx=UP_N_CTX,
grid_tokens=GRID_TOKENS`` (:func:`load_kwargs`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

WIDTH, LAYERS, HEADS, COND_DIM = 32, 2, 2, 16
IN_CH, OUT_CH = 6, 12
N_CTX = 32
UP_N_CTX, GRID_DIM, GRID_TOKENS = 48, 8, 4
TEXT_DIM, MAX_TOKENS = 24, 77


def _linear(sd: dict, name: str, fan_in: int, fan_out: int, g: torch.Generator) -> None:
    sd[f"{name}.weight"] = torch.randn(fan_out, fan_in, generator=g) / fan_in ** 0.5
    sd[f"{name}.bias"] = torch.randn(fan_out, generator=g) * 0.1


def _norm(sd: dict, name: str, dim: int, g: torch.Generator) -> None:
    sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
    sd[f"{name}.bias"] = 0.1 * torch.randn(dim, generator=g)


def _trunk(sd: dict, g: torch.Generator, width: int = WIDTH, layers: int = LAYERS) -> None:
    _linear(sd, "time_embed.c_fc", width, 4 * width, g)
    _linear(sd, "time_embed.c_proj", 4 * width, width, g)
    _norm(sd, "ln_pre", width, g)
    for i in range(layers):
        p = f"backbone.resblocks.{i}"
        _linear(sd, f"{p}.attn.c_qkv", width, 3 * width, g)
        _linear(sd, f"{p}.attn.c_proj", width, width, g)
        _norm(sd, f"{p}.ln_1", width, g)
        _linear(sd, f"{p}.mlp.c_fc", width, 4 * width, g)
        _linear(sd, f"{p}.mlp.c_proj", 4 * width, width, g)
        _norm(sd, f"{p}.ln_2", width, g)
    _norm(sd, "ln_post", width, g)
    _linear(sd, "input_proj", IN_CH, width, g)
    _linear(sd, "output_proj", width, OUT_CH, g)


def original_base_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A base40M-textvec-like state dict in the original key layout (tiny)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    _trunk(sd, g)
    _linear(sd, "clip_embed", COND_DIM, WIDTH, g)
    return sd


def original_upsampler_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """An upsample40M-like state dict in the original key layout (tiny)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    _trunk(sd, g)
    _linear(sd, "cond_point_proj", IN_CH, WIDTH, g)
    sd["channel_scales"] = torch.tensor([2.0, 2.0, 2.0, 2 / 255, 2 / 255, 2 / 255])
    sd["channel_biases"] = torch.tensor([0.0, 0.0, 0.0, -1.0, -1.0, -1.0])
    _norm(sd, "clip_embed.0", GRID_DIM, g)
    _linear(sd, "clip_embed.1", GRID_DIM, WIDTH, g)
    return sd


def _byte_symbols() -> list[str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def make_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """A tiny transformers CLIP text model with projection (size COND_DIM) and its tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    eos = vocab["<|endoftext|>"]
    torch.manual_seed(seed)
    CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, projection_dim=COND_DIM, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=eos, pad_token_id=eos,
    )).save_pretrained(folder)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_TOKENS, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    return folder


def make_tiny_point_e(folder: str | Path) -> Path:
    """Write ``base.pt``, ``upsampler.pt`` (original layouts) and ``clip/`` into ``folder``; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(original_base_state(), folder / "base.pt")
    torch.save(original_upsampler_state(), folder / "upsampler.pt")
    make_tiny_clip(folder / "clip")
    return folder


def load_kwargs() -> dict:
    """What ``PointEPrior.from_pretrained`` needs besides the paths for the tiny model (not stored in files)."""
    return {"heads": HEADS, "n_ctx": N_CTX, "upsampler_n_ctx": UP_N_CTX, "grid_tokens": GRID_TOKENS}


@pytest.fixture(scope="session")
def tiny_point_e(tmp_path_factory) -> Path:
    """The folder of :func:`make_tiny_point_e` (built once per session)."""
    return make_tiny_point_e(tmp_path_factory.mktemp("tiny-point-e"))
