"""ViewDiff's cross-frame attention: a diffusers attention processor for the UNet's self-attention.

ViewDiff (Höllein et al., CVPR 2024, Sec. 3.2) lets each view of a group attend to the other
views: the self-attention of every transformer block becomes *cross-frame* attention. With hidden
states ``[(b f), L, C]`` (``f`` consecutive views per group, ``L`` tokens each), every query of a
view attends to the keys and values of all ``f * L`` tokens of its group, its own included. We get
that by regrouping the tokens to ``[b, (f L), C]`` around one ``scaled_dot_product_attention``
call: each query sees the whole group, no keys or values are copied. With ``f = 1`` this is the
self-attention Stable Diffusion was trained with; with ``f`` identical views it is too (each key
appears ``f`` times with its value, so the softmax average is unchanged).

The frozen projections ``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` each get a low-rank update
whose effect depends on the view (ViewDiff conditions it on the camera and the image intensity).
Our design, per projection P with input x of view i::

    P'(x) = P(x) + s * up_P( down_P(x) * (1 + gamma_P(c_i)) + beta_P(c_i) )

``down_P`` (``in -> r``) and ``up_P`` (``r -> out``) are bias-free linear layers, ``s`` the LoRA
scale, and ``(gamma_P, beta_P)`` a FiLM of the ``r`` low-rank features computed by one small MLP
per layer (``COND_DIM -> hidden -> 4 x 2r``, SiLU) from the view's condition vector ``c_i``
(:func:`~lift3d.priors.viewdiff.cameras.view_condition`: elevation and azimuth relative to the
group's first view, the distance, the normalised focal lengths and principal point, and the mean
intensity). ``gamma`` rescales the low-rank directions per view, ``beta`` adds a per-view offset
(a pose embedding in the low-rank space). Keys and values are computed per view with that view's
condition before the views are pooled, so a query also "knows" the pose of each token it reads.

``up_P`` starts at zero, so at initialisation the processor is the base model's attention over the
group, whatever the condition; the FiLM MLP starts random, so once ``up_P`` has moved the
condition matters. No attention mask is taken for groups (SD's self-attention has none).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lift3d.priors.viewdiff.cameras import COND_DIM

#: The projections of a diffusers ``Attention`` that get a conditioned LoRA, by short name.
PROJECTIONS = ("q", "k", "v", "out")


class CrossFrameAttnProcessor(nn.Module):
    """Cross-frame self-attention with pose-, intrinsics- and intensity-conditioned LoRA (module docstring).

    Called by diffusers' ``Attention`` as ``processor(attn, hidden_states, ..., n_views=f,
    view_cond=[(b f), COND_DIM])``; the two keywords arrive through the UNet's
    ``cross_attention_kwargs``. Without ``view_cond`` the condition is the zero vector.

    Args:
        dims: ``{"q": (in, out), "k": ..., "v": ..., "out": ...}`` of the projections of the layer.
        rank: the LoRA rank ``r``.
        scale: the LoRA scale ``s``.
        cond_hidden: width of the FiLM MLP's hidden layer.
    """

    def __init__(self, dims: dict[str, tuple[int, int]], rank: int = 4, scale: float = 1.0, cond_hidden: int = 64):
        super().__init__()
        if rank < 1:
            raise ValueError(f"the LoRA rank must be >= 1, got {rank}")
        self.rank, self.scale = int(rank), float(scale)
        self.down = nn.ModuleDict({p: nn.Linear(dims[p][0], rank, bias=False) for p in PROJECTIONS})
        self.up = nn.ModuleDict({p: nn.Linear(rank, dims[p][1], bias=False) for p in PROJECTIONS})
        for p in PROJECTIONS:
            nn.init.normal_(self.down[p].weight, std=1.0 / dims[p][0] ** 0.5)
            nn.init.zeros_(self.up[p].weight)
        self.film = nn.Sequential(nn.Linear(COND_DIM, cond_hidden), nn.SiLU(),
                                  nn.Linear(cond_hidden, len(PROJECTIONS) * 2 * rank))

    @classmethod
    def for_layer(cls, attn: nn.Module, **kwargs: Any) -> "CrossFrameAttnProcessor":
        """A processor sized for diffusers ``Attention`` layer ``attn``."""
        dims = {"q": (attn.to_q.in_features, attn.to_q.out_features), "k": (attn.to_k.in_features, attn.to_k.out_features),
                "v": (attn.to_v.in_features, attn.to_v.out_features),
                "out": (attn.to_out[0].in_features, attn.to_out[0].out_features)}
        proc = cls(dims, **kwargs)
        return proc.to(device=attn.to_q.weight.device, dtype=attn.to_q.weight.dtype)

    def modulation(self, view_cond: Optional[Tensor], n: int, like: Tensor) -> Tensor:
        """``[n, 4, 2, r]``: (gamma, beta) per view and projection."""
        w = self.film[0].weight
        if view_cond is None:
            view_cond = torch.zeros(n, COND_DIM, device=w.device, dtype=w.dtype)
        if view_cond.shape != (n, COND_DIM):
            raise ValueError(f"view_cond must be [{n}, {COND_DIM}] (one condition per view), got {tuple(view_cond.shape)}")
        return self.film(view_cond.to(w.dtype)).to(like.dtype).view(n, len(PROJECTIONS), 2, self.rank)

    def lora(self, p: str, x: Tensor, mod: Tensor) -> Tensor:
        """The conditioned low-rank update of projection ``p`` for ``x`` ``[N, L, in]``."""
        i = PROJECTIONS.index(p)
        h = self.down[p](x)
        h = h * (1 + mod[:, i, 0, None]) + mod[:, i, 1, None]
        return self.up[p](h) * self.scale

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, temb: Optional[Tensor] = None, n_views: int = 1,
                 view_cond: Optional[Tensor] = None, **_: Any) -> Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("cross-frame attention replaces self-attention; it got encoder_hidden_states "
                             "(install it on the attn1 layers only)")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            bf0, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(bf0, channel, height * width).transpose(1, 2)
        N, L, _ = hidden_states.shape
        f = int(n_views)
        if f < 1 or N % f:
            raise ValueError(f"a batch of {N} views cannot be split into groups of n_views={f}")
        if attention_mask is not None:
            if f > 1:
                raise ValueError("cross-frame attention over groups of views takes no attention mask")
            attention_mask = attn.prepare_attention_mask(attention_mask, L, N)
            attention_mask = attention_mask.view(N, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        mod = self.modulation(view_cond, N, hidden_states)
        query = attn.to_q(hidden_states) + self.lora("q", hidden_states, mod)
        key = attn.to_k(hidden_states) + self.lora("k", hidden_states, mod)
        value = attn.to_v(hidden_states) + self.lora("v", hidden_states, mod)
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        b = N // f

        def grouped(x: Tensor) -> Tensor:  # [(b f), L, h d] -> [b, h, (f L), d]
            return x.reshape(b, f * L, heads, head_dim).transpose(1, 2)

        query, key, value = grouped(query), grouped(key), grouped(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(N, L, heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out) + self.lora("out", out, mod)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(bf0, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class PerViewAttnProcessor:
    """Plain attention (diffusers' ``AttnProcessor2_0``) that accepts and ignores the view keywords,
    for the layers that stay per view (the cross-attention to the text)."""

    def __init__(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self._attend = AttnProcessor2_0()

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, temb: Optional[Tensor] = None, n_views: int = 1,
                 view_cond: Optional[Tensor] = None, **_: Any) -> Tensor:
        return self._attend(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def install_cross_frame_attention(unet: nn.Module, rank: int = 4, scale: float = 1.0,
                                  cond_hidden: int = 64) -> dict[str, CrossFrameAttnProcessor]:
    """Give ``unet``'s self-attention layers (``attn1``) a :class:`CrossFrameAttnProcessor` each and
    its other attention layers a :class:`PerViewAttnProcessor`; returns the new modules by layer name."""
    names = list(unet.attn_processors)
    modules = dict(unet.named_modules())
    procs: dict[str, Any] = {}
    added: dict[str, CrossFrameAttnProcessor] = {}
    per_view = PerViewAttnProcessor()
    for name in names:
        layer = name[: -len(".processor")]
        if layer.endswith("attn1"):
            added[layer] = procs[name] = CrossFrameAttnProcessor.for_layer(modules[layer], rank=rank, scale=scale,
                                                                            cond_hidden=cond_hidden)
        else:
            procs[name] = per_view
    if not added:
        raise ValueError("the UNet has no self-attention layer (attn1) for cross-frame attention")
    unet.set_attn_processor(procs)
    return added


__all__ = ["CrossFrameAttnProcessor", "PerViewAttnProcessor", "install_cross_frame_attention", "PROJECTIONS"]
