"""SyncDreamer's released checkpoint, read without unpickling and placed by an explicit key map.

The authors publish ``syncdreamer-pretrain.ckpt`` (linked from the SyncDreamer README: Google Drive,
https://drive.google.com/file/d/1ypyD5WXxAnsWjnHgAfOAGolV0Zd9kpam). It is the state dict of their
``SyncMultiviewDiffusion`` Lightning module (under ``state_dict``), one copy of every weight, no
moving average:

==========================================  ===================================================
``model.diffusion_model.``                  the ldm UNet (Zero123's layout: 8 input channels)
                                            -> diffusers ``UNet2DConditionModel``
``model.diffusion_model.middle_conditions.`` the depth-wise attention after the middle block
``model.diffusion_model.output_conditions.I.`` the depth-wise attention after decoder block I + 3
``spatial_volume.target_encoder.``          the per-view encoder of the noisy latents
``spatial_volume.spatial_volume_feats.``    the spatial volume's 3D UNet
``spatial_volume.frustum_volume_feats.``    the frustum's 3D UNet
``time_embed.0`` / ``time_embed.2``         the volume branch's timestep MLP
``cc_projection.``                          [CLIP embedding, relative camera] -> context (772 -> 768)
``first_stage_model.``                      the KL autoencoder -> diffusers ``AutoencoderKL``
``clip_image_encoder.model.visual.``        OpenAI CLIP ViT-L/14's image tower -> transformers
                                            ``CLIPVisionModelWithProjection``
``alphas_cumprod``                          the noise schedule (other schedule buffers skipped)
``poses``, ``Ks``, ``azimuth``              the 16 cameras: compared with lift3d's table
==========================================  ===================================================

Every parameter of ours gets its source from :func:`source_of`; the load is checked both ways
(a checkpoint key neither placed nor in :data:`SKIPPED`, a parameter left unfilled, or a tensor
of another shape is an error that lists it). The UNet, VAE and CLIP rules are Zero123's
(:mod:`lift3d.priors.zero123`, :mod:`lift3d.priors.ldm_keys`); the rest is written here.

The weights may be given as the ``.ckpt`` (``torch.load(weights_only=True)``; a file that also
holds pickled objects is refused with the converter's command), a ``.safetensors`` of the same
keys, or a folder holding either. Network shapes are not in the file: the released ones
(:data:`PUBLISHED`) are used unless the folder holds an ``architecture.json`` (how tiny test
models load through the same path).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from torch import Tensor

from lift3d.config import ConfigError
from lift3d.priors import zero123 as z123
from lift3d.priors.syncdreamer import cameras as cams
from lift3d.priors.syncdreamer.network import SpatialVolume, SyncDreamerUNet, VolumeConfig
from lift3d.utils.hub import MissingWeightsError

CKPT_NAME = "syncdreamer-pretrain.ckpt"
RELEASE_URL = "https://drive.google.com/file/d/1ypyD5WXxAnsWjnHgAfOAGolV0Zd9kpam/view"
SOURCE = (f"the authors' release ({CKPT_NAME}, linked from https://github.com/liuyuan-pal/SyncDreamer's README: "
          f"{RELEASE_URL})")
ARCHITECTURE_FILE = "architecture.json"

UNET = "model.diffusion_model."
VOLUME = "spatial_volume."

#: Checkpoint keys skipped on purpose, with the reason (regular expressions on the whole key).
SKIPPED: list[tuple[str, str]] = [
    (r"(betas|alphas|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|posterior_variance|"
     r"posterior_log_variance_clipped)", "derived from the noise schedule (alphas_cumprod)"),
    (r"clip_image_encoder\.model\.(positional_embedding|text_projection|logit_scale|token_embedding\..+|"
     r"ln_final\..+|transformer\..+)", "CLIP's text tower, which SyncDreamer does not use"),
]
#: Checked against lift3d's camera table rather than loaded.
CAMERA_KEYS = ("poses", "Ks", "azimuth")

#: The released networks (the authors' configs/syncdreamer.yaml in diffusers / transformers terms).
PUBLISHED: dict[str, dict[str, Any]] = {
    "unet": dict(z123.PUBLISHED["unet"]),
    "vae": dict(z123.PUBLISHED["vae"], sample_size=256),
    "image_encoder": dict(z123.PUBLISHED["image_encoder"]),
    "volume": asdict(VolumeConfig()),
}


class SyncDreamerCheckpointError(ConfigError):
    """A checkpoint that does not fit the key map or the networks (a start-up error)."""


# ---------------------------------------------------------------------------------------------
# The key map


_DEPTH_TF = {"in_conv": "proj_in.0", "in_norm": "proj_in.1", "ctx_conv": "proj_context.0",
             "ctx_norm": "proj_context.1", "to_q": "depth_attn.to_q", "to_k": "depth_attn.to_k",
             "to_v": "depth_attn.to_v", "to_out": "depth_attn.to_out", "out_norm1": "proj_out.0",
             "out_conv1": "proj_out.2", "out_norm2": "proj_out.3", "out_conv2": "proj_out.5"}
_VIEW_BLOCK = {"time_proj": "time_embed", "view_proj": "view_embed", "norm1": "conv.0", "conv1": "conv.2",
               "norm2": "conv.3", "conv2": "conv.5"}
#: Our VolumeUNet's steps -> the original SpatialTime3DNet's modules.
_VOLUME_STEPS = {"top": "conv0", "down.0.0": "conv1", "down.0.1": "conv2_0", "down.0.2": "conv2_1",
                 "down.1.0": "conv3", "down.1.1": "conv4_0", "down.1.2": "conv4_1", "down.2.0": "conv5",
                 "down.2.1": "conv6_0", "down.2.2": "conv6_1", "up.0": "conv7", "up.1": "conv8", "up.2": "conv9"}
#: Our FrustumUNet's steps -> the original FrustumTV3DNet's modules.
_FRUSTUM_STEPS = {"down.0.0": "conv1", "down.0.1": "conv2", "down.1.0": "conv3", "down.1.1": "conv4",
                  "down.2.0": "conv5", "down.2.1": "conv6", "up.0": "up0", "up.1": "up1", "up.2": "up2"}


def _step_part(part: str, up: bool) -> str:
    """A Conv3dStep's sub-module in the original: the norm is ``bn`` in down steps, ``norm`` in up steps."""
    return {"time_proj": "t_conv", "view_proj": "v_conv", "norm": "norm" if up else "bn", "conv": "conv"}[part]


def source_of(name: str, unet: dict[str, str], vae: dict[str, z123.Source]) -> z123.Source:
    """The checkpoint key (and reshaping) of our parameter ``name``; KeyError when no rule covers it.
    ``unet`` / ``vae``: Zero123's diffusers -> ldm name tables for the networks' configs."""
    leaf = r"(weight|bias)"
    if name.startswith("unet.unet."):
        return z123.Source(UNET + unet[name[len("unet.unet."):]])
    m = re.fullmatch(rf"unet\.(mid_condition|up_conditions\.(\d+))\.(\w+)\.{leaf}", name)
    if m:
        where = "middle_conditions" if m[1] == "mid_condition" else f"output_conditions.{m[2]}"
        return z123.Source(f"{UNET}{where}.{_DEPTH_TF[m[3]]}.{m[4]}")
    m = re.fullmatch(rf"volume\.encoder\.(.+)\.{leaf}", name)
    if m:
        mod = m[1]
        b = re.fullmatch(r"blocks\.(\d)\.(\w+)", mod)
        orig = {"stem": "init_conv", "out_norm": "final_out.0", "out_conv": "final_out.2"}.get(mod) if not b \
            else f"out_conv{b[1]}.{_VIEW_BLOCK[b[2]]}"
        if orig is None:
            raise KeyError(name)
        return z123.Source(f"{VOLUME}target_encoder.{orig}.{m[2]}")
    m = re.fullmatch(rf"volume\.(volume_net|frustum_net)\.(.+)\.{leaf}", name)
    if m:
        net, mod = m[1], m[2]
        orig_net = "spatial_volume_feats" if net == "volume_net" else "frustum_volume_feats"
        steps = _VOLUME_STEPS if net == "volume_net" else _FRUSTUM_STEPS
        if mod == "stem":
            orig = "init_conv" if net == "volume_net" else "conv0"
        else:
            s = re.fullmatch(r"((?:down\.\d\.\d)|(?:up\.\d)|top)\.(\w+)", mod)
            if not s or s[1] not in steps:
                raise KeyError(name)
            orig = f"{steps[s[1]]}.{_step_part(s[2], s[1].startswith('up'))}"
        return z123.Source(f"{VOLUME}{orig_net}.{orig}.{m[3]}")
    m = re.fullmatch(rf"time_embedding\.linear_([12])\.{leaf}", name)
    if m:
        return z123.Source(f"time_embed.{0 if m[1] == '1' else 2}.{m[2]}")
    if name in ("cc_projection.weight", "cc_projection.bias"):
        return z123.Source(name)
    if name.startswith("vae."):
        s = vae[name[len("vae."):]]
        return z123.Source("first_stage_model." + s.key, flatten_1x1=s.flatten_1x1)
    if name.startswith("image_encoder."):
        s = z123.clip_source(name[len("image_encoder."):])
        return z123.Source("clip_image_encoder.model.visual." + s.key, chunk=s.chunk, chunks=s.chunks,
                           transpose=s.transpose)
    raise KeyError(name)


def key_map(model: nn.Module) -> dict[str, z123.Source]:
    """``{our parameter: Source}`` for every entry of ``model``'s state dict; a parameter no rule covers is a
    SyncDreamerCheckpointError (a network this map was not written for)."""
    unet = z123.unet_sources(dict(model.unet.unet.config))
    vae = z123.vae_sources(dict(model.vae.config))
    out, unknown = {}, []
    for name in model.state_dict():
        try:
            out[name] = source_of(name, unet, vae)
        except KeyError:
            unknown.append(name)
    if unknown:
        raise SyncDreamerCheckpointError(f"the SyncDreamer key map has no rule for {z123._few(unknown)}")
    return out


# ---------------------------------------------------------------------------------------------
# Architecture and building


@dataclass
class Architecture:
    """The shapes an original checkpoint is read into."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    image_encoder: dict[str, Any]
    volume: dict[str, Any] = field(default_factory=lambda: asdict(VolumeConfig()))

    @classmethod
    def published(cls) -> "Architecture":
        return cls(**{k: dict(v) for k, v in PUBLISHED.items()})

    @classmethod
    def from_file(cls, path: Path) -> "Architecture":
        try:
            doc = json.loads(Path(path).read_text())
            return cls(unet=doc["unet"], vae=doc["vae"], image_encoder=doc["image_encoder"],
                       volume=doc.get("volume", asdict(VolumeConfig())))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise SyncDreamerCheckpointError(f"{path}: not a SyncDreamer architecture file (needs unet, vae, "
                                             f"image_encoder configs and optionally volume): {exc}") from None

    def volume_config(self) -> VolumeConfig:
        v = dict(self.volume)
        v["dims"] = tuple(v.get("dims", VolumeConfig().dims))
        return VolumeConfig(**v)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))


def build(arch: Architecture, alphas_cumprod: Optional[Tensor] = None) -> "SyncDreamer":  # noqa: F821
    """Networks of ``arch`` with random weights (the loader fills them)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.embeddings import TimestepEmbedding
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from lift3d.priors.syncdreamer.model import SyncDreamer

    vc = arch.volume_config()
    unet = UNet2DConditionModel.from_config(arch.unet)
    vae = AutoencoderKL.from_config(arch.vae)
    clip_cfg = {k: v for k, v in arch.image_encoder.items() if not k.startswith("_")}
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**clip_cfg))
    embed = int(clip.config.projection_dim)
    cross = int(unet.config.cross_attention_dim)
    if alphas_cumprod is None:
        alphas_cumprod = schedule()
    return SyncDreamer(SyncDreamerUNet(unet, vc.dims), SpatialVolume(vc, int(vae.config.latent_channels)),
                       TimestepEmbedding(vc.time_dim, vc.time_dim), nn.Linear(embed + vc.view_dim, cross), vae, clip,
                       alphas_cumprod, scaling_factor=float(vae.config.scaling_factor))


def schedule(n: int = 1000, start: float = 0.00085, end: float = 0.012) -> Tensor:
    """The training schedule: betas linear in their square root from ``start`` to ``end`` (float32, as the original)."""
    betas = torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, 0)


# ---------------------------------------------------------------------------------------------
# Finding and reading the weights


def find_weights(path: str | Path, key: str) -> tuple[Path, Architecture]:
    """The weights file ``path`` names (a file, or a folder holding ``syncdreamer-pretrain.ckpt`` or one
    ``.ckpt`` / ``.safetensors``) and its architecture; a MissingWeightsError naming the file and its source."""
    p = Path(str(path)).expanduser()
    if not str(path):
        raise MissingWeightsError(f"config key '{key}' is empty: give the path of {CKPT_NAME} (or a folder "
                                  f"holding it); get it from {SOURCE}")
    if p.is_dir():
        cands = [p / CKPT_NAME] if (p / CKPT_NAME).is_file() else sorted(
            [f for f in p.iterdir() if f.suffix in (".ckpt", ".safetensors") and f.is_file()])
        if len(cands) != 1:
            what = "no" if not cands else f"{len(cands)} candidate"
            raise MissingWeightsError(f"config key '{key}' = '{p}': the folder holds {what} weights file(s) "
                                      f"(.ckpt / .safetensors); put {CKPT_NAME} there, from {SOURCE}")
        f = cands[0]
    elif p.is_file():
        f = p
    else:
        raise MissingWeightsError(f"config key '{key}' = '{p}': the weights are not on this machine (no such file). "
                                  f"SyncDreamer's weights are {SOURCE}; download it once and point {key}= at it "
                                  "(or its folder). lift3d "
                                  "never downloads at start-up.")
    arch_file = f.parent / ARCHITECTURE_FILE
    return f, Architecture.from_file(arch_file) if arch_file.is_file() else Architecture.published()


def read_state(path: Path, key: str) -> dict[str, Tensor]:
    try:
        return z123.read_state_dict(path, key)
    except z123.CheckpointLayoutError as exc:
        raise SyncDreamerCheckpointError(str(exc).replace(z123.CONVERTER, "python -m lift3d.priors.syncdreamer "
                                                                            "convert")) from None


def load_state(model: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """Fill ``model`` from an original-layout state dict, checked both ways (see the module docstring)."""
    table = key_map(model)
    want = model.state_dict()
    used, missing, wrong, filled = set(), [], [], {}
    for name, src in table.items():
        if src.key not in state:
            missing.append(f"{name} (from {src.key})")
            continue
        used.add(src.key)
        t = src.take(state[src.key])
        if tuple(t.shape) != tuple(want[name].shape):
            wrong.append(f"{src.key} {tuple(t.shape)} for {name} {tuple(want[name].shape)}")
            continue
        filled[name] = t.to(want[name].dtype)
    used |= {"alphas_cumprod", *CAMERA_KEYS} & set(state)
    skipped = [re.compile(p) for p, _ in SKIPPED]
    unplaced = [k for k in state if k not in used and not any(p.fullmatch(k) for p in skipped)]
    problems = []
    if unplaced:
        problems.append(f"keys the SyncDreamer key map does not place: {z123._few(unplaced)}")
    if missing:
        problems.append(f"parameters no key fills: {z123._few(missing)}")
    if wrong:
        problems.append(f"tensors of other shapes than the networks: {z123._few(wrong, 6)}")
    if problems:
        raise SyncDreamerCheckpointError(f"{where}: " + "; ".join(problems) + ". Is it SyncDreamer's "
                                         f"{CKPT_NAME} (with an {ARCHITECTURE_FILE} beside it for other sizes)?")
    check_cameras(state, model, where)
    model.load_state_dict(filled, strict=True)
    if "alphas_cumprod" in state:
        model.alphas_cumprod.copy_(state["alphas_cumprod"].float())


def check_cameras(state: dict[str, Tensor], model: nn.Module, where: str) -> None:
    """The checkpoint's camera buffers, where present, must be lift3d's table (else the views' cameras are wrong)."""
    ours = {"poses": model.w2c, "Ks": model.K,
            "azimuth": torch.deg2rad(torch.remainder(torch.tensor(cams.AZIMUTHS) + 180.0, 360.0) - 180.0)}
    for k, mine in ours.items():
        if k in state:
            theirs = state[k].float().cpu()
            if theirs.shape != mine.shape or (theirs - mine.cpu()).abs().max() > 1e-3:
                raise SyncDreamerCheckpointError(f"{where}: its camera buffer '{k}' is not the 16-view table lift3d "
                                                 "knows (elevation 30, azimuths every 22.5 degrees, distance 1.5, "
                                                 "focal 280 at 256 px)")


def load(path: str | Path, key: str = "syncdreamer_model",
         dtype: torch.dtype = torch.float32) -> "SyncDreamer":  # noqa: F821
    """A frozen :class:`~lift3d.priors.syncdreamer.model.SyncDreamer` from the weights ``path`` names."""
    f, arch = find_weights(path, key)
    state = read_state(f, key)
    model = build(arch)
    load_state(model, state, f"config key '{key}' = {f}")
    model.requires_grad_(False).eval()
    if dtype != torch.float32:  # the networks only: the schedule and cameras stay float32
        for part in (model.unet, model.volume, model.time_embedding, model.cc_projection, model.vae,
                     model.image_encoder):
            part.to(dtype)
    return model


def original_state_dict(model: nn.Module, with_buffers: bool = True) -> dict[str, Tensor]:
    """The inverse map: ``model``'s weights in the original checkpoint layout (tests write tiny checkpoints
    with it)."""
    sd = model.state_dict()
    out: dict[str, Tensor] = {}
    fused: dict[str, list[Optional[Tensor]]] = {}
    for name, src in key_map(model).items():
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
        out[k] = torch.cat(parts, 0)
    if with_buffers:
        out["alphas_cumprod"] = model.alphas_cumprod.detach().clone()
        out["poses"], out["Ks"] = model.w2c.detach().clone(), model.K.detach().clone()
    return out


__all__ = ["CKPT_NAME", "RELEASE_URL", "SOURCE", "SKIPPED", "PUBLISHED", "Architecture", "SyncDreamerCheckpointError",
           "source_of", "key_map", "build", "schedule", "find_weights", "read_state", "load_state", "load",
           "original_state_dict", "check_cameras", "ARCHITECTURE_FILE"]
