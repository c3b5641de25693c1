"""MVDream's multi-view UNet, assembled from diffusers parts.

MVDream (Shi et al. 2023) fine-tunes Stable Diffusion 2.1-base (and, in a second published model,
SD 1.5) to denoise ``f`` views of one object
together. Two changes to SD's UNet do it, and both are expressed here without a copy of the
original network:

* every *self*-attention (``attn1`` of each transformer block) attends over the tokens of all views
  of a group at once: the ``[(b f), l, c]`` tokens are regrouped to ``[b, (f l), c]`` before the
  attention and back after it, so a view sees the others. Cross-attention to the text stays per
  view. :class:`MultiViewAttnProcessor` does this as a diffusers attention processor; the number of
  views travels with each call through ``cross_attention_kwargs``, so one model serves any ``f``.
* a camera MLP (Linear, SiLU, Linear: ``camera_dim`` -> time-embedding width -> the same) maps each
  view's flattened 4x4 camera-to-world matrix to a vector that is added to the timestep embedding.
  diffusers' ``class_embed_type="projection"`` is exactly that (a ``TimestepEmbedding`` applied to
  the raw class labels, summed with the time embedding), so the camera goes in as ``class_labels``
  and the MLP's weights sit at ``class_embedding.linear_1`` / ``linear_2``.

Everything else (ResNet blocks, transformer blocks, up/down sampling, the sinusoidal time
projection with cosines first) is diffusers' ``UNet2DConditionModel`` in its SD 2.x (or 1.x)
configuration. :class:`UNetArch` describes one such network; :data:`SD21_BASE_UNET` and
:data:`SD15_UNET` are the published models'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from jaxtyping import Float
from torch import Tensor


@dataclass(frozen=True)
class UNetArch:
    """The shape of an MVDream UNet, in the original model's terms.

    Everything but ``head_channels`` and ``sample_size`` can be read off a checkpoint
    (:func:`lift3d.priors.mvdream.checkpoint.infer_unet_arch`); those two are not stored in it.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    """Width of the first level; the time embedding is 4x this."""
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    """Width of each level as a multiple of ``model_channels``."""
    num_res_blocks: int = 2
    """ResNet blocks per level on the way down (one more per level on the way up)."""
    attention: tuple[bool, ...] = (True, True, True, False)
    """Whether each level has transformer blocks (the middle block always has one)."""
    head_channels: int = 64
    """Channels per attention head (SD 2.x: 64). A level narrower than this gets a single head.
    Ignored when ``num_heads`` is set."""
    num_heads: int | None = None
    """A fixed number of heads at every level (SD 1.x: 8, so the head width grows with the level);
    None: heads of ``head_channels`` channels (SD 2.x)."""
    context_dim: int = 1024
    """Width of the text states cross-attention reads (OpenCLIP ViT-H: 1024; CLIP ViT-L: 768)."""
    camera_dim: int = 16
    """Input width of the camera MLP (a flattened 4x4 matrix)."""
    transformer_depth: int = 1
    """Transformer blocks per attention layer."""
    linear_projection: bool = True
    """Linear (SD 2.x) or 1x1-convolution (SD 1.x) projections into and out of the transformers."""
    sample_size: int = 32
    """Latent size the model works at (256 px through the VAE's factor 8 for the published model)."""

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def heads(self) -> tuple[int, ...]:
        """Attention heads per level (the middle block uses the last level's count)."""
        out = []
        for width in self.block_out_channels:
            if self.num_heads is not None:
                if self.num_heads < 1 or width % self.num_heads:
                    raise ValueError(f"a UNet level of {width} channels does not split into {self.num_heads} heads")
                out.append(self.num_heads)
            elif width <= self.head_channels:
                out.append(1)
            elif width % self.head_channels:
                raise ValueError(f"a UNet level of {width} channels does not split into heads of "
                                 f"{self.head_channels} channels; pass the model's head width")
            else:
                out.append(width // self.head_channels)
        return tuple(out)

    def diffusers_config(self) -> dict[str, Any]:
        """Keyword arguments of ``UNet2DConditionModel`` for this network."""
        down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.attention)
        up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.attention))
        return dict(
            sample_size=self.sample_size, in_channels=self.in_channels, out_channels=self.out_channels,
            down_block_types=down, up_block_types=up, mid_block_type="UNetMidBlock2DCrossAttn",
            block_out_channels=self.block_out_channels, layers_per_block=self.num_res_blocks,
            # diffusers' historical naming: for SD's UNet, ``attention_head_dim`` is the number of heads.
            attention_head_dim=self.heads(), cross_attention_dim=self.context_dim,
            transformer_layers_per_block=self.transformer_depth, use_linear_projection=self.linear_projection,
            norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
            act_fn="silu", class_embed_type="projection", projection_class_embeddings_input_dim=self.camera_dim,
        )


#: The published ``sd-v2.1-base-4view`` UNet (MVDream's sd-v2-base.yaml), working at 32x32 latents.
SD21_BASE_UNET = UNetArch()
#: The published ``sd-v1.5-4view`` UNet (MVDream's sd-v1.yaml): 8 heads per level, CLIP ViT-L's 768-wide
#: text states, 1x1-convolution projections around the transformers; otherwise as the 2.1 one.
SD15_UNET = UNetArch(num_heads=8, context_dim=768, linear_projection=False)


class MultiViewAttnProcessor:
    """A diffusers attention processor that knows how many views make a group.

    With ``joint=True`` (the transformer blocks' self-attention) the ``[(b f), l, c]`` tokens of a
    call are regrouped to ``[b, (f l), c]``, attended over, and split back, so every token of a
    view attends to the tokens of all ``f`` views of its group. With ``joint=False`` (the
    cross-attention to the text) it is plain per-view attention. ``num_views`` comes with each call
    (``cross_attention_kwargs={"num_views": f}``); 1 gives SD's attention exactly.
    """

    def __init__(self, joint: bool):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.joint = joint
        self._attend = AttnProcessor2_0()

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, num_views: int = 1) -> Tensor:
        if not self.joint or num_views == 1 or encoder_hidden_states is not None:
            return self._attend(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if hidden_states.dim() != 3 or attention_mask is not None:
            raise ValueError("joint multi-view attention takes [batch, tokens, channels] hidden states and no mask")
        bf, length, channels = hidden_states.shape
        if bf % num_views:
            raise ValueError(f"a batch of {bf} views cannot be split into groups of num_views={num_views}")
        grouped = hidden_states.reshape(bf // num_views, num_views * length, channels)
        out = self._attend(attn, grouped, None, None, temb)
        return out.reshape(bf, length, out.shape[-1])


def install_multiview_attention(unet: nn.Module) -> None:
    """Give every attention layer of ``unet`` a :class:`MultiViewAttnProcessor`: joint for the
    self-attention (``attn1``), per view for the cross-attention (``attn2``)."""
    names = list(unet.attn_processors)
    bad = [n for n in names if not n.endswith(("attn1.processor", "attn2.processor"))]
    if bad:
        raise ValueError(f"unexpected attention layers for a multi-view UNet: {', '.join(bad[:4])}")
    joint, per_view = MultiViewAttnProcessor(joint=True), MultiViewAttnProcessor(joint=False)
    unet.set_attn_processor({n: joint if n.endswith("attn1.processor") else per_view for n in names})


class MultiViewUNet(nn.Module):
    """MVDream's network: a diffusers ``UNet2DConditionModel`` (``self.unet``) with multi-view
    attention and the camera MLP as its projection class embedding.

    ``forward(x, t, context, camera, num_views)`` takes ``x`` ``[B, C, h, w]`` with B = groups x
    ``num_views`` (consecutive views form a group), timesteps ``[B]`` (or a scalar), text states
    ``[B, L, context_dim]`` and cameras ``[B, camera_dim]``; returns the predicted noise ``[B, C, h, w]``.
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        if getattr(unet, "class_embedding", None) is None:
            raise ValueError("an MVDream UNet needs its camera MLP as the class embedding "
                             "(class_embed_type='projection')")
        self.unet = unet
        install_multiview_attention(unet)

    @classmethod
    def from_arch(cls, arch: UNetArch) -> "MultiViewUNet":
        from diffusers import UNet2DConditionModel

        return cls(UNet2DConditionModel(**arch.diffusers_config()))

    @property
    def config(self) -> Any:
        return self.unet.config

    def forward(self, x: Float[Tensor, "B C h w"], t: Tensor, context: Float[Tensor, "B L D"],
                camera: Float[Tensor, "B K"], num_views: int) -> Float[Tensor, "B C h w"]:
        B = x.shape[0]
        if num_views < 1 or B % num_views:
            raise ValueError(f"a batch of {B} views is not whole groups of num_views={num_views}")
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(B)
        return self.unet(x, t, encoder_hidden_states=context, class_labels=camera,
                         cross_attention_kwargs={"num_views": int(num_views)}).sample


__all__ = ["UNetArch", "SD21_BASE_UNET", "SD15_UNET", "MultiViewAttnProcessor", "MultiViewUNet",
           "install_multiview_attention"]
