"""The toy world's prompt processor: prompts become the toy prior's token ids.

The embedded toy prior (``lift3d.priors.toyworld``) conditions on a learned embedding per token of
a closed vocabulary, so its "text encoder" is the tokenizer: an embedding is the row of token ids
``[MAX_TOKENS]`` (int64), right-padded with the pad id 0. The empty negative prompt encodes to an
all-pad row, which the prior reads as "text dropped", i.e. the unconditional branch it was trained
with.

Decisions:
- View-dependent prompting is off and cannot be turned on: the vocabulary has no "side view"
  words, and the toy prior already sees the camera, which is what view-dependent prompts stand in
  for with text-only priors.
- No disk cache by default: tokenising is free.
- The prompt and negative prompt are tokenised when the processor is built (cheap), so a word
  outside the vocabulary stops the run at start-up with the config key that holds it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from jaxtyping import Int
from torch import Tensor

from lift3d.config import ConfigError
from lift3d.priors.toyworld.vocab import MAX_TOKENS, VOCAB, UnknownPromptError, pad_tokens, tokenize
from lift3d.prompts.base import BasePromptProcessor
from lift3d.registry import register


class ToyPromptError(UnknownPromptError, ConfigError):
    """A toy-world prompt with words outside the vocabulary (also a config error: the run cannot start)."""


@register("toyworld-prompt-processor")
class ToyWorldPromptProcessor(BasePromptProcessor):
    """Token ids of the toy world's closed vocabulary, as the ``toyworld-*`` guidances consume them."""

    @dataclass
    class Config(BasePromptProcessor.Config):
        view_dependent_prompting: bool = False
        """Must stay false: the toy vocabulary has no view words and the toy prior is camera-conditioned."""
        use_cache: bool = False
        """Off by default: tokenising costs nothing, a disk cache would only cost file reads."""

    cfg: Config

    def configure(self, **kwargs: Any) -> None:
        super().configure(**kwargs)
        if self.cfg.view_dependent_prompting:
            raise ConfigError(
                f"config key {self.key('view_dependent_prompting')}: {self.name} does not support view-dependent "
                "prompting (the toy vocabulary has no view words, and the toy prior is told the camera directly); "
                "set it to false"
            )
        for name in ("prompt", "negative_prompt"):
            text = getattr(self.cfg, name)
            if text.strip():
                self._tokens(text, name)

    def _tokens(self, text: str, name: str = "prompt") -> list[int]:
        try:
            return tokenize(text)
        except UnknownPromptError as exc:
            raise ToyPromptError(f"config key {self.key(name)}: {exc}") from None

    def encoder_id(self) -> str:
        vocab = hashlib.sha256("\n".join(VOCAB).encode("utf-8")).hexdigest()[:16]
        return f"toyworld-vocab/{vocab}/max{MAX_TOKENS}"

    def encode(self, texts: list[str]) -> Int[Tensor, "N L"]:
        """``[N, MAX_TOKENS]`` int64 token ids; an empty text is an all-pad (all-zero) row."""
        field_of = {self.cfg.negative_prompt: "negative_prompt", self.cfg.prompt: "prompt"}
        rows = [self._tokens(t, field_of.get(t, "prompt")) if t.strip() else [] for t in texts]
        return pad_tokens(rows)


__all__ = ["ToyWorldPromptProcessor", "ToyPromptError"]
