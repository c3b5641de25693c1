"""Point-E's published checkpoints, read through an explicit key map.

Nichol et al. 2022, "Point-E: A System for Generating 3D Point Clouds from Complex Prompts". The release
(https://github.com/openai/point-e, ``point_e/models/download.py``) serves plain ``state_dict()`` files:

* ``base_40m_textvec.pt`` (``base40M-textvec``): the text-conditioned base model;
* ``upsample_40m.pt`` (``upsample``): the 1024 -> 4096 point upsampler;

from ``https://openaipublic.azureedge.net/main/point-e/<file>``. The CLIP model the reference wraps is not
an ``nn.Module`` attribute there, so neither file holds CLIP weights.

:data:`KEY_RULES` writes out where each original key goes in :mod:`lift3d.priors.point_e.network`:

================================================  ============================================
original                                          ours
================================================  ============================================
``time_embed.c_fc`` / ``time_embed.c_proj``       ``time_mlp.fc1`` / ``time_mlp.fc2``
``ln_pre`` / ``ln_post``                          ``norm_in`` / ``norm_out``
``input_proj`` / ``output_proj``                  ``point_in`` / ``point_out``
``backbone.resblocks.N.ln_1`` / ``ln_2``          ``blocks.N.norm1`` / ``norm2``
``backbone.resblocks.N.attn.c_qkv`` / ``c_proj``  ``blocks.N.attn.qkv`` / ``proj`` (same row layout)
``backbone.resblocks.N.mlp.c_fc`` / ``c_proj``    ``blocks.N.mlp.fc1`` / ``fc2``
``clip_embed`` (base, a Linear)                   ``cond_proj``
``cond_point_proj`` (upsampler)                   ``low_res_proj``
``channel_scales`` / ``channel_biases``           ``low_res_scales`` / ``low_res_biases`` (buffers)
``clip_embed.0`` / ``clip_embed.1`` (upsampler)   ``grid_norm`` / ``grid_proj``
================================================  ============================================

Loading checks both directions: a key of the file that no rule places, or that lands on no parameter of
the model, is an error listing those keys; so is a parameter or buffer of the model that no key fills, and
a shape that differs. Files are read with ``torch.load(..., weights_only=True)`` (no pickled code runs) or,
for our own layout, as safetensors. The architecture is read from the shapes (:func:`infer_base_config`,
:func:`infer_upsampler_config`); head count and context size are not stored and come from the caller
(defaults: Point-E's 64 channels per head, 1024 / 3072 points).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
from torch import Tensor

from lift3d.config import ConfigError
from lift3d.utils.hub import MissingWeightsError

from .network import PointDiffusionTransformer, PointTransformerConfig, PointUpsamplerConfig, PointUpsampleTransformer

__all__ = [
    "PointECheckpointError", "KEY_RULES", "original_to_ours", "ours_to_original", "convert_state_dict",
    "to_original_state_dict", "load_state_file", "infer_base_config", "infer_upsampler_config", "load_base_model",
    "load_upsampler_model", "RELEASE_URL", "BASE_FILE", "UPSAMPLER_FILE",
]

RELEASE_URL = "https://openaipublic.azureedge.net/main/point-e/"
BASE_FILE = "base_40m_textvec.pt"
UPSAMPLER_FILE = "upsample_40m.pt"
#: Channels per attention head in every Point-E model (width 512 / 8 heads); not stored in the files.
HEAD_CHANNELS = 64


class PointECheckpointError(ConfigError):
    """A Point-E checkpoint whose keys or shapes do not match the model (names the keys)."""


_LAYER = r"(\d+)"
#: (original key regex, our key template), for both models; ``{0}`` is the block index.
KEY_RULES: tuple[tuple[str, str], ...] = (
    (r"time_embed\.c_fc\.(weight|bias)", "time_mlp.fc1.{p}"),
    (r"time_embed\.c_proj\.(weight|bias)", "time_mlp.fc2.{p}"),
    (r"ln_pre\.(weight|bias)", "norm_in.{p}"),
    (r"ln_post\.(weight|bias)", "norm_out.{p}"),
    (r"input_proj\.(weight|bias)", "point_in.{p}"),
    (r"output_proj\.(weight|bias)", "point_out.{p}"),
    (rf"backbone\.resblocks\.{_LAYER}\.ln_1\.(weight|bias)", "blocks.{i}.norm1.{p}"),
    (rf"backbone\.resblocks\.{_LAYER}\.ln_2\.(weight|bias)", "blocks.{i}.norm2.{p}"),
    (rf"backbone\.resblocks\.{_LAYER}\.attn\.c_qkv\.(weight|bias)", "blocks.{i}.attn.qkv.{p}"),
    (rf"backbone\.resblocks\.{_LAYER}\.attn\.c_proj\.(weight|bias)", "blocks.{i}.attn.proj.{p}"),
    (rf"backbone\.resblocks\.{_LAYER}\.mlp\.c_fc\.(weight|bias)", "blocks.{i}.mlp.fc1.{p}"),
    (rf"backbone\.resblocks\.{_LAYER}\.mlp\.c_proj\.(weight|bias)", "blocks.{i}.mlp.fc2.{p}"),
    (r"clip_embed\.(weight|bias)", "cond_proj.{p}"),
    (r"cond_point_proj\.(weight|bias)", "low_res_proj.{p}"),
    (r"()channel_scales", "low_res_scales"),
    (r"()channel_biases", "low_res_biases"),
    (r"clip_embed\.0\.(weight|bias)", "grid_norm.{p}"),
    (r"clip_embed\.1\.(weight|bias)", "grid_proj.{p}"),
)


def _template_to_regex(template: str) -> str:
    return "^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)") + "$"


def original_to_ours(key: str) -> str | None:
    """Our parameter name for an original Point-E key, or None if no rule places it."""
    for pattern, template in KEY_RULES:
        m = re.fullmatch(pattern, key)
        if m:
            groups = m.groups()
            if "{i}" in template:
                return template.format(i=groups[0], p=groups[1])
            return template.format(p=groups[-1]) if "{p}" in template else template
    return None


def ours_to_original(key: str) -> str | None:
    """The original Point-E key for one of our parameter names, or None."""
    for pattern, template in KEY_RULES:
        m = re.match(_template_to_regex(template), key)
        if not m:
            continue
        d = m.groupdict()
        # Rebuild the original by substituting the captured groups into the pattern's literal text.
        orig = pattern
        if "i" in d:
            orig = orig.replace(_LAYER, d["i"], 1)
        orig = orig.replace("(weight|bias)", d.get("p") or "").replace("()", "").replace("\\.", ".")
        return orig
    return None


def _model_tensors(model: nn.Module) -> dict[str, Tensor]:
    return dict(model.state_dict())


def convert_state_dict(original: Mapping[str, Tensor], model: nn.Module, *, source: str = "checkpoint") -> dict[str, Tensor]:
    """Original-layout state dict -> ours for ``model``, checked both ways (raises listing the keys)."""
    want = _model_tensors(model)
    out: dict[str, Tensor] = {}
    unplaced, mismatched = [], []
    for key, value in original.items():
        ours = original_to_ours(key)
        if ours is None or ours not in want:
            unplaced.append(key if ours is None else f"{key} (-> {ours}, which this model lacks)")
            continue
        if tuple(value.shape) != tuple(want[ours].shape):
            mismatched.append(f"{key}: file {tuple(value.shape)} vs model {ours} {tuple(want[ours].shape)}")
            continue
        out[ours] = value
    unfilled = [f"{k} (original {ours_to_original(k)})" for k in want if k not in out and
                not any(m.startswith(f"{ours_to_original(k)}:") for m in mismatched)]
    problems = []
    if unplaced:
        problems.append(f"{len(unplaced)} key(s) of the file are placed nowhere: " + ", ".join(sorted(unplaced)))
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): " + "; ".join(mismatched))
    if unfilled:
        problems.append(f"{len(unfilled)} parameter(s) of the model are filled by no key: " + ", ".join(unfilled))
    if problems:
        raise PointECheckpointError(f"Point-E {source} does not match {type(model).__name__}: " + ". ".join(problems))
    return out


def to_original_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Our model's state dict in Point-E's original key layout (the inverse map; for tests and export)."""
    out = {}
    for k, v in _model_tensors(model).items():
        orig = ours_to_original(k)
        if orig is None:
            raise PointECheckpointError(f"no original Point-E key for our parameter {k!r}")
        out[orig] = v.detach().clone()
    return out


def load_state_file(path: str | Path, *, key: str, release_file: str | None = None) -> dict[str, Tensor]:
    """Read a ``.pt`` (weights only) or ``.safetensors`` file; a missing file says where to get it."""
    path = Path(path).expanduser()
    if path.is_dir() and release_file and (path / release_file).is_file():
        path = path / release_file  # a folder holding the published file under its own name
    if not path.is_file():
        where = (f" Download the published file {release_file} from {RELEASE_URL}{release_file} (e.g. "
                 f"`curl -LO {RELEASE_URL}{release_file}`) and point {key}= at it.") if release_file else ""
        raise MissingWeightsError(f"config key '{key}' = '{path}': no such file.{where} lift3d never downloads at start-up.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # an unpickling refusal or a corrupt file: say which file
        raise PointECheckpointError(f"config key '{key}' = '{path}': cannot read it as a weights-only torch file "
                                    f"({type(exc).__name__}: {exc})") from None
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise PointECheckpointError(f"config key '{key}' = '{path}': expected a flat state dict of tensors")
    return dict(sd)


def _is_ours(sd: Mapping[str, Tensor]) -> bool:
    return "point_in.weight" in sd


def _layers(sd: Mapping[str, Tensor], prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def _heads(width: int, heads: int | None) -> int:
    if heads is not None:
        return heads
    return max(1, width // HEAD_CHANNELS)


def infer_base_config(sd: Mapping[str, Tensor], *, heads: int | None = None, n_ctx: int = 1024) -> PointTransformerConfig:
    """The base transformer's config from a state dict's shapes (original or our layout)."""
    ours = _is_ours(sd)
    w_in = sd["point_in.weight" if ours else "input_proj.weight"]
    w_out = sd["point_out.weight" if ours else "output_proj.weight"]
    cond = sd.get("cond_proj.weight" if ours else "clip_embed.weight")
    width = w_in.shape[0]
    return PointTransformerConfig(
        input_channels=w_in.shape[1], output_channels=w_out.shape[0], n_ctx=n_ctx, width=width,
        layers=_layers(sd, "blocks." if ours else "backbone.resblocks."), heads=_heads(width, heads),
        cond_dim=None if cond is None else cond.shape[1])


def infer_upsampler_config(sd: Mapping[str, Tensor], *, heads: int | None = None, n_ctx: int = 3072,
                           cond_ctx: int = 1024, grid_tokens: int = 256) -> PointUpsamplerConfig:
    ours = _is_ours(sd)
    w_in = sd["point_in.weight" if ours else "input_proj.weight"]
    w_out = sd["point_out.weight" if ours else "output_proj.weight"]
    w_lr = sd["low_res_proj.weight" if ours else "cond_point_proj.weight"]
    grid = sd.get("grid_proj.weight" if ours else "clip_embed.1.weight")
    scales = sd.get("low_res_scales" if ours else "channel_scales")
    biases = sd.get("low_res_biases" if ours else "channel_biases")
    width = w_in.shape[0]
    cfg = PointUpsamplerConfig(
        input_channels=w_in.shape[1], output_channels=w_out.shape[0], n_ctx=n_ctx, cond_ctx=cond_ctx,
        cond_input_channels=w_lr.shape[1], width=width,
        layers=_layers(sd, "blocks." if ours else "backbone.resblocks."), heads=_heads(width, heads),
        grid_dim=None if grid is None else grid.shape[1], grid_tokens=grid_tokens)
    if scales is not None:
        cfg.channel_scales = tuple(float(v) for v in scales)
    if biases is not None:
        cfg.channel_biases = tuple(float(v) for v in biases)
    return cfg


def _load_into(model: nn.Module, sd: Mapping[str, Tensor], source: str) -> None:
    if _is_ours(sd):
        want = _model_tensors(model)
        extra = sorted(set(sd) - set(want))
        missing = sorted(set(want) - set(sd))
        if extra or missing:
            raise PointECheckpointError(f"Point-E {source} (lift3d layout) does not match {type(model).__name__}: "
                                        f"unplaced keys {extra or 'none'}; unfilled parameters {missing or 'none'}")
        converted = dict(sd)
    else:
        converted = convert_state_dict(sd, model, source=source)
    model.load_state_dict(converted, strict=True)


def load_base_model(path: str | Path, *, key: str = "base", heads: int | None = None, n_ctx: int = 1024,
                    dtype: torch.dtype = torch.float32) -> PointDiffusionTransformer:
    """Build the base transformer from a file (original ``.pt`` or our ``.safetensors``), frozen, eval mode."""
    sd = load_state_file(path, key=key, release_file=BASE_FILE)
    if not any(k in sd for k in ("input_proj.weight", "point_in.weight")):
        raise PointECheckpointError(f"config key '{key}' = '{path}': not a Point-E transformer state dict "
                                    f"(no input_proj.weight; first keys: {', '.join(list(sd)[:5])})")
    model = PointDiffusionTransformer(infer_base_config(sd, heads=heads, n_ctx=n_ctx))
    _load_into(model, sd, f"base checkpoint {path}")
    return model.to(dtype).eval().requires_grad_(False)


def load_upsampler_model(path: str | Path, *, key: str = "upsampler", heads: int | None = None, n_ctx: int = 3072,
                         cond_ctx: int = 1024, grid_tokens: int = 256,
                         dtype: torch.dtype = torch.float32) -> PointUpsampleTransformer:
    """Build the upsampler from a file (original ``.pt`` or our ``.safetensors``), frozen, eval mode."""
    sd = load_state_file(path, key=key, release_file=UPSAMPLER_FILE)
    if not any(k in sd for k in ("cond_point_proj.weight", "low_res_proj.weight")):
        raise PointECheckpointError(f"config key '{key}' = '{path}': not a Point-E upsampler state dict "
                                    f"(no cond_point_proj.weight; first keys: {', '.join(list(sd)[:5])})")
    model = PointUpsampleTransformer(infer_upsampler_config(sd, heads=heads, n_ctx=n_ctx, cond_ctx=cond_ctx,
                                                                   grid_tokens=grid_tokens))
    _load_into(model, sd, f"upsampler checkpoint {path}")
    return model.to(dtype).eval().requires_grad_(False)
