"""Stable Diffusion's prompt processor: prompts become the CLIP text encoder's hidden states.

Stable Diffusion's UNet attends to the last hidden states ``[77, D]`` of its own CLIP text encoder
(D = 768 for SD 1.x, 1024 for SD 2.x), read from the ``text_encoder`` and ``tokenizer`` subfolders
of the same diffusers folder the guidance loads. Prompts are padded to the tokenizer's maximum
length (77) with no attention mask, as the model was trained.

The encoder is loaded only when a text misses the on-disk embedding cache (the base class keys the
cache by :meth:`encoder_id`), used once for every missing text, and freed straight after; a second
run with the same prompt never loads it. The empty text is always encoded too: it is what the
model was trained on as "no text", and the guidance needs it wherever it drops the prompt, so it
travels in ``PromptUtils.extras["null_text_embeddings"]`` ``[1, 77, D]``.

Weights come from a local folder or the Hugging Face cache (:mod:`lift3d.utils.hub`), never the
network; transformers is imported only when a text has to be encoded.
"""

from __future__ import annotations

import gc
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from jaxtyping import Float
from torch import Tensor

from lift3d.prompts.base import BasePromptProcessor, PromptUtils
from lift3d.registry import register

#: Files of the diffusers folder the processor reads (the encoder's weights are checked on load).
REQUIRED_FILES = ("text_encoder/config.json", "tokenizer")

#: Texts encoded per call of the encoder.
ENCODE_BATCH = 16


class HiddenStatePromptProcessor(BasePromptProcessor):
    """A processor whose embeddings are a transformers text model's ``last_hidden_state``, encoded in
    batches of :data:`ENCODE_BATCH` on ``cfg.device`` and freed after; the empty text always rides
    along as ``PromptUtils.extras["null_text_embeddings"]`` ``[1, L, D]``, the model's "no text".

    Subclasses load ``(tokenizer, text model)`` in :meth:`load_encoder` and turn texts into token ids
    in :meth:`token_ids`.
    """

    def configure(self, **kwargs: Any) -> None:
        super().configure(**kwargs)
        self._tokenizer: Any = None
        self._text_encoder: Any = None
        self._table: dict[str, Tensor] = {}

    def encoder_device(self) -> str:
        """Where the text model runs: ``cfg.device``, else CUDA when available, else the CPU."""
        return self.cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def load_encoder(self) -> tuple[Any, Any]:
        raise NotImplementedError

    def token_ids(self, tokenizer: Any, encoder: Any, texts: list[str]) -> Tensor:
        """``[N, L]`` token ids of ``texts`` as the model was trained on them."""
        raise NotImplementedError

    def encode(self, texts: list[str]) -> Float[Tensor, "N L D"]:
        """The text model's ``last_hidden_state`` ``[N, L, D]`` per text (float32, on the CPU)."""
        tokenizer, encoder = self.load_encoder()
        device = next(encoder.parameters()).device
        ids = self.token_ids(tokenizer, encoder, texts)
        with torch.no_grad():
            rows = [encoder(chunk.to(device)).last_hidden_state.float().cpu() for chunk in ids.split(ENCODE_BATCH)]
        return torch.cat(rows)

    def release_encoder(self) -> None:
        on_cuda = self._text_encoder is not None and next(self._text_encoder.parameters()).is_cuda
        self._text_encoder = None
        self._tokenizer = None
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()

    def embed(self, texts: list[str]) -> dict[str, Tensor]:
        # The empty text rides along: "no text" for the guidance (see the class docstring).
        self._table = super().embed([*texts, ""])
        return self._table

    def _build(self) -> PromptUtils:
        utils = super()._build()
        utils.extras["null_text_embeddings"] = self._table[""][None]
        return utils


@register("stable-diffusion-prompt-processor")
class StableDiffusionPromptProcessor(HiddenStatePromptProcessor):
    """CLIP hidden states ``[1, 77, D]`` per text for ``stable-diffusion-guidance``."""

    @dataclass
    class Config(BasePromptProcessor.Config):
        pretrained_model_name_or_path: str = "stabilityai/stable-diffusion-2-1-base"
        """The same Stable Diffusion folder or Hugging Face id as the guidance (recipes set both to
        ``${sd_model}``); its text_encoder and tokenizer subfolders are read."""
        revision: Optional[str] = None
        """A Hugging Face revision (branch, tag or commit) to look up in the cache."""
        device: Optional[str] = None
        """Where the text encoder runs (it is freed after encoding); null: CUDA when available, else the CPU."""

    cfg: Config

    def configure(self, **kwargs: Any) -> None:
        super().configure(**kwargs)
        self._folder: Path | None = None

    # -- weights ---------------------------------------------------------------------------------

    @classmethod
    def missing_weights(cls, cfg: Any, key: str = "system.prompt_processor") -> str | None:
        """Why the weights ``cfg`` names cannot be found here (None when they can), without loading them."""
        from lift3d.utils.hub import MissingWeightsError, resolve_weights

        try:
            resolve_weights(cfg.pretrained_model_name_or_path, key=f"{key}.pretrained_model_name_or_path",
                            required=REQUIRED_FILES, revision=cfg.revision)
        except MissingWeightsError as exc:
            return str(exc)
        return None

    def folder(self) -> Path:
        """The diffusers folder of the weights, or :class:`~lift3d.utils.hub.MissingWeightsError`."""
        if self._folder is None:
            from lift3d.utils.hub import resolve_weights

            self._folder = resolve_weights(self.cfg.pretrained_model_name_or_path,
                                           key=f"{self.cfg_key}.pretrained_model_name_or_path",
                                           required=REQUIRED_FILES, revision=self.cfg.revision).path
        return self._folder

    def encoder_id(self) -> str:
        # The resolved folder (a cache snapshot names its commit) and the size and time of every
        # encoder and tokenizer file: new weights in the same folder give a new id, so stale
        # embeddings are never read back.
        folder = self.folder()
        h = hashlib.sha256()
        for sub in ("text_encoder", "tokenizer"):
            for f in sorted(p for p in (folder / sub).rglob("*") if p.is_file()):
                st = f.stat()
                h.update(f"{f.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return f"clip-last-hidden-state/{folder}/{h.hexdigest()[:16]}"

    def load_encoder(self) -> tuple[Any, Any]:
        """(tokenizer, text encoder), loaded on first use."""
        if self._text_encoder is None:
            from transformers import CLIPTextModel, CLIPTokenizer

            from lift3d.utils.hub import MissingWeightsError

            folder = self.folder()
            device = self.encoder_device()
            try:
                self._tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
                self._text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder",
                                                                   local_files_only=True).to(device).eval()
            except (OSError, ValueError) as exc:
                raise MissingWeightsError(
                    f"config key '{self.cfg_key}.pretrained_model_name_or_path' = "
                    f"{self.cfg.pretrained_model_name_or_path!r}: the text encoder or tokenizer in {folder} does not "
                    f"load (interrupted download?): {exc}") from exc
        return self._tokenizer, self._text_encoder

    # -- encoding --------------------------------------------------------------------------------

    def token_ids(self, tokenizer: Any, encoder: Any, texts: list[str]) -> Tensor:
        """Padded to the tokenizer's maximum length (77), as Stable Diffusion was trained."""
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids


__all__ = ["HiddenStatePromptProcessor", "StableDiffusionPromptProcessor"]
