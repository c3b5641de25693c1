"""Stable Diffusion's UNet and KL autoencoder in the original latent-diffusion layout, named in diffusers' terms.

CompVis' latent-diffusion code (Rombach et al. 2022) stores its UNet (``openaimodel.UNetModel``)
with flat block numbers and its autoencoder with the decoder's levels counted from the bottom;
diffusers names the same modules by level and in running order. Checkpoints published from that
code, MVDream's (:mod:`lift3d.priors.mvdream.checkpoint`) and Zero123's (:mod:`lift3d.priors.zero123`),
are read through the one correspondence written here, module by module: a block is
``(original module, diffusers module, rows)`` and a :class:`Row` pairs a sub-module's two names.

The UNet, in the original numbering: ``input_blocks`` 0 is the input convolution, then per level
``num_res_blocks`` blocks (a ResNet, and a transformer where the level has attention) and a
downsampler but on the last level; ``middle_block`` is ResNet, transformer, ResNet; ``output_blocks``
go from the deepest level up, ``num_res_blocks + 1`` per level, the last of each (but the top
level's) ending in an upsampler whose index follows the block's transformer when there is one.
Transformer internals have the same names on both sides. A level has attention on its way down
and on its way up alike: the original code decides it by resolution.

The autoencoder: same names but for the ResNet shortcut (``nin_shortcut``), the levels
(``encoder.down.I.block.J``, ``decoder.up.I`` with ``up.0`` the last to run) and the mid-block
attention, whose 1x1 convolutions are linear layers in diffusers (``flatten``).
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence


class Row(NamedTuple):
    """One module of a block: its name in the original, in ours, and whether the original stores a
    1x1 convolution kernel ``[o, i, 1, 1]`` where ours has a linear weight ``[o, i]``."""

    original: str
    ours: str
    flatten: bool = False


#: (original module, diffusers module, its rows).
Block = tuple[str, str, tuple[Row, ...]]

#: The module itself: its weight and bias map one to one.
LEAF = (Row("", ""),)
#: The original ResBlock -> diffusers ResnetBlock2D.
UNET_RESNET = (Row("in_layers.0", "norm1"), Row("in_layers.2", "conv1"), Row("emb_layers.1", "time_emb_proj"),
               Row("out_layers.0", "norm2"), Row("out_layers.3", "conv2"), Row("skip_connection", "conv_shortcut"))
#: The inside of an original BasicTransformerBlock (MVDream's 3D one too) and of diffusers': same names.
TRANSFORMER_BLOCK_MODULES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                             "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "norm1", "norm2", "norm3")
#: The autoencoder's original ResnetBlock -> diffusers ResnetBlock2D.
VAE_RESNET = (Row("norm1", "norm1"), Row("conv1", "conv1"), Row("norm2", "norm2"), Row("conv2", "conv2"),
              Row("nin_shortcut", "conv_shortcut"))
#: The original AttnBlock (1x1 convolutions) -> diffusers Attention (linear layers).
VAE_ATTENTION = (Row("norm", "group_norm"), Row("q", "to_q", True), Row("k", "to_k", True), Row("v", "to_v", True),
                 Row("proj_out", "to_out.0", True))


def transformer_rows(depth: int) -> tuple[Row, ...]:
    """The original SpatialTransformer -> diffusers Transformer2DModel, ``depth`` blocks deep."""
    rows = [Row("norm", "norm"), Row("proj_in", "proj_in"), Row("proj_out", "proj_out")]
    for d in range(depth):
        rows += [Row(f"transformer_blocks.{d}.{m}", f"transformer_blocks.{d}.{m}") for m in TRANSFORMER_BLOCK_MODULES]
    return tuple(rows)


def unet_blocks(num_res_blocks: int, attention: Sequence[bool], transformer_depth: int = 1) -> list[Block]:
    """Every block of the UNet (the time embedding, the input, down, middle and up blocks, the
    output), walking the original's numbering; ``attention[lv]`` says whether level ``lv`` (from the
    top, as the input blocks run) has transformers."""
    n, levels = num_res_blocks, len(attention)
    tf = transformer_rows(transformer_depth)
    out: list[Block] = [("time_embed.0", "time_embedding.linear_1", LEAF),
                        ("time_embed.2", "time_embedding.linear_2", LEAF), ("input_blocks.0.0", "conv_in", LEAF)]
    for lv in range(levels):
        for r in range(n):
            i = 1 + lv * (n + 1) + r
            out.append((f"input_blocks.{i}.0", f"down_blocks.{lv}.resnets.{r}", UNET_RESNET))
            if attention[lv]:
                out.append((f"input_blocks.{i}.1", f"down_blocks.{lv}.attentions.{r}", tf))
        if lv < levels - 1:
            out.append((f"input_blocks.{1 + lv * (n + 1) + n}.0.op", f"down_blocks.{lv}.downsamplers.0.conv", LEAF))
    out += [("middle_block.0", "mid_block.resnets.0", UNET_RESNET), ("middle_block.1", "mid_block.attentions.0", tf),
            ("middle_block.2", "mid_block.resnets.1", UNET_RESNET)]
    for j in range(levels):  # diffusers' up_blocks[j] is the original's level (levels - 1 - j)
        lv = levels - 1 - j
        for r in range(n + 1):
            i = j * (n + 1) + r
            out.append((f"output_blocks.{i}.0", f"up_blocks.{j}.resnets.{r}", UNET_RESNET))
            nxt = 1
            if attention[lv]:
                out.append((f"output_blocks.{i}.1", f"up_blocks.{j}.attentions.{r}", tf))
                nxt = 2
            if lv > 0 and r == n:
                out.append((f"output_blocks.{i}.{nxt}.conv", f"up_blocks.{j}.upsamplers.0.conv", LEAF))
    out += [("out.0", "conv_norm_out", LEAF), ("out.2", "conv_out", LEAF)]
    return out


def vae_blocks(levels: int, num_res_blocks: int) -> list[Block]:
    """Every block of the KL autoencoder with ``levels`` levels of ``num_res_blocks`` ResNets (the
    decoder's one more). The original's decoder numbers its levels from the top (``up.0`` is the
    last to run); diffusers' ``up_blocks`` go in run order."""
    out: list[Block] = [
        ("encoder.conv_in", "encoder.conv_in", LEAF), ("decoder.conv_in", "decoder.conv_in", LEAF),
        ("quant_conv", "quant_conv", LEAF), ("post_quant_conv", "post_quant_conv", LEAF)]
    for side in ("encoder", "decoder"):
        out += [(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", VAE_RESNET),
                (f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", VAE_ATTENTION),
                (f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", VAE_RESNET),
                (f"{side}.norm_out", f"{side}.conv_norm_out", LEAF), (f"{side}.conv_out", f"{side}.conv_out", LEAF)]
    for i in range(levels):
        for j in range(num_res_blocks):
            out.append((f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", VAE_RESNET))
        if i < levels - 1:
            out.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv", LEAF))
        k = levels - 1 - i
        for j in range(num_res_blocks + 1):
            out.append((f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{k}.resnets.{j}", VAE_RESNET))
        if i > 0:
            out.append((f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{k}.upsamplers.0.conv", LEAF))
    return out


def parameters(blocks: Sequence[Block]) -> Iterator[tuple[str, str, bool]]:
    """``(our name, original name, flatten)`` of the weight and the bias of every row of ``blocks``
    (``flatten`` only for a weight: a convolution's bias is 1-D in both layouts)."""
    for orig_mod, our_mod, rows in blocks:
        for row in rows:
            for leaf in ("weight", "bias"):
                ours = ".".join(s for s in (our_mod, row.ours, leaf) if s)
                orig = ".".join(s for s in (orig_mod, row.original, leaf) if s)
                yield ours, orig, row.flatten and leaf == "weight"


__all__ = ["Row", "Block", "LEAF", "UNET_RESNET", "TRANSFORMER_BLOCK_MODULES", "VAE_RESNET", "VAE_ATTENTION",
           "transformer_rows", "unet_blocks", "vae_blocks", "parameters"]
