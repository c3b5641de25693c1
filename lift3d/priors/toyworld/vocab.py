"""The toy world's text side: its vocabulary, a tokenizer and a strict prompt parser.

The embedded prior conditions on a learned embedding per token of a closed vocabulary (the
words of the 33 catalogue prompts), so anything outside it must fail loudly, naming the word and
listing what is valid, instead of being silently mapped to something else.

Decisions:
- Tokens are lowercase words. The article ("a", or "an" which is accepted as its spelling
  variant) is dropped by :func:`tokenize`: every prompt has it, so it carries no information.
  Token sequences are therefore ``[colour, shape]`` for primitives and ``[shape]`` for the
  snowman, chair and mug; :data:`MAX_TOKENS` = 2.
- Id 0 is the padding token ``<pad>``; word ids start at 1 (see :data:`VOCAB`).
- :func:`parse_prompt` matches exactly after lowercasing, collapsing whitespace and reading a
  leading "an" as "a" (the catalogue spells "a orange cube", as the issue does).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import Tensor

from lift3d.priors.toyworld.shapes import ASYMMETRIC, CATALOGUE, COLOURS, PRIMITIVES, list_prompts

PAD = "<pad>"
PAD_ID = 0
ARTICLES = ("a", "an")
#: id -> token. Fixed order: pad, colours, primitive shapes, asymmetric objects.
VOCAB: list[str] = [PAD, *COLOURS, *PRIMITIVES, *ASYMMETRIC]
TOKEN_TO_ID: dict[str, int] = {tok: i for i, tok in enumerate(VOCAB)}
#: Longest token sequence of a catalogue prompt (colour + shape).
MAX_TOKENS = 2


class UnknownPromptError(ValueError):
    """A prompt or word outside the toy world; the message lists what is valid."""


@dataclass(frozen=True)
class ObjectSpec:
    """A parsed prompt: the canonical ``prompt`` (a CATALOGUE key), its ``shape`` word, ``colour``
    word (``"white"``/``"brown"`` for the fixed-colour objects) and ``index`` in ``list_prompts()``."""

    prompt: str
    shape: str
    colour: str
    index: int

    @property
    def object(self):
        return CATALOGUE[self.prompt]


def normalise(prompt: str) -> str:
    """Lowercase, collapse whitespace, read a leading "an" as "a"."""
    words = str(prompt).lower().split()
    if words and words[0] == "an":
        words[0] = "a"
    return " ".join(words)


def tokenize(prompt: str) -> list[int]:
    """Token ids of a prompt's words (articles dropped), no padding.

    Raises UnknownPromptError naming the unknown word(s) and listing the vocabulary.
    """
    words = [w for w in normalise(prompt).split() if w not in ARTICLES]
    unknown = [w for w in words if w not in TOKEN_TO_ID or w == PAD]
    if unknown:
        raise UnknownPromptError(
            f"unknown word(s) {', '.join(repr(w) for w in unknown)} in prompt {prompt!r}; "
            f"the toy-world vocabulary is: {', '.join(VOCAB[1:])} (articles 'a'/'an' are dropped)"
        )
    if not words:
        raise UnknownPromptError(f"prompt {prompt!r} has no words; the vocabulary is: {', '.join(VOCAB[1:])}")
    return [TOKEN_TO_ID[w] for w in words]


def pad_tokens(seqs: list[list[int]], length: int = MAX_TOKENS) -> Tensor:
    """Right-pad token id lists with PAD_ID into a [N, length] long tensor."""
    out = torch.full((len(seqs), length), PAD_ID, dtype=torch.long)
    for i, seq in enumerate(seqs):
        if len(seq) > length:
            raise ValueError(f"token sequence {seq} is longer than {length}")
        out[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def detokenize(ids: list[int] | Tensor) -> str:
    """Token ids (padding ignored) back to the canonical prompt ("a " + words)."""
    ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    return " ".join(["a"] + [VOCAB[i] for i in ids if i != PAD_ID])


def parse_prompt(prompt: str) -> ObjectSpec:
    """The catalogue object a prompt names.

    Exact match after :func:`normalise`; otherwise UnknownPromptError with the closest valid
    prompt (if any is close) and the list of all valid prompts.
    """
    key = normalise(prompt)
    prompts = list_prompts()
    if key not in CATALOGUE:
        close = difflib.get_close_matches(key, prompts, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownPromptError(
            f"prompt {prompt!r} is not a toy-world object.{hint} Valid prompts: {', '.join(prompts)}"
        )
    obj = CATALOGUE[key]
    return ObjectSpec(prompt=key, shape=obj.shape, colour=obj.colour, index=prompts.index(key))


__all__ = [
    "PAD",
    "PAD_ID",
    "VOCAB",
    "TOKEN_TO_ID",
    "MAX_TOKENS",
    "UnknownPromptError",
    "ObjectSpec",
    "normalise",
    "tokenize",
    "pad_tokens",
    "detokenize",
    "parse_prompt",
]
