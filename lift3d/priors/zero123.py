"""Zero123's original checkpoint layout: read without unpickling, placed by an explicit key map.

Zero-1-to-3 (Liu et al., ICCV 2023; ``105000.ckpt``, ``zero123-xl.ckpt``) and Stable Zero123
(Stability AI, 2023; ``stable_zero123.ckpt``) were published as checkpoints of the CompVis
latent-diffusion code. One state dict holds every network, under these prefixes:

==============================  ==================================================================
``model.diffusion_model.``      the UNet (ldm's ``openaimodel`` layout) -> diffusers ``UNet2DConditionModel``
``model_ema.``                  the same UNet's moving average, each name with its dots removed
                                (ldm's ``LitEma``); preferred over the raw weights when present
``first_stage_model.``          the KL autoencoder -> diffusers ``AutoencoderKL``
``cond_stage_model.model.visual.``  OpenAI CLIP ViT-L/14's image tower -> transformers
                                ``CLIPVisionModelWithProjection``
``cc_projection.``              the linear map of [CLIP embedding, 4 camera numbers] to the UNet's
                                cross-attention width (772 -> 768)
``alphas_cumprod``              the noise schedule (the other schedule buffers are derived from it)
==============================  ==================================================================

The map runs from each parameter of our networks to the checkpoint key (and, for a few, the
reshaping) that fills it: CLIP's fused ``in_proj`` is split into query, key and value, its ``proj``
transposed, the autoencoder's 1x1-convolution attention kernels flattened to linear ones. It is
checked both ways on every load: a checkpoint key that nothing places and no rule knows to skip is
an error that lists it, and so is a parameter left unfilled. The keys skipped on purpose are
listed in :data:`SKIPPED` with the reason. The UNet's and the autoencoder's names come from
Stable Diffusion's original layout in :mod:`lift3d.priors.ldm_keys`, which MVDream's key map shares.

A checkpoint is read with ``torch.load(weights_only=True)``, never by unpickling arbitrary
objects. A file that also holds pickled Python objects (a Lightning checkpoint's hyper-parameters,
say) is refused with the command of a one-time converter: ``python -m lift3d.priors.zero123
convert IN.ckpt OUT.safetensors``, which keeps the tensors only and itself refuses such a file
unless given ``--trust-pickle``. Its output loads here like the original.

The network shapes are not in the checkpoint: :data:`PUBLISHED` holds those of the released
models (Stable Diffusion 1.x's UNet with 8 input channels, its VAE, CLIP ViT-L/14); a folder of
diffusers configs can stand in (``original_architecture``), which is how tiny test models load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn
from torch import Tensor

from lift3d.config import ConfigError
from lift3d.priors import ldm_keys

#: Prefixes of the networks in an original checkpoint.
UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.model.visual."
PROJECTION_PREFIX = "cc_projection."

#: OpenAI CLIP's pixel statistics (used unless the weights come with their own).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: The command users run once to make a safetensors copy of a checkpoint that holds pickled objects.
CONVERTER = "python -m lift3d.priors.zero123 convert"

#: The released models' networks, as diffusers / transformers configs (the original ldm config
#: ``sd-objaverse-finetune-c_concat-256.yaml`` written in their terms).
PUBLISHED: dict[str, dict[str, Any]] = {
    "unet": {
        "sample_size": 32, "in_channels": 8, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
        "flip_sin_to_cos": True, "freq_shift": 0,
    },
    "vae": {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
        "block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32, "sample_size": 256,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "scaling_factor": 0.18215,
    },
    "image_encoder": {
        "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
        "image_size": 224, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    },
    "scheduler": {
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
    },
}

#: Checkpoint keys skipped on purpose, with the reason (regular expressions on the whole key).
SKIPPED: list[tuple[str, str]] = [
    (r"(betas|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|log_one_minus_alphas_cumprod|"
     r"sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance|posterior_log_variance_clipped|"
     r"posterior_mean_coef1|posterior_mean_coef2|logvar|lvlb_weights)", "derived from the noise schedule"),
    (r"model_ema\.(decay|num_updates)", "the moving average's own bookkeeping"),
    (r"cond_stage_model\.model\.(positional_embedding|text_projection|logit_scale|token_embedding\..+|"
     r"ln_final\..+|transformer\..+)", "CLIP's text tower, which Zero123 does not use"),
]


class CheckpointLayoutError(ConfigError):
    """An original-layout checkpoint that does not fit the key map or the networks (a start-up error)."""


# ---------------------------------------------------------------------------------------------
# The key map: for each parameter of our networks, where it comes from.


@dataclass(frozen=True)
class Source:
    """Where one parameter of ours comes from: a checkpoint key, and how that tensor is reshaped."""

    key: str
    chunk: Optional[int] = None
    """Index of the part taken when the checkpoint fuses several (CLIP's query, key, value)."""
    chunks: int = 1
    transpose: bool = False
    """CLIP's projection is stored as ``x @ proj``; a linear layer keeps the transpose."""
    flatten_1x1: bool = False
    """A 1x1 convolution kernel [C_out, C_in, 1, 1] read as a linear weight [C_out, C_in]."""

    def take(self, t: Tensor) -> Tensor:
        if self.chunk is not None:
            t = t.chunk(self.chunks, dim=0)[self.chunk]
        if self.transpose:
            t = t.t()
        if self.flatten_1x1 and t.dim() == 4:
            t = t[:, :, 0, 0]
        return t.contiguous()


def unet_sources(config: dict[str, Any]) -> dict[str, str]:
    """Each parameter name of the diffusers UNet ``config`` describes -> its ldm name (without prefix),
    from the shared layout of :mod:`lift3d.priors.ldm_keys` (a level's attention read off
    ``down_block_types``)."""
    depth = config.get("transformer_layers_per_block", 1)
    depth = max(depth) if isinstance(depth, (list, tuple)) else int(depth)
    attention = ["CrossAttn" in t for t in config["down_block_types"]]
    blocks = ldm_keys.unet_blocks(int(config["layers_per_block"]), attention, depth)
    return {ours: orig for ours, orig, _ in ldm_keys.parameters(blocks)}


def vae_sources(config: dict[str, Any]) -> dict[str, Source]:
    """Each parameter name of the diffusers AutoencoderKL ``config`` describes -> its ldm :class:`Source`
    (without prefix; the mid-block attention's 1x1-convolution kernels flattened)."""
    blocks = ldm_keys.vae_blocks(len(config["block_out_channels"]), int(config["layers_per_block"]))
    return {ours: Source(orig, flatten_1x1=flatten) for ours, orig, flatten in ldm_keys.parameters(blocks)}


_PARAM = r"(weight|bias)"
_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
               "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_CLIP_FIXED = {"vision_model.embeddings.class_embedding": "class_embedding",
               "vision_model.embeddings.patch_embedding.weight": "conv1.weight",
               "vision_model.embeddings.position_embedding.weight": "positional_embedding",
               "vision_model.pre_layrnorm.weight": "ln_pre.weight", "vision_model.pre_layrnorm.bias": "ln_pre.bias",
               "vision_model.post_layernorm.weight": "ln_post.weight",
               "vision_model.post_layernorm.bias": "ln_post.bias"}


def clip_source(name: str) -> Source:
    """The OpenAI-CLIP name (without prefix) of the transformers CLIPVisionModelWithProjection parameter ``name``."""
    if name in _CLIP_FIXED:
        return Source(_CLIP_FIXED[name])
    if name == "visual_projection.weight":
        return Source("proj", transpose=True)
    m = re.fullmatch(rf"vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.{_PARAM}", name)
    if m:
        return Source(f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", chunk="qkv".index(m[2]), chunks=3)
    m = re.fullmatch(rf"vision_model\.encoder\.layers\.(\d+)\.(self_attn\.out_proj|layer_norm[12]|mlp\.fc[12])\."
                     rf"{_PARAM}", name)
    if m:
        return Source(f"transformer.resblocks.{m[1]}.{_CLIP_LAYER[m[2]]}.{m[3]}")
    raise KeyError(name)


def ema_key(unet_key: str) -> str:
    """ldm's moving-average name of the UNet key ``model.diffusion_model.X``: ``model_ema.diffusion_modelX``
    with every dot removed (its buffers cannot have dots)."""
    return EMA_PREFIX + unet_key[len("model."):].replace(".", "")


def key_map(names: dict[str, Iterable[str]], unet_config: dict[str, Any], vae_config: dict[str, Any],
            use_ema: bool) -> dict[str, dict[str, Source]]:
    """``{network: {our parameter: Source}}`` for the networks ``unet``, ``vae``, ``image_encoder`` and
    ``projection`` (a ``proj`` linear layer), whose parameter names ``names`` gives. A name no rule
    covers raises a :class:`CheckpointLayoutError` (a network this map was not written for)."""
    out: dict[str, dict[str, Source]] = {}
    unknown: list[str] = []
    unet = unet_sources(unet_config) if "unet" in names else {}
    vae = vae_sources(vae_config) if "vae" in names else {}
    for net, keys in names.items():
        table: dict[str, Source] = {}
        for name in keys:
            try:
                if net == "unet":
                    src = UNET_PREFIX + unet[name]
                    table[name] = Source(ema_key(src) if use_ema else src)
                elif net == "vae":
                    s = vae[name]
                    table[name] = Source(VAE_PREFIX + s.key, flatten_1x1=s.flatten_1x1)
                elif net == "image_encoder":
                    s = clip_source(name)
                    table[name] = Source(CLIP_PREFIX + s.key, chunk=s.chunk, chunks=s.chunks, transpose=s.transpose)
                elif net == "projection":
                    if name not in ("proj.weight", "proj.bias"):
                        raise KeyError(name)
                    table[name] = Source(PROJECTION_PREFIX + name.split(".", 1)[1])
                else:
                    raise KeyError(name)
            except KeyError:
                unknown.append(f"{net}.{name}")
        out[net] = table
    if unknown:
        raise CheckpointLayoutError(
            f"the Zero123 key map has no rule for {_few(unknown)}: the networks built from the architecture "
            "config are not the Zero123 ones (UNet2DConditionModel with CrossAttn/plain blocks, AutoencoderKL, "
            "CLIPVisionModelWithProjection)")
    return out


def _few(keys: list[str], n: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


# ---------------------------------------------------------------------------------------------
# Reading a checkpoint without unpickling


def pickle_message(path: Path, key: str) -> str:
    out = path.with_suffix(".safetensors")
    return (f"config key '{key}': {path} holds pickled Python objects besides its tensors, so it cannot be read "
            "with torch.load(weights_only=True), and lift3d does not unpickle files. If you trust where it came "
            f"from, convert it once: `{CONVERTER} {path} {out} --trust-pickle` (that one command unpickles it; the "
            f"copy holds tensors only), then set {key}={out}")


def _torch_load(path: Path, *, weights_only: bool = True) -> Any:
    try:
        # Memory-mapped where the format allows (the zip format of torch >= 1.6): tensors are read on use.
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=weights_only)


def tensors_of(obj: Any) -> dict[str, Tensor]:
    """The state dict inside a loaded checkpoint: its ``state_dict`` entry (Lightning), or the mapping itself;
    entries that are not tensors are left out."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}


def read_state_dict(path: str | Path, key: str = "pretrained_model_name_or_path") -> dict[str, Tensor]:
    """The tensors of an original-layout checkpoint (``.ckpt`` / ``.pt`` via ``torch.load(weights_only=True)``,
    or the converter's ``.safetensors``). A file holding pickled objects raises a CheckpointLayoutError
    naming the converter; ``key`` is the config key that named the file, for messages."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = _torch_load(path)
    except pickle.UnpicklingError:
        raise CheckpointLayoutError(pickle_message(path, key)) from None
    except (OSError, RuntimeError, ValueError, EOFError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointLayoutError(f"config key '{key}': cannot read {path} as a checkpoint ({type(exc).__name__}: "
                                    f"{first}); is the download complete?") from None
    try:
        return tensors_of(obj)
    except ValueError as exc:
        raise CheckpointLayoutError(f"config key '{key}': {path} {exc}") from None


def probe(path: str | Path, key: str = "pretrained_model_name_or_path") -> Optional[str]:
    """Why ``path`` cannot be read without unpickling (None when it can, or when only a full read could tell).
    Cheap for torch's zip format: the tensors are memory-mapped, not read."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return None
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        return pickle_message(path, key)
    except Exception:  # a legacy-format or damaged file: the load itself reports it
        return None
    return None


# ---------------------------------------------------------------------------------------------
# Building the networks and filling them


@dataclass
class Architecture:
    """The network configs an original checkpoint is read into."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    image_encoder: dict[str, Any]
    scheduler: dict[str, Any]
    clip_mean: tuple[float, ...] = CLIP_MEAN
    clip_std: tuple[float, ...] = CLIP_STD

    @classmethod
    def published(cls) -> "Architecture":
        return cls(**{k: dict(v) for k, v in PUBLISHED.items()})

    @classmethod
    def from_folder(cls, folder: str | Path, key: str = "original_architecture") -> "Architecture":
        """The configs of a diffusers-layout Zero123 folder (``unet/``, ``vae/``, ``image_encoder/``, and
        ``scheduler/``, ``feature_extractor/`` when present); weights are not read."""
        folder = Path(folder).expanduser()
        needed = ("unet/config.json", "vae/config.json", "image_encoder/config.json")
        missing = [f for f in needed if not (folder / f).is_file()]
        if missing:
            raise ConfigError(f"config key '{key}' = {str(folder)!r}: the folder lacks {', '.join(missing)}; it must "
                              "hold diffusers configs of the networks (a diffusers-format Zero123 folder)")
        read = lambda rel: json.loads((folder / rel).read_text())  # noqa: E731
        arch = cls(unet=read("unet/config.json"), vae=read("vae/config.json"),
                   image_encoder=read("image_encoder/config.json"),
                   scheduler=read("scheduler/scheduler_config.json") if (folder / "scheduler/scheduler_config.json")
                   .is_file() else dict(PUBLISHED["scheduler"]))
        pre = folder / "feature_extractor/preprocessor_config.json"
        if pre.is_file():
            p = json.loads(pre.read_text())
            arch.clip_mean = tuple(p.get("image_mean", CLIP_MEAN))
            arch.clip_std = tuple(p.get("image_std", CLIP_STD))
        return arch


@dataclass
class OriginalWeights:
    """What an original checkpoint yields: the four networks (float32, on the CPU) and the schedule."""

    unet: nn.Module
    vae: nn.Module
    image_encoder: nn.Module
    projection: nn.Module
    alphas_cumprod: Tensor
    scaling_factor: float
    clip_mean: tuple[float, ...]
    clip_std: tuple[float, ...]
    prediction_type: str = "epsilon"
    used_ema: bool = False


class CameraProjection(nn.Module):
    """Zero123's ``cc_projection``: [CLIP image embedding, 4 camera numbers] -> the cross-attention width."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def _empty_init() -> contextlib.AbstractContextManager:
    """Build networks without random initialisation when accelerate is there (their weights are replaced anyway)."""
    try:
        from accelerate import init_empty_weights
    except ImportError:
        return contextlib.nullcontext()
    return init_empty_weights(include_buffers=False)


def build_networks(arch: Architecture, projection_in: int) -> dict[str, nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with _empty_init():
        unet = UNet2DConditionModel.from_config(arch.unet)
        vae = AutoencoderKL.from_config(arch.vae)
        clip_cfg = {k: v for k, v in arch.image_encoder.items() if not k.startswith("_")}
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**clip_cfg))
        projection = CameraProjection(projection_in, int(unet.config.cross_attention_dim))
    return {"unet": unet, "vae": vae, "image_encoder": image_encoder, "projection": projection}


def has_ema(state: dict[str, Tensor]) -> bool:
    return any(k.startswith(EMA_PREFIX) and k not in (EMA_PREFIX + "decay", EMA_PREFIX + "num_updates") for k in state)


def load_original(path: str | Path, arch: Architecture | None = None, *, prefer_ema: bool = True,
                  key: str = "pretrained_model_name_or_path",
                  state: dict[str, Tensor] | None = None) -> OriginalWeights:
    """Read an original-layout Zero123 checkpoint into diffusers / transformers networks.

    Args:
        path: the ``.ckpt`` (or the converter's ``.safetensors``).
        arch: the networks' shapes; None: :data:`PUBLISHED`.
        prefer_ema: fill the UNet from ``model_ema.*`` when the checkpoint has them.
        key: the config key that named ``path``, for messages.
        state: the state dict when already read (``path`` is then only named in messages).
    Raises:
        CheckpointLayoutError listing the checkpoint keys nothing places, the parameters left
        unfilled, or tensors of the wrong shape.
    """
    path = Path(path)
    arch = arch or Architecture.published()
    if state is None:
        state = read_state_dict(path, key)
    proj_w = state.get(PROJECTION_PREFIX + "weight")
    projection_in = int(proj_w.shape[1]) if proj_w is not None else int(arch.unet["cross_attention_dim"]) + 4
    nets = build_networks(arch, projection_in)
    use_ema = prefer_ema and has_ema(state)
    names = {net: list(m.state_dict()) for net, m in nets.items()}
    table = key_map(names, dict(nets["unet"].config), dict(nets["vae"].config), use_ema)

    used: set[str] = set()
    missing: list[str] = []
    wrong: list[str] = []
    filled: dict[str, dict[str, Tensor]] = {net: {} for net in nets}
    for net, entries in table.items():
        want = nets[net].state_dict()
        for name, src in entries.items():
            if src.key not in state:
                missing.append(f"{net}.{name} (from {src.key})")
                continue
            used.add(src.key)
            t = src.take(state[src.key])
            if tuple(t.shape) != tuple(want[name].shape):
                wrong.append(f"{src.key}: {tuple(t.shape)} for {net}.{name} {tuple(want[name].shape)}")
                continue
            filled[net][name] = t

    # Placed outside the networks: the schedule, and constants the networks' configs also carry.
    specials = {"alphas_cumprod", "scale_factor", "cond_stage_model.mean", "cond_stage_model.std"}
    used |= specials & set(state)
    superseded = EMA_PREFIX if not use_ema else UNET_PREFIX  # the UNet copy not read
    skipped = [re.compile(pattern) for pattern, _ in SKIPPED]
    unplaced = [k for k in state if k not in used and not k.startswith(superseded)
                and not any(p.fullmatch(k) for p in skipped)]
    where = f"config key '{key}': {path}"
    if unplaced:
        raise CheckpointLayoutError(
            f"{where} has keys the Zero123 key map does not place: {_few(unplaced)}; it is not a Zero123 / Stable "
            "Zero123 checkpoint in the original (ldm) layout, or it holds networks this loader does not know")
    if missing:
        raise CheckpointLayoutError(
            f"{where} leaves parameters unfilled: {_few(missing)}; the checkpoint lacks those keys (an incomplete "
            "or different model" + ("; prefer_ema: false reads the raw UNet weights instead of the moving average)"
                                    if use_ema else ")"))
    if wrong:
        raise CheckpointLayoutError(
            f"{where} has tensors of other shapes than the networks: {_few(wrong, 4)}; the architecture does not "
            "match (set original_architecture to a diffusers folder whose configs describe this checkpoint)")
    for net, module in nets.items():
        module.load_state_dict(filled[net], strict=True, assign=True)
        if any(p.dtype != torch.float32 for p in module.parameters()):
            module.float()
    if "alphas_cumprod" in state:
        alphas = state["alphas_cumprod"].detach().float().clone()
    else:
        from diffusers import DDPMScheduler

        alphas = DDPMScheduler.from_config(arch.scheduler).alphas_cumprod.clone()
    scaling = float(state["scale_factor"]) if "scale_factor" in state else float(nets["vae"].config.scaling_factor)
    stats = [tuple(float(v) for v in state[k]) if k in state else default
             for k, default in (("cond_stage_model.mean", arch.clip_mean), ("cond_stage_model.std", arch.clip_std))]
    mean, std = stats
    return OriginalWeights(nets["unet"], nets["vae"], nets["image_encoder"], nets["projection"], alphas, scaling,
                           tuple(mean), tuple(std), str(arch.scheduler.get("prediction_type", "epsilon")), use_ema)


def original_state_dict(unet: nn.Module, vae: nn.Module, image_encoder: nn.Module, projection: nn.Module,
                        alphas_cumprod: Tensor | None = None, ema: bool = False) -> dict[str, Tensor]:
    """The inverse of :func:`load_original`: diffusers / transformers networks written in the original layout
    (the UNet under ``model_ema.*`` as well when ``ema``). Tests build their tiny checkpoints with it."""
    nets = {"unet": unet, "vae": vae, "image_encoder": image_encoder, "projection": projection}
    names = {net: list(m.state_dict()) for net, m in nets.items()}
    out: dict[str, Tensor] = {}
    fused: dict[str, list[Optional[Tensor]]] = {}
    for use_ema in ([False, True] if ema else [False]):
        table = key_map(names, dict(unet.config), dict(vae.config), use_ema)
        for net, entries in table.items():
            if use_ema and net != "unet":
                continue
            sd = nets[net].state_dict()
            for name, src in entries.items():
                t = sd[name].detach().clone()
                if src.flatten_1x1 and t.dim() == 2:
                    t = t[:, :, None, None]
                if src.transpose:
                    t = t.t().contiguous()
                if src.chunk is not None:
                    fused.setdefault(src.key, [None] * src.chunks)[src.chunk] = t
                else:
                    out[src.key] = t
    for k, parts in fused.items():
        out[k] = torch.cat(parts, dim=0)
    if alphas_cumprod is not None:
        out["alphas_cumprod"] = alphas_cumprod.detach().float().clone()
    return out


# ---------------------------------------------------------------------------------------------
# The one-time converter


def convert(src: str | Path, dst: str | Path, trust_pickle: bool = False) -> int:
    """Write the tensors of checkpoint ``src`` to ``dst`` (safetensors); returns how many.

    ``src`` is read with ``weights_only=True`` unless ``trust_pickle``: only then may it unpickle
    objects, which runs whatever code the file names, so only for a file from a trusted source.
    """
    from safetensors.torch import save_file

    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not src.is_file():
        raise ConfigError(f"{src} is not a file")
    if dst.resolve() == src.resolve():
        raise ConfigError("the output must be another file than the input")
    try:
        obj = _torch_load(src, weights_only=not trust_pickle)
    except pickle.UnpicklingError:
        raise ConfigError(f"{src} holds pickled Python objects, which weights_only=True refuses. Unpickling runs "
                          "code the file names: if you trust its source, run again with --trust-pickle") from None
    except (ModuleNotFoundError, AttributeError) as exc:  # an object whose class is not importable here
        raise ConfigError(f"unpickling {src} needs what this Python lacks ({type(exc).__name__}: {exc}); install "
                          "the package that defines it (for Lightning checkpoints: pytorch-lightning) and run "
                          "again") from None
    except (OSError, RuntimeError, ValueError, EOFError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(f"cannot read {src} as a checkpoint ({type(exc).__name__}: {first})") from None
    try:
        tensors = tensors_of(obj)
    except ValueError as exc:
        raise ConfigError(f"{src} {exc}") from None
    if not tensors:
        raise ConfigError(f"{src} holds no tensors")
    # safetensors stores each tensor on its own: views of a shared storage are copied apart.
    seen: set[int] = set()
    flat: dict[str, Tensor] = {}
    for k, v in tensors.items():
        v = v.detach()
        ptr = v.untyped_storage().data_ptr()
        flat[k] = v.clone().contiguous() if ptr in seen or not v.is_contiguous() else v
        seen.add(ptr)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    save_file(flat, str(tmp), metadata={"format": "pt", "converted_from": src.name})
    os.replace(tmp, dst)
    return len(flat)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lift3d.priors.zero123",
        description="Tools for Zero123 / Stable Zero123 weights in the original (ldm) layout.")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="copy the tensors of a .ckpt into a .safetensors file that lift3d reads "
                                          "without unpickling")
    conv.add_argument("input", help="the original checkpoint (.ckpt)")
    conv.add_argument("output", help="the file to write (.safetensors)")
    conv.add_argument("--trust-pickle", action="store_true",
                      help="allow the input's pickled objects to be unpickled (runs code the file names: only for "
                           "a file from a source you trust)")
    args = parser.parse_args(argv)
    try:
        n = convert(args.input, args.output, trust_pickle=args.trust_pickle)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {n} tensors to {args.output}; point the guidance's pretrained_model_name_or_path at it")
    return 0


__all__ = ["PUBLISHED", "SKIPPED", "CONVERTER", "CLIP_MEAN", "CLIP_STD", "Architecture", "OriginalWeights",
           "CameraProjection", "CheckpointLayoutError", "Source", "unet_sources", "vae_sources", "clip_source",
           "ema_key", "key_map", "read_state_dict", "probe", "load_original", "original_state_dict", "convert",
           "main", "tensors_of", "pickle_message", "has_ema", "build_networks"]


if __name__ == "__main__":
    sys.exit(main())
