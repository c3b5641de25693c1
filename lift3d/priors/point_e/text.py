"""CLIP ViT-L/14 text features as Point-E's text-conditioned base model reads them.

Nichol et al. 2022, "Point-E: A System for Generating 3D Point Clouds from Complex Prompts". The
``base40M-textvec`` model is conditioned on one CLIP vector: the text tower's projected feature at the
end-of-text token (``encode_text`` in OpenAI's ``clip`` package, ``text_embeds`` of transformers'
``CLIPTextModelWithProjection``), in float32, divided by its L2 norm, then multiplied by sqrt(768) so
its entries have unit variance before the model's condition projection. Prompts are tokenised to 77
tokens and truncated (the end-of-text token is kept). The *unconditional* input of Point-E's guidance
is the all-zero vector, not the features of an empty prompt: :func:`null_condition`.

Weights come from a local folder or the Hugging Face cache through :func:`lift3d.utils.hub.resolve_weights`
(default ``openai/clip-vit-large-patch14``); nothing is downloaded.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from lift3d.utils.hub import MissingWeightsError, resolve_weights

__all__ = ["DEFAULT_CLIP_MODEL", "PointETextEncoder", "null_condition", "normalise_features"]

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
MAX_TOKENS = 77


def normalise_features(features: Tensor) -> Tensor:
    """CLIP features [B, D] -> Point-E's condition: float32, unit L2 norm, times sqrt(D)."""
    f = features.float()
    return f / torch.linalg.norm(f, dim=-1, keepdim=True) * math.sqrt(f.shape[-1])


def null_condition(batch: int, dim: int = 768, device=None, dtype=torch.float32) -> Tensor:
    """Point-E's unconditional input: zeros [B, dim] (its condition dropout zeroes the CLIP vector)."""
    return torch.zeros(batch, dim, device=device, dtype=dtype)


class PointETextEncoder(nn.Module):
    """Frozen CLIP text tower with projection: prompts -> [B, D] Point-E conditions."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int = MAX_TOKENS):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = DEFAULT_CLIP_MODEL, *, key: str = "clip",
                        dtype: torch.dtype = torch.float32) -> "PointETextEncoder":
        """Load from a folder (``config.json`` + weights + tokenizer files, or ``text_encoder/`` and
        ``tokenizer/`` subfolders) or a hub id already in the local cache; never downloads."""
        if name_or_path is None or str(name_or_path) == "":
            raise MissingWeightsError(f"config key '{key}' is empty: give a CLIP ViT-L/14 folder or the hub id "
                                      f"{DEFAULT_CLIP_MODEL!r}")
        folder = resolve_weights(str(name_or_path), key=key).path
        enc_dir = folder / "text_encoder" if (folder / "text_encoder" / "config.json").is_file() else folder
        tok_dir = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder
        if not (enc_dir / "config.json").is_file():
            raise MissingWeightsError(f"config key '{key}' = {str(name_or_path)!r}: the folder {folder} has no "
                                      "config.json (nor text_encoder/config.json); it is not a transformers CLIP folder")
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        try:
            model = CLIPTextModelWithProjection.from_pretrained(str(enc_dir), local_files_only=True, torch_dtype=dtype)
            tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        except OSError as exc:
            raise MissingWeightsError(f"config key '{key}' = {str(name_or_path)!r}: cannot load CLIP from {folder} "
                                      f"({exc})") from None
        return cls(model, tokenizer)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Tensor:
        """prompts -> [B, D] conditions (normalised and scaled as Point-E feeds them to its model)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        device = next(self.model.parameters()).device
        out = self.model(input_ids=tok.input_ids.to(device))
        return normalise_features(out.text_embeds)
