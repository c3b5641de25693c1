"""MVDream's prompt processor: prompts become the hidden states of the checkpoint's own text tower.

MVDream (Shi et al. 2023) conditions on OpenCLIP ViT-H/14's text tower as Stable Diffusion 2.x does
(``FrozenOpenCLIPEmbedder(layer="penultimate")``): the output of the second-to-last transformer
layer after the final layer norm, ``[77, 1024]``. The tower's weights are in the same single-file
checkpoint as the UNet; they are read through MVDream's key map
(:mod:`lift3d.priors.mvdream.checkpoint`) into a transformers ``CLIPTextModel`` with the last
layer left out, whose ``last_hidden_state`` is that output. No open_clip dependency.

Tokens: OpenCLIP's BPE vocabulary is OpenAI CLIP's, which Stable Diffusion 2.x ships as its
``tokenizer`` folder; the file itself holds no vocabulary. Texts are tokenized with start and end
tokens, cut to 77, and padded with id 0, as ``open_clip.tokenize`` pads (not with the end token, as
transformers' CLIP tokenizer would by default): the tower attends causally, and the padding rows
the UNet attends to depend on it.

MVDream's SD 1.5 model (``sd-v1.5-4view.pt``, found out from the file's keys) conditions instead on
OpenAI CLIP ViT-L/14's text model whole (its last layer after the final norm, ``[77, 768]``, quick-GELU),
as Stable Diffusion 1.x's ``FrozenCLIPEmbedder`` does; its texts are padded with the end token (what
``padding="max_length"`` gives with that tokenizer), and its default vocabulary source is
``openai/clip-vit-large-patch14``'s tokenizer files.

The encoder is loaded only when a text misses the embedding cache, used for every missing text,
and freed. The empty text is always encoded too (``PromptUtils.extras["null_text_embeddings"]``),
the model's "no text", for guidances that drop the prompt.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from lift3d.prompts.clip import HiddenStatePromptProcessor
from lift3d.registry import register

#: Where the BPE vocabulary comes from when no tokenizer folder sits beside the checkpoint.
DEFAULT_TOKENIZER_MODEL = "stabilityai/stable-diffusion-2-1-base"


def open_clip_token_ids(tokenizer: Any, texts: list[str], length: int, pad_id: int = 0) -> Tensor:
    """``[N, length]`` token ids as ``open_clip.tokenize`` makes them: start, text, end, cut to
    ``length`` keeping the end token, then ``pad_id`` (zeros; SD 1.x's CLIP tokenizer pads with the
    end token instead)."""
    rows = tokenizer(texts, truncation=True, max_length=length, padding=False)["input_ids"]
    ids = torch.full((len(texts), length), int(pad_id), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row[:length])
    return ids


@register("mvdream-prompt-processor")
class MVDreamPromptProcessor(HiddenStatePromptProcessor):
    """OpenCLIP penultimate-layer states ``[1, 77, D]`` per text, from MVDream's checkpoint, for
    ``mvdream-guidance``."""

    @dataclass
    class Config(HiddenStatePromptProcessor.Config):
        pretrained_model_name_or_path: str = "MVDream/MVDream"
        """The same checkpoint as the guidance (recipes set both to ``${mvdream_model}``): a file, a
        folder holding ``filename``, or a Hugging Face id found in the local cache."""
        filename: str = "sd-v2.1-base-4view.pt"
        """The file to read from a folder or a Hugging Face id."""
        revision: Optional[str] = None
        """A Hugging Face revision to look up in the cache."""
        tokenizer_name_or_path: Optional[str] = None
        """A CLIP BPE tokenizer: a folder (its ``tokenizer`` subfolder if it has one) or a Hugging Face
        id found in the cache. null: a ``tokenizer`` folder beside the checkpoint file if there is one,
        else Stable Diffusion 2.1-base's (``hf download stabilityai/stable-diffusion-2-1-base --include
        "tokenizer/*"``, a few MB), or for MVDream's SD 1.5 model ``openai/clip-vit-large-patch14``'s."""
        device: Optional[str] = None
        """Where the text tower runs (it is freed after encoding); null: CUDA when available, else the CPU."""
        view_dependent_prompting: bool = False
        """MVDream gets the view from the camera; the prompt is not reworded per view."""

    cfg: Config

    def configure(self, **kwargs: Any) -> None:
        super().configure(**kwargs)
        self._checkpoint: Path | None = None
        self._tokenizer_folder: Path | None = None
        self._pad_with_end_token = False

    # -- weights ---------------------------------------------------------------------------------

    @classmethod
    def _resolve(cls, cfg: Any, key: str) -> tuple[Path, Path]:
        """(checkpoint file, tokenizer folder), or MissingWeightsError naming the key."""
        from lift3d.priors.mvdream.checkpoint import CheckpointLayoutError, checkpoint_variant, resolve_checkpoint
        from lift3d.utils.hub import MissingWeightsError, resolve_weights

        ckpt = resolve_checkpoint(cfg.pretrained_model_name_or_path, cfg.filename,
                                  key=f"{key}.pretrained_model_name_or_path", revision=cfg.revision)
        name = cfg.tokenizer_name_or_path
        if name is None and (ckpt.parent / "tokenizer").is_dir():
            return ckpt, ckpt.parent / "tokenizer"
        tok_key = f"{key}.tokenizer_name_or_path"
        default, fetch, source = DEFAULT_TOKENIZER_MODEL, f'hf download {DEFAULT_TOKENIZER_MODEL} --include ' \
            '"tokenizer/*"', "Stable Diffusion 2.x ships it"
        if name is None:
            try:
                variant = checkpoint_variant(ckpt)
            except (CheckpointLayoutError, OSError, RuntimeError):
                variant = None  # the load says what is wrong with the file
            if variant is not None and variant.pad_with_end_token:
                default, fetch = variant.tokenizer, variant.tokenizer_download
                source = f"for MVDream {variant.name}, {variant.tokenizer} ships it"
        try:
            folder = resolve_weights(name or default, key=tok_key).path
        except MissingWeightsError as exc:
            raise MissingWeightsError(
                f"{str(exc).rstrip('.')}. MVDream's text tower reads CLIP's BPE vocabulary, which the checkpoint "
                f"does not hold; {source}: `{fetch}` fetches only that. Or put a tokenizer/ folder beside {ckpt}, "
                f"or set {tok_key}= to a CLIP tokenizer folder.") from None
        folder = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder
        if not (folder / "vocab.json").is_file():
            raise MissingWeightsError(f"config key '{tok_key}': {folder} holds no vocab.json; it is not a CLIP "
                                      "tokenizer folder")
        return ckpt, folder

    @classmethod
    def missing_weights(cls, cfg: Any, key: str = "system.prompt_processor") -> str | None:
        """Why the checkpoint or the tokenizer cannot be found here (None when both can), without loading."""
        from lift3d.utils.hub import MissingWeightsError

        try:
            cls._resolve(cfg, key)
        except MissingWeightsError as exc:
            return str(exc)
        return None

    def files(self) -> tuple[Path, Path]:
        if self._checkpoint is None:
            self._checkpoint, self._tokenizer_folder = self._resolve(self.cfg, self.cfg_key)
        return self._checkpoint, self._tokenizer_folder  # type: ignore[return-value]

    def encoder_id(self) -> str:
        # The checkpoint's path, size and time, and the tokenizer's files: new weights or a new
        # vocabulary give a new id, so stale embeddings are never read back.
        ckpt, tok = self.files()
        h = hashlib.sha256()
        for f in [ckpt, *sorted(p for p in tok.rglob("*") if p.is_file())]:
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return f"mvdream-openclip-penultimate/{ckpt}/{h.hexdigest()[:16]}"

    def load_encoder(self) -> tuple[Any, Any]:
        """(tokenizer, text model), loaded on first use."""
        if self._text_encoder is None:
            from transformers import CLIPTokenizer

            from lift3d.priors.mvdream.checkpoint import load_mvdream
            from lift3d.utils.hub import MissingWeightsError

            ckpt, tok = self.files()
            device = self.encoder_device()
            try:
                self._tokenizer = CLIPTokenizer.from_pretrained(str(tok), local_files_only=True)
            except (OSError, ValueError) as exc:
                raise MissingWeightsError(f"config key '{self.cfg_key}.tokenizer_name_or_path': the tokenizer in "
                                          f"{tok} does not load: {exc}") from exc
            try:
                weights = load_mvdream(ckpt, parts=("text",))
            except (OSError, EOFError, RuntimeError) as exc:
                raise MissingWeightsError(f"config key '{self.cfg_key}.pretrained_model_name_or_path' = "
                                          f"{self.cfg.pretrained_model_name_or_path!r}: {ckpt} does not load "
                                          f"(interrupted download?): {exc}") from exc
            self._pad_with_end_token = weights.arch.variant.pad_with_end_token
            self._text_encoder = weights.text_encoder.to(device).eval()
        return self._tokenizer, self._text_encoder

    # -- encoding --------------------------------------------------------------------------------
    # (encode, release_encoder, the empty text alongside: HiddenStatePromptProcessor's; the text model
    # built by load_mvdream stops at the penultimate layer, so its last_hidden_state is that layer's.)

    def token_ids(self, tokenizer: Any, encoder: Any, texts: list[str]) -> Tensor:
        """Padded to the tower's context length: with zeros, as ``open_clip.tokenize`` pads (2.1), or
        with the end token, as SD 1.x's CLIP tokenizer pads (1.5)."""
        pad = int(tokenizer.eos_token_id) if self._pad_with_end_token else 0
        return open_clip_token_ids(tokenizer, texts, int(encoder.config.max_position_embeddings), pad)


__all__ = ["MVDreamPromptProcessor", "open_clip_token_ids", "DEFAULT_TOKENIZER_MODEL"]
