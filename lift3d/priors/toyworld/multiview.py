"""The toy world's twin of MVDream (Shi et al. 2023, "MVDream: Multi-view Diffusion for 3D Generation").

MVDream denoises a set of views of one object together: the self-attention layers of its UNet
attend over the tokens of every view of the set at once, while the conditioning (text, camera,
timestep) stays per view. Score distillation through such a prior gets views that agree with each
other, which is what keeps it from drawing a face on every side (the Janus problem).

:class:`MultiViewToyPrior` applies the same change to the toy-world prior
(:class:`lift3d.priors.toyworld.model.ToyWorldPrior`) and nothing else:

* Where the attention is. The toy UNet (diffusers' ``UNet2DModel``) has self-attention only at its
  lowest resolution: the last down block and the first up block (with ``attention: true``) and the
  mid block (always); four ``Attention`` layers in the shipped configuration, each over the 8x8
  tokens of one view (the UNet runs at
  32x32 on a space-to-depth view of the 64x64 image and halves twice, so a token covers an 8x8
  patch of pixels). "Joint" means that there each token of a view attends to the 8x8 tokens of
  all ``n_views`` views of its group, 256 tokens for four views. The convolutions, the norms
  (GroupNorm statistics stay per view) and the projections are unchanged.
* How. :class:`JointViewAttnProcessor`, an attention processor, projects queries, keys and values
  per view as before, regroups them ``(b f) l c -> b (f l) c`` for the attention itself, and
  back. With ``f = 1`` it performs the same operations as diffusers' default processor, so the
  model is then the single-view prior, bit for bit.
* Cameras. Each view keeps the per-view conditioning the toy prior already has: its camera vector
  (elevation, azimuth, distance; and the ray map with ``ray_conditioning``) added to the timestep
  embedding, and its own text (in practice the group's). MVDream's separate camera embedding is
  this one.
* New parameters: none. The joint layers reuse the single-view layers' weights (MVDream inflates
  Stable Diffusion's self-attention the same way), so the shipped single-view weights load as they
  are and fine-tuning starts from them (:meth:`MultiViewToyPrior.from_single_view`). The start is
  the shipped model exactly for groups of one view, not for groups of four: a token's softmax now
  also runs over the other views' tokens, which the fine-tune teaches it to use.

Files are the single-view format (safetensors, the ``ToyPriorConfig`` in the metadata key
``lift3d_toyworld_config``) plus a metadata key ``lift3d_toyworld_multiview`` holding the group
size the weights were trained on.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from lift3d.config import parse_structured
from lift3d.priors.toyworld.model import DEFAULT_WEIGHTS, WEIGHTS_DIR, ToyPriorConfig, ToyWorldPrior, sample

DEFAULT_MV_WEIGHTS = WEIGHTS_DIR / "toyworld-mv.safetensors"
MULTIVIEW_META_KEY = "lift3d_toyworld_multiview"
#: How to make the multi-view weights: the command the messages point to.
FINE_TUNE_COMMAND = "python -m lift3d.priors.toyworld train-mv threads=2 --install"


@dataclass
class MultiViewConfig:
    n_views: int = 4
    """Views per group the weights were trained on (MVDream: 4, at azimuths 90 degrees apart); the
    default group size of :meth:`MultiViewToyPrior.forward`."""


class _ViewGroups:
    """The group size of the forward pass under way, shared by all joint processors of one model."""

    def __init__(self) -> None:
        self.n_views = 1


class JointViewAttnProcessor:
    """Self-attention over the tokens of all views of a group (diffusers attention processor).

    Hidden states come in as [(b f), C, H, W] (or [(b f), L, C]) with the ``f`` views of a group
    consecutive. Norm and projections run per view; the attention sees ``b`` sequences of ``f * L``
    tokens. Only what the toy UNet's attention layers use is supported: no cross-attention, no
    attention mask, no spatial norm, no q/k norms.
    """

    def __init__(self, groups: _ViewGroups):
        self.groups = groups

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args: Any, **kwargs: Any) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise NotImplementedError("JointViewAttnProcessor is self-attention only (no encoder states, no mask)")
        if attn.spatial_norm is not None or attn.norm_q is not None or attn.norm_k is not None:
            raise NotImplementedError("JointViewAttnProcessor does not support spatial or q/k norms")
        f = self.groups.n_views
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if batch_size % f:
            raise ValueError(f"joint attention: a batch of {batch_size} views is not whole groups of {f}")
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        # (b f) l c -> b (f l) c: a group's views become one sequence (views are consecutive rows).
        groups = batch_size // f
        query = query.reshape(groups, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.reshape(groups, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.reshape(groups, -1, attn.heads, head_dim).transpose(1, 2)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                                       is_causal=False)
        # b (f l) c -> (b f) l c
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def attention_layers(unet: torch.nn.Module) -> dict[str, Any]:
    """The diffusers ``Attention`` layers of ``unet`` by module name."""
    from diffusers.models.attention_processor import Attention

    return {name: m for name, m in unet.named_modules() if isinstance(m, Attention)}


class MultiViewToyPrior(ToyWorldPrior):
    """``forward(x [B,3,H,W], t [B], tokens [B,L], camera [B,4], drop_text [B], n_views) -> [B,3,H,W]``.

    ``B`` is whole groups of ``n_views`` consecutive views (default: ``mv_cfg.n_views``); each view
    has its own timestep, text and camera, though training and the guidance give one timestep and
    one text to a group. ``n_views=1`` computes exactly what the single-view prior computes.
    """

    def __init__(self, cfg: ToyPriorConfig | dict | None = None, mv_cfg: MultiViewConfig | dict | None = None):
        super().__init__(cfg)
        self.mv_cfg = parse_structured(MultiViewConfig, mv_cfg or {}, key="toyworld.multiview")
        if self.mv_cfg.n_views < 1:
            raise ValueError(f"toyworld.multiview.n_views must be >= 1, got {self.mv_cfg.n_views}")
        self._groups = _ViewGroups()
        for layer in attention_layers(self.unet).values():
            layer.set_processor(JointViewAttnProcessor(self._groups))

    @contextmanager
    def view_groups(self, n_views: int) -> Iterator[None]:
        """Run the joint attention layers with groups of ``n_views`` inside the block."""
        before = self._groups.n_views
        self._groups.n_views = int(n_views)
        try:
            yield
        finally:
            self._groups.n_views = before

    def forward(self, x: Tensor, t: Tensor, tokens: Tensor, camera: Tensor, drop_text: Tensor | None = None,
                n_views: int | None = None) -> Tensor:
        f = self.mv_cfg.n_views if n_views is None else int(n_views)
        if f < 1 or x.shape[0] % f:
            raise ValueError(f"a batch of {x.shape[0]} views cannot be split into groups of n_views={f}")
        with self.view_groups(f):
            return super().forward(x, t, tokens, camera, drop_text)

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:
        """Weights + both configs to a safetensors file (atomically)."""
        meta = {MULTIVIEW_META_KEY: json.dumps(asdict(self.mv_cfg)), **(extra_metadata or {})}
        return super().save(path, meta)

    # what :meth:`ToyWorldPrior.load` reads differently for a multi-view file

    @classmethod
    def default_weights(cls) -> Path:
        """``weights/toyworld-mv.safetensors``: what :meth:`load` reads when given no path."""
        return DEFAULT_MV_WEIGHTS

    @classmethod
    def missing_weights_message(cls, path: Path) -> str:
        return (f"multi-view toy-world prior weights not found at {path}. They are made by fine-tuning the "
                f"shipped single-view prior on groups of views: run `{FINE_TUNE_COMMAND}` (the packaged "
                "recipe-mv.yaml; --install writes them to "
                f"{DEFAULT_MV_WEIGHTS}), or pass the path of a file you trained.")

    @classmethod
    def from_metadata(cls, path: Path, meta: dict[str, str]) -> "MultiViewToyPrior":
        """The architecture and group size of a file written by :meth:`save`; a single-view file is refused."""
        if MULTIVIEW_META_KEY not in meta:
            raise ValueError(f"{path} is a single-view toy-world prior (no '{MULTIVIEW_META_KEY}' in its metadata); "
                             "MultiViewToyPrior.from_single_view(path) starts a multi-view prior from it, and "
                             f"`{FINE_TUNE_COMMAND}` fine-tunes one")
        return cls(json.loads(meta["lift3d_toyworld_config"]), json.loads(meta[MULTIVIEW_META_KEY]))

    @classmethod
    def from_single_view(cls, path: str | Path | None = None, n_views: int = 4) -> "MultiViewToyPrior":
        """The multi-view prior initialised from a single-view file (None or "shipped": the packaged
        weights). Every parameter is the file's; there are no others."""
        src = ToyWorldPrior.load(DEFAULT_WEIGHTS if path in (None, "shipped") else path)
        model = cls(asdict(src.cfg), {"n_views": n_views})
        model.load_state_dict(src.state_dict())  # strict: the two models have the same parameters
        return model


@torch.no_grad()
def sample_groups(model: MultiViewToyPrior, tokens: Tensor, camera: Tensor, n_views: int | None = None,
                  steps: int = 50, guidance_scale: float = 1.0, generator: torch.Generator | None = None,
                  eta: float = 0.0) -> Tensor:
    """DDIM samples of whole groups (consecutive rows of ``tokens`` [B, L] and ``camera`` [B, 4]) with
    classifier-free guidance, denoised jointly. Returns images [B, 3, H, W] in [0, 1].

    This is :func:`lift3d.priors.toyworld.model.sample` (clipped clean estimate, noise re-derived
    from it) with the joint attention over groups of ``n_views`` (default: ``mv_cfg.n_views``); the
    conditional and unconditional halves of each call are whole groups.
    """
    f = model.mv_cfg.n_views if n_views is None else int(n_views)
    if tokens.shape[0] % f:
        raise ValueError(f"sample_groups: {tokens.shape[0]} views are not whole groups of {f}")
    return sample(model, tokens, camera, steps=steps, guidance_scale=guidance_scale, generator=generator, eta=eta,
                  n_views=f)


__all__ = ["DEFAULT_MV_WEIGHTS", "FINE_TUNE_COMMAND", "MULTIVIEW_META_KEY", "MultiViewConfig",
           "JointViewAttnProcessor", "MultiViewToyPrior", "attention_layers", "sample_groups"]
