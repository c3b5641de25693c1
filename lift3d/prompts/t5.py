"""DeepFloyd IF's prompt processor: T5 text embeddings, computed once and cached on disk.

IF (DeepFloyd, 2023) conditions its pixel-space UNets on the hidden states of a frozen T5-XXL
encoder (``text_encoder/`` and ``tokenizer/`` of an IF model folder). This processor turns the
prompt, the negative prompt and their view-dependent variants into those states, ``[77, d_model]``
per text (4096 wide for T5-XXL), which ``deepfloyd-guidance`` feeds to the UNet.

Decisions:
- The encoder is loaded in :meth:`T5PromptProcessor.encode`, used once for every text the disk
  cache lacks, and dropped in :meth:`~T5PromptProcessor.release_encoder` before training starts:
  T5-XXL (4.7B parameters) is as large as IF's stage-I UNet and is never needed beside it. With the
  cache warm (a second run of the same prompt) it is not loaded at all.
- Texts are lower-cased and stripped before tokenising, as the IF pipeline of diffusers does when
  it does not clean captions (IF's training captions were lower-cased); padded and truncated to
  77 tokens, the length IF's UNets were trained with.
- Embeddings are stored as float32 whatever precision the encoder ran in; the encoder's dtype is
  part of the cache key, since fp16 and fp32 encoders give slightly different states.
- The empty text is always encoded too and handed to the guidance in ``extras`` as
  ``empty_text_embedding``: the "no text" conditioning IF samples with, which the guidance needs to
  drop the text of a branch whatever the negative prompt is.
- IF's tokenizer folder ships a sentencepiece model (``spiece.model``) and no ``tokenizer.json``;
  reading it needs the ``sentencepiece`` package, which is checked up front with a clear message.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from jaxtyping import Float
from torch import Tensor

from lift3d.config import ConfigError
from lift3d.prompts.base import BasePromptProcessor, PromptUtils
from lift3d.registry import register

log = logging.getLogger(__name__)

#: The default IF model: stage I (64x64), the one score distillation uses.
DEFAULT_IF_MODEL = "DeepFloyd/IF-I-XL-v1.0"
#: Tokens per text: IF's encoder was trained on 77 (T5 itself could take more).
MAX_LENGTH = 77
#: Files of an IF folder the encoder needs.
ENCODER_FILES = ("text_encoder/config.json", "tokenizer/tokenizer_config.json")


def if_licence_url(name_or_path: str) -> str | None:
    """The page where the licence of a gated DeepFloyd model is accepted (None for other ids)."""
    return f"https://huggingface.co/{name_or_path}" if name_or_path.startswith("DeepFloyd/") else None


def preprocess(text: str) -> str:
    """What IF's encoder reads of a prompt: lower-cased and stripped (diffusers' IF pipeline, captions not cleaned)."""
    return text.lower().strip()


def has_fp16_variant(folder: Path) -> tuple[bool, bool]:
    """(fp16 variant present, plain weights present) in a model subfolder (diffusers/transformers naming)."""
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    weights = [n for n in names if n.endswith((".safetensors", ".bin", ".index.json"))]
    fp16 = [n for n in weights if ".fp16." in n or ".fp16-" in n]
    return bool(fp16), len(weights) > len(fp16)


@register("deepfloyd-prompt-processor")
class T5PromptProcessor(BasePromptProcessor):
    """T5 hidden states ``[77, d_model]`` per text from an IF model folder's text encoder."""

    @dataclass
    class Config(BasePromptProcessor.Config):
        pretrained_model_name_or_path: str = DEFAULT_IF_MODEL
        """IF model whose ``text_encoder/`` and ``tokenizer/`` encode the prompts: a hub id (read from
        the local Hugging Face cache only) or a folder in the diffusers layout. Recipes interpolate
        ``${if_model}`` so that the guidance and this processor use the same model."""
        device: Optional[str] = None
        """Where the encoder runs: null picks cuda when available, else cpu (T5-XXL needs about
        19 GB of memory in float32, 10 GB in half precision)."""
        half_precision_weights: Optional[bool] = None
        """Run the encoder in half precision (float16 on CUDA, bfloat16 elsewhere); null: on CUDA
        only. The fp16 weight files are read when the folder has them."""

    cfg: Config

    def configure(self, **kwargs: Any) -> None:
        super().configure(**kwargs)
        self._tokenizer: Any = None
        self._encoder: Any = None
        self._empty: Tensor | None = None

    # -- the encoder -----------------------------------------------------------------------------

    def encoder_device(self) -> torch.device:
        if self.cfg.device:
            return torch.device(self.cfg.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def encoder_dtype(self) -> torch.dtype:
        dev = self.encoder_device()
        half = self.cfg.half_precision_weights
        if half is None:
            half = dev.type == "cuda"
        if not half:
            return torch.float32
        return torch.float16 if dev.type == "cuda" else torch.bfloat16

    def encoder_id(self) -> str:
        name = self.cfg.pretrained_model_name_or_path
        local = Path(name).expanduser()
        if local.is_dir():  # a folder: its absolute path, so two folders never share entries
            name = str(local.resolve())
        return f"deepfloyd-t5/{name}/max{MAX_LENGTH}/lower/{str(self.encoder_dtype()).removeprefix('torch.')}"

    @classmethod
    def missing_weights(cls, cfg: Any, key: str = "system.prompt_processor") -> str | None:
        """Why the encoder ``cfg`` names cannot be loaded here (None when it can), without loading it."""
        from lift3d.utils.hub import MissingWeightsError, resolve_weights

        name = cfg.pretrained_model_name_or_path
        try:
            resolve_weights(name, key=f"{key}.pretrained_model_name_or_path", required=ENCODER_FILES,
                            gated_url=if_licence_url(name))
        except MissingWeightsError as exc:
            return str(exc)
        return None

    def weights_folder(self) -> Path:
        """The IF folder holding the encoder, or a MissingWeightsError naming the key (no loading)."""
        from lift3d.utils.hub import resolve_weights

        name = self.cfg.pretrained_model_name_or_path
        return resolve_weights(name, key=f"{self.cfg_key}.pretrained_model_name_or_path", required=ENCODER_FILES,
                               gated_url=if_licence_url(name)).path

    def load_encoder(self) -> tuple[Any, Any]:
        """(tokenizer, encoder), loaded now if they are not already; frozen, in eval mode."""
        if self._encoder is not None:
            return self._tokenizer, self._encoder
        folder = self.weights_folder()
        if (not (folder / "tokenizer" / "tokenizer.json").is_file()
                and importlib.util.find_spec("sentencepiece") is None):
            raise ConfigError(
                f"config key '{self.cfg_key}.pretrained_model_name_or_path': the T5 tokenizer in "
                f"{folder / 'tokenizer'} is a sentencepiece model (spiece.model, no tokenizer.json), and reading "
                "it needs the sentencepiece package: pip install sentencepiece")
        from transformers import T5EncoderModel, T5TokenizerFast

        dtype, dev = self.encoder_dtype(), self.encoder_device()
        has_fp16, has_plain = has_fp16_variant(folder / "text_encoder")
        variant = "fp16" if has_fp16 and (dtype != torch.float32 or not has_plain) else None
        try:
            tokenizer = T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
            encoder = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype, variant=variant,
                                                     local_files_only=True)
        except (OSError, ValueError) as exc:
            from lift3d.utils.hub import MissingWeightsError

            raise MissingWeightsError(
                f"config key '{self.cfg_key}.pretrained_model_name_or_path': could not load the T5 encoder from "
                f"{folder} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); is the download "
                "complete?") from None
        self._tokenizer, self._encoder = tokenizer, encoder.requires_grad_(False).eval().to(dev)
        return self._tokenizer, self._encoder

    def release_encoder(self) -> None:
        """Drop the tokenizer and encoder (and their memory) once the texts are encoded."""
        on_cuda = self._encoder is not None and next(self._encoder.parameters()).is_cuda
        self._tokenizer = self._encoder = None
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()

    def encode(self, texts: list[str]) -> Float[Tensor, "N 77 D"]:
        """``[N, 77, d_model]`` float32 (CPU) hidden states of ``texts``, padded to 77 tokens."""
        try:
            tokenizer, encoder = self.load_encoder()
            clean = [preprocess(t) for t in texts]
            batch = tokenizer(clean, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                              add_special_tokens=True, return_tensors="pt")
            for text, ids in zip(texts, tokenizer(clean, add_special_tokens=True).input_ids):
                if len(ids) > MAX_LENGTH:
                    log.warning("%s: %r is %d tokens long; IF reads only the first %d", self.name, text, len(ids),
                                MAX_LENGTH)
            dev = next(encoder.parameters()).device
            with torch.no_grad():
                out = encoder(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev))
            return out.last_hidden_state.float().cpu()
        except BaseException:
            self.release_encoder()  # a failed encode must not keep gigabytes alive
            raise

    # -- the empty text, for the guidance's "text dropped" branch ---------------------------------

    def embed(self, texts: list[str]) -> dict[str, Tensor]:
        table = super().embed([*texts, ""])
        self._empty = table[""]
        return table

    def _build(self) -> PromptUtils:
        utils = super()._build()
        if self._empty is None:
            return utils
        return dataclasses.replace(utils, extras={**utils.extras, "empty_text_embedding": self._empty[None]})


__all__ = ["T5PromptProcessor", "DEFAULT_IF_MODEL", "MAX_LENGTH", "if_licence_url", "preprocess", "has_fp16_variant"]
