"""MVDream's published checkpoint, read through an explicit key map.

``sd-v2.1-base-4view.pt`` (https://huggingface.co/MVDream/MVDream) is the ``state_dict()`` of the
original ``LatentDiffusionInterface``, one file in the LDM key layout:

* ``model.diffusion_model.*``: the multi-view UNet in the original numbering (``input_blocks.N.M``,
  ``middle_block.M``, ``output_blocks.N.M``, ``time_embed``, ``out``) plus ``camera_embed.0`` /
  ``camera_embed.2``, the camera MLP;
* ``first_stage_model.*``: the KL autoencoder (``encoder.down.I.block.J``, ``decoder.up.I``, ...);
* ``cond_stage_model.model.*``: the OpenCLIP ViT-H/14 text tower (fused ``attn.in_proj_weight``);
* the noise schedule's buffers (``betas``, ``alphas_cumprod``, ...), when the interface saved them.

:func:`build_key_map` writes out, for the architecture a file's shapes describe, where every original
key goes: a parameter of :class:`~lift3d.priors.mvdream.network.MultiViewUNet`'s diffusers UNet,
of diffusers' ``AutoencoderKL``, of transformers' ``CLIPTextModel``, or the schedule; or why it is
read and not used (the text tower's last layer, CLIP's projection head, derived schedule buffers).
Loading checks it both ways: a key of the file that the map does not place is an error listing
those keys, and a parameter of a model that no key of the file fills is an error listing those.
A conversion script that knows only Stable Diffusion would drop ``camera_embed`` without a word;
here it maps to ``class_embedding.linear_1`` / ``linear_2``, and a file without it does not load.
The UNet's other blocks and the autoencoder follow Stable Diffusion's original layout, written once
in :mod:`lift3d.priors.ldm_keys` (Zero123's key map reads it too).

The text tower is stored the way diffusers stores SD 2.x's text encoder: MVDream's
``FrozenOpenCLIPEmbedder(layer="penultimate")`` runs all but the last transformer layer and then
the final layer norm, which is a ``CLIPTextModel`` with one layer fewer whose ``last_hidden_state``
is the conditioning. OpenCLIP's fused input projection is split into ``q_proj``, ``k_proj`` and
``v_proj`` (its rows, in that order).

The architecture is read off the file's shapes (:func:`infer_architecture`), so a tiny test
checkpoint loads as the real one does. Two things are not stored and have documented defaults:
attention heads are :data:`HEAD_CHANNELS` channels wide (SD 2.x's UNet and ViT-H's text tower), a
layer narrower than that getting one head; and the VAE's latent scale is :data:`SCALING_FACTOR`.
Files are read with ``torch.load(weights_only=True)`` (no pickle code runs) or as safetensors.

Two published variants (:data:`VARIANTS`), told apart by the file itself (:func:`detect_variant`):

* ``sd-v2.1-base`` (``sd-v2.1-base-4view.pt``): all of the above;
* ``sd-v1.5`` (``sd-v1.5-4view.pt``, MVDream's sd-v1.yaml): the UNet has 8 heads at every level
  (not 64-channel heads), 768-wide text states and 1x1 convolutions as the transformers' input and
  output projections (stored ``[o, i, 1, 1]``; diffusers builds convolutions for them too). The
  text side is Stable Diffusion 1.x's ``FrozenCLIPEmbedder``: OpenAI CLIP ViT-L/14's text model,
  stored under ``cond_stage_model.transformer.*`` already in transformers' ``CLIPTextModel``
  naming (``text_model.encoder.layers.N.self_attn.q_proj``, ...), used whole (the conditioning is
  the last layer's output after the final layer norm) with quick-GELU activations. Its vocabulary
  is the same BPE, but texts are padded with the end token, not zeros. VAE, camera MLP (16 -> 1280
  -> 1280) and noise schedule are the same as 2.1's.

The variant is read from the text tower's prefix, or, in a file without one, from the shape of the
UNet's transformer projections; a file whose parts disagree is refused.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from lift3d.config import ConfigError
from lift3d.priors import ldm_keys
from lift3d.priors.ldm_keys import LEAF, Block, Row
from lift3d.priors.mvdream.network import MultiViewUNet, UNetArch

#: The published model on the Hugging Face hub, and its file.
DEFAULT_MVDREAM_MODEL = "MVDream/MVDream"
DEFAULT_MVDREAM_FILE = "sd-v2.1-base-4view.pt"
#: Key prefixes of the three networks in the original file.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.model."
#: SD 1.x's text tower (``FrozenCLIPEmbedder``: a transformers CLIPTextModel under ``transformer``).
CLIP_TEXT_PREFIX = "cond_stage_model.transformer."
#: Channels per attention head when the file does not say (it never does): SD 2.x and OpenCLIP ViT-H.
HEAD_CHANNELS = 64
#: The KL autoencoder's latent scale in MVDream's (and SD 2.x's) config; not stored in the file.
SCALING_FACTOR = 0.18215
#: MVDream's training noise schedule (LDM "linear": betas linear in sqrt), used when the file has none.
BETA_START, BETA_END, NUM_TRAIN_TIMESTEPS = 0.00085, 0.012, 1000
#: The interface's schedule buffers: only alphas_cumprod is read, the rest follow from it.
SCHEDULE_KEYS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2")
#: The parts a file holds, in load order.
PARTS = ("unet", "vae", "text")


class CheckpointLayoutError(ConfigError):
    """A checkpoint whose keys or shapes do not match MVDream's layout (names the keys)."""


@dataclass(frozen=True)
class Variant:
    """What differs between the published MVDream models and is not stored in the file."""

    name: str
    filename: str
    """The file's name on the hub (MVDream/MVDream)."""
    text_prefix: str
    """Where the text tower's keys sit."""
    head_channels: int | None
    """UNet heads of this many channels (SD 2.x), or None when the count is fixed."""
    num_heads: int | None
    """A fixed number of UNet heads per level (SD 1.x), or None."""
    linear_projection: bool
    """Linear (True) or 1x1-convolution projections around the UNet's transformers."""
    tokenizer: str
    """Hugging Face id of a matching CLIP BPE tokenizer (the file holds no vocabulary)."""
    tokenizer_download: str
    """The command that fetches only that tokenizer."""
    pad_with_end_token: bool
    """Texts padded with the end token (transformers' CLIP tokenizer, SD 1.x) rather than zeros (open_clip)."""


SD21 = Variant("sd-v2.1-base", "sd-v2.1-base-4view.pt", TEXT_PREFIX, head_channels=64, num_heads=None,
               linear_projection=True, tokenizer="stabilityai/stable-diffusion-2-1-base",
               tokenizer_download='hf download stabilityai/stable-diffusion-2-1-base --include "tokenizer/*"',
               pad_with_end_token=False)
SD15 = Variant("sd-v1.5", "sd-v1.5-4view.pt", CLIP_TEXT_PREFIX, head_channels=None, num_heads=8,
               linear_projection=False, tokenizer="openai/clip-vit-large-patch14",
               tokenizer_download=('hf download openai/clip-vit-large-patch14 vocab.json merges.txt '
                                   'tokenizer_config.json special_tokens_map.json tokenizer.json'),
               pad_with_end_token=True)
#: The published variants by name.
VARIANTS = {v.name: v for v in (SD21, SD15)}


def detect_variant(shapes: Mapping[str, tuple]) -> Variant:
    """The published variant a file's keys and shapes describe (CheckpointLayoutError when they mix)."""
    has = {v.name: any(k.startswith(v.text_prefix) for k in shapes) for v in VARIANTS.values()}
    proj = shapes.get(UNET_PREFIX + "middle_block.1.proj_in.weight")
    by_unet = None if proj is None else (SD21 if len(proj) == 2 else SD15)
    if has[SD21.name] and has[SD15.name]:
        raise CheckpointLayoutError(f"the checkpoint holds two text towers ({SD21.text_prefix}* of MVDream sd-v2.1 "
                                    f"and {SD15.text_prefix}* of MVDream sd-v1.5); it is neither published model")
    by_text = SD21 if has[SD21.name] else SD15 if has[SD15.name] else None
    if by_text is not None and by_unet is not None and by_text is not by_unet:
        raise CheckpointLayoutError(
            f"the checkpoint's text tower ({by_text.text_prefix}*) is MVDream {by_text.name}'s, but its UNet's "
            f"transformer projections ({UNET_PREFIX}middle_block.1.proj_in.weight {tuple(proj)}) are "
            f"{'linear' if by_unet.linear_projection else '1x1 convolutions'}, as in {by_unet.name}")
    return by_text or by_unet or SD21


# ---------------------------------------------------------------------------------------------
# Architectures read off the file


@dataclass(frozen=True)
class VaeArch:
    """The KL autoencoder (LDM's ``ddconfig``)."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    sample_size: int = 256

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side: one halving per level but the last."""
        return 2 ** (len(self.ch_mult) - 1)

    def diffusers_config(self) -> dict[str, Any]:
        n = len(self.ch_mult)
        return dict(in_channels=self.in_channels, out_channels=self.out_channels,
                    down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                    block_out_channels=tuple(self.ch * m for m in self.ch_mult), layers_per_block=self.num_res_blocks,
                    latent_channels=self.z_channels, norm_num_groups=32, sample_size=self.sample_size,
                    scaling_factor=SCALING_FACTOR)


@dataclass(frozen=True)
class TextArch:
    """The text tower: all its layers, of which the model built from it keeps all (SD 1.x's CLIP,
    ``skip_last=False``) or all but the last (OpenCLIP's penultimate layer, ``skip_last=True``)."""

    vocab_size: int = 49408
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_width: int = 4096
    context_length: int = 77
    skip_last: bool = True
    """MVDream 2.1 conditions on the penultimate layer; 1.5 on the last."""
    activation: str = "gelu"
    """The MLP's activation: OpenCLIP ViT-H uses GELU, OpenAI CLIP ViT-L quick-GELU."""

    @property
    def used_layers(self) -> int:
        return self.layers - 1 if self.skip_last else self.layers

    def transformers_config(self) -> Any:
        from transformers import CLIPTextConfig

        return CLIPTextConfig(
            vocab_size=self.vocab_size, hidden_size=self.width, intermediate_size=self.mlp_width,
            num_hidden_layers=self.used_layers, num_attention_heads=self.heads,
            max_position_embeddings=self.context_length, hidden_act=self.activation, layer_norm_eps=1e-5,
            # CLIP's BPE puts its two special tokens last; padding is id 0, as open_clip pads.
            bos_token_id=self.vocab_size - 2, eos_token_id=self.vocab_size - 1, pad_token_id=0,
        )


@dataclass(frozen=True)
class MVDreamArch:
    unet: UNetArch
    vae: VaeArch
    text: TextArch | None
    """None for a file without the text tower (a UNet-and-VAE file; only the guidance can use it)."""
    variant: Variant = SD21
    """The published model the file is (:func:`detect_variant`)."""


def _need(shapes: Mapping[str, tuple], key: str, what: str) -> tuple:
    if key not in shapes:
        raise CheckpointLayoutError(f"the checkpoint has no {key!r} ({what}); it is not an MVDream checkpoint in "
                                    "the original layout (model.diffusion_model.*, first_stage_model.*, "
                                    "cond_stage_model.model.* or cond_stage_model.transformer.*)")
    return tuple(shapes[key])


def _indices(shapes: Mapping[str, Any], prefix: str) -> list[int]:
    """Sorted distinct integers N of the keys ``prefix + "N." + ...``."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in shapes if (m := pat.match(k))})


def _heads(width: int, head_channels: int, what: str) -> int:
    if width <= head_channels:
        return 1
    if width % head_channels:
        raise CheckpointLayoutError(f"{what} is {width} channels wide, which does not split into heads of "
                                    f"{head_channels} channels")
    return width // head_channels


def infer_unet_arch(shapes: Mapping[str, tuple], head_channels: int = HEAD_CHANNELS,
                    sample_size: int = 32, num_heads: int | None = None) -> UNetArch:
    """The UNet that the ``model.diffusion_model.*`` shapes describe (heads of ``head_channels``
    channels, or ``num_heads`` heads per level when given)."""
    p = UNET_PREFIX
    conv_in = _need(shapes, p + "input_blocks.0.0.weight", "the UNet's input convolution")
    camera = shapes.get(p + "camera_embed.0.weight")
    if camera is None:
        raise CheckpointLayoutError(
            f"the checkpoint has no {p}camera_embed.0.weight: MVDream's camera MLP is missing, so this is not an "
            "MVDream checkpoint (a plain Stable Diffusion UNet has no camera embedding)")
    mc, in_ch = int(conv_in[0]), int(conv_in[1])
    blocks = _indices(shapes, p + "input_blocks.")
    downs = [i for i in blocks if p + f"input_blocks.{i}.0.op.weight" in shapes]
    levels = len(downs) + 1
    nres = downs[0] - 1 if downs else len(blocks) - 1
    expected_downs = [1 + lv * (nres + 1) + nres for lv in range(levels - 1)]
    if nres < 1 or downs != expected_downs or blocks != list(range(1 + levels * nres + levels - 1)):
        raise CheckpointLayoutError(
            f"the UNet's input_blocks {blocks} (downsamplers at {downs}) do not form levels of equally many "
            "ResNet blocks, as MVDream's UNet has")
    first = [1 + lv * (nres + 1) for lv in range(levels)]
    widths = [int(_need(shapes, p + f"input_blocks.{i}.0.out_layers.3.weight", "a ResNet block")[0]) for i in first]
    if any(w % mc for w in widths):
        raise CheckpointLayoutError(f"UNet level widths {widths} are not multiples of the first width {mc}")
    time_embed = _need(shapes, p + "time_embed.0.weight", "the time embedding")
    if int(time_embed[0]) != 4 * mc:
        raise CheckpointLayoutError(f"the time embedding is {time_embed[0]} wide; MVDream's UNet uses 4 x {mc}")
    mid = p + "middle_block.1."
    _need(shapes, mid + "norm.weight", "the middle block's transformer")
    depth = len(_indices(shapes, mid + "transformer_blocks."))
    proj_in = _need(shapes, mid + "proj_in.weight", "the middle transformer's input projection")
    context = _need(shapes, mid + "transformer_blocks.0.attn2.to_k.weight", "the cross-attention")
    arch = UNetArch(
        in_channels=in_ch, out_channels=int(_need(shapes, p + "out.2.weight", "the output convolution")[0]),
        model_channels=mc, channel_mult=tuple(w // mc for w in widths), num_res_blocks=nres,
        attention=tuple(p + f"input_blocks.{i}.1.norm.weight" in shapes for i in first),
        head_channels=head_channels, num_heads=num_heads, context_dim=int(context[1]), camera_dim=int(camera[1]),
        transformer_depth=depth, linear_projection=len(proj_in) == 2, sample_size=sample_size,
    )
    for lv, width in enumerate(arch.block_out_channels):
        if num_heads is None:
            _heads(width, head_channels, f"UNet level {lv}")
        elif width % num_heads:
            raise CheckpointLayoutError(f"UNet level {lv} is {width} channels wide, which does not split into "
                                        f"{num_heads} heads")
    return arch


def infer_vae_arch(shapes: Mapping[str, tuple], sample_size: int = 256) -> VaeArch:
    """The autoencoder that the ``first_stage_model.*`` shapes describe."""
    p = VAE_PREFIX
    conv_in = _need(shapes, p + "encoder.conv_in.weight", "the VAE encoder's input convolution")
    levels = _indices(shapes, p + "encoder.down.")
    nres = len(_indices(shapes, p + "encoder.down.0.block."))
    widths = [int(_need(shapes, p + f"encoder.down.{i}.block.0.conv1.weight", "a VAE ResNet block")[0]) for i in levels]
    ch = int(conv_in[0])
    z = int(_need(shapes, p + "decoder.conv_in.weight", "the VAE decoder's input convolution")[1])
    quant = _need(shapes, p + "quant_conv.weight", "the VAE's quant_conv")
    if int(quant[0]) != 2 * z:
        raise CheckpointLayoutError(f"the VAE's embedding ({quant[0] // 2} channels) differs from its latent "
                                    f"({z} channels); diffusers' AutoencoderKL needs them equal")
    if not levels or any(w % ch for w in widths):
        raise CheckpointLayoutError(f"VAE level widths {widths} are not multiples of its first width {ch}")
    return VaeArch(in_channels=int(conv_in[1]),
                   out_channels=int(_need(shapes, p + "decoder.conv_out.weight", "the VAE's output")[0]),
                   ch=ch, ch_mult=tuple(w // ch for w in widths), num_res_blocks=nres, z_channels=z,
                   sample_size=sample_size)


def infer_clip_text_arch(shapes: Mapping[str, tuple], head_channels: int = HEAD_CHANNELS) -> TextArch | None:
    """SD 1.x's CLIP text model that the ``cond_stage_model.transformer.*`` shapes describe (None if absent)."""
    p = CLIP_TEXT_PREFIX + "text_model."
    if p + "embeddings.token_embedding.weight" not in shapes:
        return None
    vocab, width = (int(s) for s in shapes[p + "embeddings.token_embedding.weight"])
    layers = len(_indices(shapes, p + "encoder.layers."))
    if layers < 1:
        raise CheckpointLayoutError(f"the text tower under {p} has no layers ({p}encoder.layers.N.*)")
    mlp = _need(shapes, p + "encoder.layers.0.mlp.fc1.weight", "the text tower's MLP")
    context = _need(shapes, p + "embeddings.position_embedding.weight", "the text tower's positions")
    return TextArch(vocab_size=vocab, width=width, layers=layers, heads=_heads(width, head_channels, "the text tower"),
                    mlp_width=int(mlp[0]), context_length=int(context[0]), skip_last=False, activation="quick_gelu")


def infer_text_arch(shapes: Mapping[str, tuple], head_channels: int = HEAD_CHANNELS) -> TextArch | None:
    """The OpenCLIP text tower that the ``cond_stage_model.model.*`` shapes describe (None if absent)."""
    p = TEXT_PREFIX
    if p + "token_embedding.weight" not in shapes:
        return None
    vocab, width = (int(s) for s in shapes[p + "token_embedding.weight"])
    layers = len(_indices(shapes, p + "transformer.resblocks."))
    if layers < 2:
        raise CheckpointLayoutError(f"the text tower has {layers} layer(s); MVDream reads the penultimate one's "
                                    "output, so it needs at least 2")
    mlp = _need(shapes, p + "transformer.resblocks.0.mlp.c_fc.weight", "the text tower's MLP")
    context = _need(shapes, p + "positional_embedding", "the text tower's positions")
    return TextArch(vocab_size=vocab, width=width, layers=layers, heads=_heads(width, head_channels, "the text tower"),
                    mlp_width=int(mlp[0]), context_length=int(context[0]))


def infer_architecture(shapes: Mapping[str, tuple], head_channels: int | None = None,
                       image_size: int = 256, num_heads: int | None = None) -> MVDreamArch:
    """Every network's shape from the file's tensor shapes; ``image_size`` is the working resolution.

    The variant (:func:`detect_variant`) sets how the UNet's heads are counted; ``head_channels``
    or ``num_heads`` override it (the text towers always have 64-channel heads)."""
    variant = detect_variant(shapes)
    vae = infer_vae_arch(shapes, sample_size=image_size)
    if image_size % vae.downscale:
        raise ConfigError(f"image_size {image_size} is not a multiple of the VAE's downscale factor {vae.downscale}")
    if head_channels is None and num_heads is None:
        head_channels, num_heads = variant.head_channels, variant.num_heads
    unet = infer_unet_arch(shapes, head_channels or HEAD_CHANNELS, sample_size=image_size // vae.downscale,
                           num_heads=num_heads)
    if unet.linear_projection != variant.linear_projection:
        raise CheckpointLayoutError(
            f"MVDream {variant.name}'s UNet has {'linear' if variant.linear_projection else '1x1-convolution'} "
            f"transformer projections; this file's {UNET_PREFIX}middle_block.1.proj_in.weight is not")
    text = infer_clip_text_arch(shapes) if variant is SD15 else infer_text_arch(shapes, head_channels or HEAD_CHANNELS)
    if text is not None and text.width != unet.context_dim:
        raise CheckpointLayoutError(f"the text tower is {text.width} wide but the UNet's cross-attention reads "
                                    f"{unet.context_dim}-wide states")
    return MVDreamArch(unet=unet, vae=vae, text=text, variant=variant)


# ---------------------------------------------------------------------------------------------
# The key map


class Target(NamedTuple):
    """Where (part of) an original tensor goes."""

    part: str
    """``unet``, ``vae``, ``text`` or ``schedule``."""
    key: str
    """The parameter's name in that part's model."""
    split: tuple[int, int] | None = None
    """``(i, n)``: the i-th of n equal row blocks of the original (OpenCLIP's fused q/k/v)."""
    flatten: bool = False
    """See :class:`~lift3d.priors.ldm_keys.Row`."""


#: One OpenCLIP residual block -> one CLIP encoder layer (the fused projection is handled apart).
TEXT_LAYER = (Row("ln_1", "layer_norm1"), Row("attn.out_proj", "self_attn.out_proj"), Row("ln_2", "layer_norm2"),
              Row("mlp.c_fc", "mlp.fc1"), Row("mlp.c_proj", "mlp.fc2"))
TEXT_LAYER_KEYS = ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                   "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                   "mlp.c_proj.weight", "mlp.c_proj.bias")


def unet_blocks(arch: UNetArch) -> list[Block]:
    """(original module, diffusers module, rows) for every block of the UNet: Stable Diffusion's
    (:func:`lift3d.priors.ldm_keys.unet_blocks`) and MVDream's camera MLP, ``camera_embed`` ->
    the class embedding."""
    camera = [("camera_embed.0", "class_embedding.linear_1", LEAF),
              ("camera_embed.2", "class_embedding.linear_2", LEAF)]
    return [*camera, *ldm_keys.unet_blocks(arch.num_res_blocks, arch.attention, arch.transformer_depth)]


def vae_blocks(arch: VaeArch) -> list[Block]:
    """(original module, diffusers module, rows) for the autoencoder (:func:`lift3d.priors.ldm_keys.vae_blocks`)."""
    return ldm_keys.vae_blocks(len(arch.ch_mult), arch.num_res_blocks)


@dataclass
class KeyMap:
    """Original key -> where it goes, for one architecture; see :func:`build_key_map`."""

    targets: dict[str, tuple[Target, ...]] = field(default_factory=dict)
    """Keys whose tensors fill model parameters (or the schedule)."""
    unused: dict[str, str] = field(default_factory=dict)
    """Keys that are read and deliberately not used, with the reason."""
    optional: set[str] = field(default_factory=set)
    """Keys a file may lack (the schedule buffers, OpenCLIP's stored causal mask)."""

    def places(self, key: str) -> bool:
        return key in self.targets or key in self.unused

    def add(self, original: str, *targets: Target) -> None:
        if original in self.targets or original in self.unused:
            raise AssertionError(f"key map places {original!r} twice")
        self.targets[original] = tuple(targets)

    def add_blocks(self, part: str, prefix: str, blocks: Sequence[Block], model_keys: set[str],
                   ours_root: str = "") -> None:
        """Weight and bias of every row of every block, where ``part``'s model has that parameter."""
        for ours, orig, flatten in ldm_keys.parameters(blocks):
            if ours_root + ours in model_keys:
                self.add(prefix + orig, Target(part, ours_root + ours, flatten=flatten))

    def by_part(self, part: str) -> dict[str, list[tuple[str, Target]]]:
        """Model key of ``part`` -> [(original key, target)] filling it."""
        out: dict[str, list[tuple[str, Target]]] = {}
        for orig, targets in self.targets.items():
            for t in targets:
                if t.part == part:
                    out.setdefault(t.key, []).append((orig, t))
        return out


def _text_root(model_keys: set[str]) -> str:
    """transformers nests CLIP's text model under ``text_model.`` in some versions and not in others."""
    return "text_model." if any(k.startswith("text_model.") for k in model_keys) else ""


#: One layer of SD 1.x's CLIP text model: the file already uses transformers' names.
CLIP_LAYER = tuple(Row(m, m) for m in ("layer_norm1", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                       "self_attn.out_proj", "layer_norm2", "mlp.fc1", "mlp.fc2"))


def _add_clip_text(km: "KeyMap", t: TextArch, keys: set[str]) -> None:
    """``cond_stage_model.transformer.text_model.*`` -> CLIPTextModel, every layer kept."""
    p, root = CLIP_TEXT_PREFIX + "text_model.", _text_root(keys)
    km.add(p + "embeddings.token_embedding.weight", Target("text", root + "embeddings.token_embedding.weight"))
    km.add(p + "embeddings.position_embedding.weight", Target("text", root + "embeddings.position_embedding.weight"))
    km.add_blocks("text", p, [("final_layer_norm", "final_layer_norm", LEAF)], keys, root)
    for i in range(t.layers):
        km.add_blocks("text", p, [(f"encoder.layers.{i}", f"encoder.layers.{i}", CLIP_LAYER)], keys, root)
    # Older transformers saved the position index buffer with the weights; newer ones rebuild it.
    km.unused[p + "embeddings.position_ids"] = "CLIPTextModel's position index buffer (0..76), rebuilt"
    km.optional.add(p + "embeddings.position_ids")


def build_key_map(arch: MVDreamArch, model_keys: Mapping[str, set[str]]) -> KeyMap:
    """The key map for ``arch``; ``model_keys[part]`` are the parameter names of the models built
    from it (rows name a parameter only where the model has it: a ResNet block has a shortcut
    convolution only where its width changes, in both layouts alike)."""
    km = KeyMap()
    km.add_blocks("unet", UNET_PREFIX, unet_blocks(arch.unet), model_keys["unet"])
    km.add_blocks("vae", VAE_PREFIX, vae_blocks(arch.vae), model_keys["vae"])
    if arch.text is not None and "text" in model_keys and arch.variant is SD15:
        _add_clip_text(km, arch.text, model_keys["text"])
    elif arch.text is not None and "text" in model_keys:
        keys = model_keys["text"]
        root = _text_root(keys)
        p, t = TEXT_PREFIX, arch.text
        km.add(p + "token_embedding.weight", Target("text", root + "embeddings.token_embedding.weight"))
        km.add(p + "positional_embedding", Target("text", root + "embeddings.position_embedding.weight"))
        km.add_blocks("text", p, [("ln_final", "final_layer_norm", LEAF)], keys, root)
        for i in range(t.layers - 1):
            block, layer = f"transformer.resblocks.{i}", f"encoder.layers.{i}"
            km.add_blocks("text", p, [(block, layer, TEXT_LAYER)], keys, root)
            for leaf, orig_leaf in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
                km.add(f"{p}{block}.attn.{orig_leaf}",
                       *(Target("text", f"{root}{layer}.self_attn.{proj}_proj.{leaf}", split=(k, 3))
                         for k, proj in enumerate("qkv")))
        last = f"transformer.resblocks.{t.layers - 1}"
        for leaf in TEXT_LAYER_KEYS:
            km.unused[f"{p}{last}.{leaf}"] = ("the text tower's last layer: MVDream conditions on the "
                                              "penultimate layer's output")
        km.unused[p + "text_projection"] = "CLIP's joint-embedding projection (pooled output only)"
        km.unused[p + "logit_scale"] = "CLIP's contrastive temperature"
        km.unused[p + "attn_mask"] = "OpenCLIP's causal mask, rebuilt by CLIPTextModel"
        km.optional.add(p + "attn_mask")
    km.add("alphas_cumprod", Target("schedule", "alphas_cumprod"))
    for k in SCHEDULE_KEYS:
        if k != "alphas_cumprod":
            km.unused[k] = "a noise-schedule buffer derived from alphas_cumprod"
    km.optional.update(SCHEDULE_KEYS)
    return km


# ---------------------------------------------------------------------------------------------
# Building the models and reading the file


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no initialisation)
    and their buffers on the CPU as usual, ready for ``load_state_dict(..., assign=True)``."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: Any) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def build_models(arch: MVDreamArch, parts: Sequence[str] = PARTS, empty: bool = True) -> dict[str, nn.Module]:
    """The untrained networks of ``arch`` (``empty``: parameters on the meta device, to be assigned)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    models: dict[str, nn.Module] = {}
    with parameters_on_meta() if empty else contextlib.nullcontext():
        if "unet" in parts:
            models["unet"] = MultiViewUNet.from_arch(arch.unet)
        if "vae" in parts:
            models["vae"] = AutoencoderKL(**arch.vae.diffusers_config())
        if "text" in parts and arch.text is not None:
            models["text"] = CLIPTextModel(arch.text.transformers_config())
    return models


def _weights_of(part: str, model: nn.Module) -> nn.Module:
    """The module whose state dict the key map addresses (the diffusers UNet inside MultiViewUNet)."""
    return model.unet if part == "unet" else model


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a ``.pt`` / ``.ckpt`` (``torch.load(weights_only=True)``, memory-mapped when the
    file allows) or ``.safetensors`` file. A ``{"state_dict": ...}`` wrapper is unwrapped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        raise CheckpointLayoutError(
            f"{path}: not a plain state dict of tensors; torch.load(weights_only=True) refused to unpickle it "
            f"({str(exc).splitlines()[0]}). Use the published checkpoint, or re-save the tensors as "
            "safetensors") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointLayoutError(f"{path}: expected a state dict (key -> tensor), found a {type(obj).__name__}")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise CheckpointLayoutError(f"{path}: expected a state dict (key -> tensor); these entries are not tensors: "
                                    f"{_listing(bad)}")
    return dict(obj)


def checkpoint_shapes(path: str | Path) -> dict[str, tuple]:
    """Key -> shape of a checkpoint file, without reading its tensors where the format allows
    (safetensors' header; a zip ``.pt`` memory-mapped)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return {k: tuple(v.shape) for k, v in read_checkpoint(path).items()}


def checkpoint_variant(path: str | Path) -> Variant:
    """The published variant of the checkpoint file at ``path`` (:func:`detect_variant`)."""
    return detect_variant(checkpoint_shapes(path))


def default_alphas_cumprod() -> Tensor:
    """MVDream's schedule: betas linear in their square root from BETA_START to BETA_END."""
    betas = torch.linspace(math.sqrt(BETA_START), math.sqrt(BETA_END), NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def _listing(keys: Sequence[str], limit: int = 50) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_placement(km: KeyMap, keys: Sequence[str], source: str) -> None:
    """Every key of the file is placed by the map (else CheckpointLayoutError listing the others)."""
    unplaced = sorted(k for k in keys if not km.places(k))
    if unplaced:
        raise CheckpointLayoutError(
            f"{source}: {len(unplaced)} key(s) that MVDream's key map does not place: {_listing(unplaced)}. "
            "The file is not an MVDream checkpoint in the original layout, or its architecture differs from the one "
            "its shapes suggest")


def gather_part(km: KeyMap, state: Mapping[str, Tensor], part: str, expected: Mapping[str, torch.Size],
                source: str, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """``part``'s state dict from the file's tensors: every parameter in ``expected`` filled, with its
    shape; CheckpointLayoutError listing the parameters left unfilled or of the wrong shape."""
    fill = km.by_part(part)
    out: dict[str, Tensor] = {}
    unfilled, wrong = [], []
    for key, shape in expected.items():
        sources = [(orig, t) for orig, t in fill.get(key, []) if orig in state]
        if not sources:
            origs = [orig for orig, _ in fill.get(key, [])]
            unfilled.append(f"{key} (from {origs[0]})" if origs else f"{key} (no original key maps to it)")
            continue
        orig, t = sources[0]
        tensor = state[orig]
        if t.split is not None:
            i, n = t.split
            if tensor.shape[0] % n:
                wrong.append(f"{orig} {tuple(tensor.shape)} does not split into {n} equal row blocks")
                continue
            tensor = tensor.chunk(n, dim=0)[i]
        if t.flatten and tensor.dim() == 4 and tuple(tensor.shape[2:]) == (1, 1):
            tensor = tensor[:, :, 0, 0]
        if tuple(tensor.shape) != tuple(shape):
            wrong.append(f"{orig} {tuple(state[orig].shape)} for {key} {tuple(shape)}")
            continue
        out[key] = tensor.to(dtype=dtype or tensor.dtype, copy=True).contiguous()
    if unfilled or wrong:
        msg = f"{source}: the checkpoint does not fill MVDream's {part}:"
        if unfilled:
            msg += f" {len(unfilled)} parameter(s) left unfilled, missing from the file: {_listing(unfilled)}."
        if wrong:
            msg += f" {len(wrong)} tensor(s) of the wrong shape: {_listing(wrong)}."
        raise CheckpointLayoutError(msg)
    return out


@dataclass
class MVDreamWeights:
    """What :func:`load_mvdream` returns: the networks asked for, the schedule and the architecture."""

    arch: MVDreamArch
    key_map: KeyMap
    alphas_cumprod: Tensor
    unet: MultiViewUNet | None = None
    vae: nn.Module | None = None
    text_encoder: nn.Module | None = None


def load_mvdream(path: str | Path, parts: Sequence[str] = PARTS, *, head_channels: int | None = None,
                 image_size: int = 256, dtype: torch.dtype = torch.float32,
                 state: Mapping[str, Tensor] | None = None, num_heads: int | None = None) -> MVDreamWeights:
    """Read an MVDream checkpoint (original layout) into the networks named by ``parts``.

    Every key of the file must be placed by the key map (also the keys of parts not asked for), and
    every parameter of the networks asked for must be filled; otherwise CheckpointLayoutError lists
    the keys. ``image_size`` is the working resolution in pixels (256 for the published model): it
    is not stored in the file. ``state`` skips reading ``path`` (tests). The variant (2.1 or 1.5) is
    read off the file; ``head_channels`` / ``num_heads`` override its UNet head layout (toy models).
    """
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; valid: {', '.join(PARTS)}")
    source = str(path)
    state = read_checkpoint(path) if state is None else state
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    arch = infer_architecture(shapes, head_channels, image_size, num_heads)
    if "text" in parts and arch.text is None:
        raise CheckpointLayoutError(f"{source} has no text tower (no {TEXT_PREFIX}token_embedding.weight, as in "
                                    f"MVDream sd-v2.1, nor {CLIP_TEXT_PREFIX}text_model.embeddings."
                                    "token_embedding.weight, as in sd-v1.5)")
    models = build_models(arch)
    params = {part: dict(_weights_of(part, m).state_dict()) for part, m in models.items()}
    km = build_key_map(arch, {part: set(p) for part, p in params.items()})
    check_placement(km, list(state), source)
    for part in parts:
        weights = _weights_of(part, models[part])
        expected = {k: v.shape for k, v in params[part].items() if v.device.type == "meta"}
        loaded = gather_part(km, state, part, expected, source, dtype)
        weights.load_state_dict(loaded, strict=False, assign=True)
        still_empty = [n for n, p in weights.named_parameters() if p.device.type == "meta"]
        if still_empty:
            raise CheckpointLayoutError(f"{source}: parameters of the {part} left unfilled: {_listing(still_empty)}")
        models[part].requires_grad_(False).eval()
    alphas = state.get("alphas_cumprod")
    alphas = default_alphas_cumprod() if alphas is None else alphas.detach().float().clone()
    kept = {part: models[part] for part in parts}
    return MVDreamWeights(arch=arch, key_map=km, alphas_cumprod=alphas, unet=kept.get("unet"), vae=kept.get("vae"),
                          text_encoder=kept.get("text"))


def to_original(km: KeyMap, state_dicts: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The inverse of loading: the original-layout tensors of every mapped key whose parts are given
    (``state_dicts[part]`` in the models' naming; ``schedule`` holds ``alphas_cumprod``). Keys the
    map reads but does not use (the text tower's last layer, ...) are not produced."""
    out: dict[str, Tensor] = {}
    for orig, targets in km.targets.items():
        if not all(t.part in state_dicts for t in targets):
            continue
        pieces = sorted(targets, key=lambda t: t.split[0] if t.split else 0)
        tensors = [state_dicts[t.part][t.key] for t in pieces]
        tensor = torch.cat(tensors, dim=0) if len(tensors) > 1 else tensors[0]
        if pieces[0].flatten:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        out[orig] = tensor.detach().clone()
    return out


# ---------------------------------------------------------------------------------------------
# Finding the file


def hub_url(repo_id: str) -> str:
    return f"https://huggingface.co/{repo_id}"


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def resolve_checkpoint(name_or_path: str, filename: str = DEFAULT_MVDREAM_FILE, *, key: str,
                       revision: str | None = None) -> Path:
    """The checkpoint file ``name_or_path`` names, or a MissingWeightsError naming ``key``.

    ``name_or_path`` is a file (``.pt``, ``.ckpt`` or ``.safetensors`` with the original keys), a
    folder holding ``filename``, or a Hugging Face id (``MVDream/MVDream``) whose ``filename`` is
    looked up in the local cache only: nothing is downloaded.
    """
    from lift3d.utils.hub import MissingWeightsError, download_command, hub_cache_dir

    if not name_or_path:
        raise MissingWeightsError(f"config key '{key}' is empty: give the MVDream checkpoint file, a folder that "
                                  f"holds {filename}, or the Hugging Face id {DEFAULT_MVDREAM_MODEL}")
    local = Path(name_or_path).expanduser()
    if local.is_file():
        return local.resolve()
    if local.is_dir():
        if (local / filename).is_file():
            return (local / filename).resolve()
        raise MissingWeightsError(f"config key '{key}' = {name_or_path!r}: the folder {local.resolve()} holds no "
                                  f"{filename}; get it from {hub_url(DEFAULT_MVDREAM_MODEL)} (file {filename}).")
    if _HUB_ID.fullmatch(name_or_path) is None or name_or_path.endswith((".pt", ".ckpt", ".safetensors")):
        # a path named after a published file asks for that file (the SD 1.5 model's, say)
        wanted = next((v.filename for v in VARIANTS.values() if local.name == v.filename), DEFAULT_MVDREAM_FILE)
        others = ", ".join(v.filename for v in VARIANTS.values() if v.filename != wanted)
        raise MissingWeightsError(
            f"config key '{key}' = {name_or_path!r}: no such file ({local.resolve()}). Give the MVDream checkpoint "
            f"file (from {hub_url(DEFAULT_MVDREAM_MODEL)}, file {wanted}: "
            f"`{download_command(DEFAULT_MVDREAM_MODEL)} {wanted}` on a machine with internet; the other published "
            f"model, {others}, loads the same way), a folder that holds it, or the id {DEFAULT_MVDREAM_MODEL} once "
            f"it is in the Hugging Face cache (with filename= naming the file).")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        return Path(hf_hub_download(name_or_path, filename, revision=revision, cache_dir=cache,
                                    local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        raise MissingWeightsError(
            f"config key '{key}' = {name_or_path!r}: the weights are not on this machine (searched: the local "
            f"folder {local.resolve()}, and the Hugging Face cache {cache} for {filename}; set HF_HOME or "
            f"HF_HUB_CACHE to look elsewhere). lift3d never downloads at start-up: fetch the file once with "
            f"`{download_command(name_or_path, revision)} {filename}` on a machine with internet "
            f"({hub_url(name_or_path)}, file {filename}), or point {key}= at the file.") from None


__all__ = [
    "DEFAULT_MVDREAM_MODEL", "DEFAULT_MVDREAM_FILE", "HEAD_CHANNELS", "SCALING_FACTOR", "CheckpointLayoutError",
    "VaeArch", "TextArch", "MVDreamArch", "infer_architecture", "infer_unet_arch", "infer_vae_arch", "infer_text_arch",
    "Row", "Target", "KeyMap", "build_key_map", "unet_blocks", "vae_blocks", "build_models", "read_checkpoint",
    "check_placement", "gather_part", "load_mvdream", "to_original", "MVDreamWeights", "resolve_checkpoint",
    "default_alphas_cumprod", "parameters_on_meta", "Variant", "VARIANTS", "SD21", "SD15", "detect_variant",
    "checkpoint_variant", "checkpoint_shapes", "infer_clip_text_arch", "CLIP_TEXT_PREFIX", "CLIP_LAYER",
]
