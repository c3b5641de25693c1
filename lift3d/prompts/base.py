"""Prompt processors: turn the recipe's prompt into what a guidance conditions on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lift3d.registry import register
from lift3d.utils.base import BaseObject


@dataclass
class PromptUtils:
    """What a guidance receives: the prompt texts (and, for text encoders, their embeddings)."""

    prompt: str
    negative_prompt: str = ""
    extras: dict[str, Any] = field(default_factory=dict)


class BasePromptProcessor(BaseObject):
    category = "prompt-processor"

    @dataclass
    class Config:
        prompt: str = ""
        """The text prompt; recipes usually set it to ``${prompt}`` so ``prompt=...`` on the CLI fills it."""
        negative_prompt: str = ""

    def __call__(self) -> PromptUtils:
        return PromptUtils(self.cfg.prompt, self.cfg.negative_prompt)


@register("plain-prompt-processor")
class PlainPromptProcessor(BasePromptProcessor):
    """Passes the prompt text through unchanged (for guidance that reads text itself)."""
