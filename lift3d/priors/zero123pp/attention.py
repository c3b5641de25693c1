"""Reference attention: the self-attention of one UNet pass also attends to another pass's features.

Zero123++ conditions its UNet on the input image's local detail the way the diffusers community
"reference-only" pipeline does: the input image's latent, noised to the current timestep, is run
through the same UNet first, and every self-attention layer keeps the (normalised) hidden states
it was given. In the pass over the views, each self-attention layer then computes its keys and
values from its own hidden states *followed by* the stored ones along the token axis, while its
queries stay its own: every view token can look at every token of the input image.

:class:`ReferenceAttnProcessor` is a diffusers attention processor that does this around any
other processor (diffusers' scaled-dot-product one by default). The processors of one UNet share
a :class:`ReferenceState` that says what they do on the next call:

* ``"write"``: store the layer's input under the layer's name, then attend as usual;
* ``"read"``: attend over ``cat([own, stored], dim=1)`` (the stored entry is consumed);
* ``"off"``: plain self-attention (the UNet used as an ordinary one).

Only self-attention layers (``attn1`` in diffusers' transformer blocks) take part; cross-attention
to the text states is untouched. Rows of the batch pair up: row i of the read pass sees row i of
the write pass (classifier-free guidance runs its two branches as two rows, each with its own
reference).

A property worth knowing (and tested): attending over a sequence followed by an exact copy of
itself gives the same output as attending over it once, since every key appears twice with the
same value and the softmax weights halve. So a read whose stored states equal the layer's own
input reproduces plain self-attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

Mode = Literal["write", "read", "off"]


@dataclass
class ReferenceState:
    """What the reference processors of one UNet do next, and what the write pass left them."""

    mode: Mode = "off"
    cache: dict[str, Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        self.cache.clear()
        self.mode = "off"


class ReferenceAttnProcessor:
    """Self-attention that also attends to a stored reference sequence (see the module docstring)."""

    def __init__(self, name: str, state: ReferenceState, inner: Any = None):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.name, self.state = name, state
        self.inner = inner if inner is not None else AttnProcessor2_0()

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None) -> Tensor:
        mode = self.state.mode
        if encoder_hidden_states is not None or mode == "off":
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask)
        if hidden_states.dim() != 3:
            raise ValueError(f"reference attention at {self.name}: expected tokens [B, N, C], got "
                             f"{tuple(hidden_states.shape)}")
        if mode == "write":
            self.state.cache[self.name] = hidden_states
            return self.inner(attn, hidden_states, None, attention_mask)
        if mode == "read":
            ref = self.state.cache.pop(self.name, None)
            if ref is None:
                raise RuntimeError(f"reference attention at {self.name}: nothing stored; run the reference pass "
                                   "(mode 'write') first")
            if ref.shape[0] != hidden_states.shape[0] or ref.shape[2] != hidden_states.shape[2]:
                raise ValueError(f"reference attention at {self.name}: stored states {tuple(ref.shape)} do not pair "
                                 f"with {tuple(hidden_states.shape)} (batch and channels must agree)")
            kv = torch.cat([hidden_states, ref.to(hidden_states.dtype)], dim=1)
            return self.inner(attn, hidden_states, kv, attention_mask)
        raise ValueError(f"unknown reference attention mode {mode!r}; valid: write, read, off")


def is_self_attention(name: str) -> bool:
    """Whether the processor named ``name`` (a key of ``unet.attn_processors``) is a transformer block's
    self-attention, the layers Zero123++ extends."""
    return name.endswith("attn1.processor")


def install_reference_attention(unet: Any) -> ReferenceState:
    """Give every self-attention layer of the diffusers ``unet`` a :class:`ReferenceAttnProcessor` around
    its current processor; returns the state they share. Installing twice is a no-op that returns the
    existing state."""
    procs = dict(unet.attn_processors)
    existing = [p for p in procs.values() if isinstance(p, ReferenceAttnProcessor)]
    if existing:
        return existing[0].state
    state = ReferenceState()
    new = {name: (ReferenceAttnProcessor(name, state, proc) if is_self_attention(name) else proc)
           for name, proc in procs.items()}
    if not any(isinstance(p, ReferenceAttnProcessor) for p in new.values()):
        raise ValueError("the UNet has no transformer self-attention layers (attn1) for reference attention")
    unet.set_attn_processor(new)
    return state


__all__ = ["ReferenceAttnProcessor", "ReferenceState", "install_reference_attention", "is_self_attention"]
