"""Zero-1-to-3 and Stable Zero123 as score-distillation priors for image-to-3D.

Zero-1-to-3 (Liu et al., ICCV 2023, "Zero-1-to-3: Zero-shot One Image to 3D Object") fine-tunes
Stable Diffusion to draw an object from a new viewpoint, given one image of it and the camera
change. Stable Zero123 (Stability AI, 2023) is the same network trained on better renders, told the
input view's elevation as well. Score distillation with either (threestudio's ``zero123-guidance``
and ``stable-zero123-guidance``, DreamGaussian's image mode, Magic123's 3D prior) judges random
views of the asset against the input image. :class:`Zero123Prior` adapts the network to
:mod:`lift3d.guidance.score_distillation`, whose SDS is used as it is:

* space: the render, resized to the model's working resolution (the UNet's ``sample_size`` times
  the VAE's downsampling: 256 for the released models), mapped to [-1, 1] and VAE-encoded (the
  posterior mean, times the VAE's ``scaling_factor``);
* the UNet takes 8 channels: the noisy latent, then the VAE posterior *mode* of the conditioning
  image at the working resolution, unscaled (as the original model was trained);
* its cross-attention reads one token: ``cc_projection`` applied to the CLIP ViT-L/14 image
  embedding of the conditioning image (768) followed by 4 camera numbers (:func:`camera_vector`);
* classifier-free guidance: the unconditional branch has zeros for both the projected token and
  the image latent, as the reference sampler (cvlab-columbia/zero123's ``sample_model``) and
  threestudio do; ``guidance_scale`` s gives ``e_u + s (e_c - e_u)``, the formula of those same
  implementations, so their numbers carry over unchanged.

The conditioning image, its camera and the random views' cameras come from the
:class:`~lift3d.guidance.base.GuidanceInput` (``cond_image``, ``cond_cameras``, ``cameras``): the
reference view of a ``single-image-datamodule`` batch, composited over the data module's
``background_color`` (Zero123 saw objects on white: recipes set it to white). Its CLIP embedding and
latent are computed once and kept while the image stays the same.

Weights load from a diffusers-format folder (``unet/``, ``vae/``, ``image_encoder/``,
``feature_extractor/``, ``clip_camera_projection/`` or ``cc_projection/``, ``scheduler/``: the
layout of bennyguo/zero123-xl-diffusers and kxic/zero123-xl), or from an original checkpoint
(``105000.ckpt``, ``zero123-xl.ckpt``, ``stable_zero123.ckpt``) through the explicit key map of
:mod:`lift3d.priors.zero123`, read without unpickling. ``python -m lift3d.priors.zero123
convert IN.ckpt OUT.safetensors`` makes a pickle-free copy of a checkpoint that needs one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from lift3d.config import ConfigError, Scheduled
from lift3d.guidance.base import CameraBatch, GuidanceInput, GuidanceOutput
from lift3d.guidance.latent_diffusion import LatentDiffusionPrior, LatentDiffusionWeights, weights_dtype
from lift3d.guidance.score_distillation import Cond, Conditioning, RefineGuidance, SDSGuidance
from lift3d.guidance.stable_diffusion_refine import LatentRefineGuidance
from lift3d.registry import register

#: Zero123-XL in the diffusers layout: what ``zero123-guidance`` loads unless told otherwise.
DEFAULT_ZERO123_MODEL = "bennyguo/zero123-xl-diffusers"
#: Stability AI's repository of ``stable_zero123.ckpt`` (original layout).
DEFAULT_STABLE_ZERO123_MODEL = "stabilityai/stable-zero123"
DEFAULT_STABLE_ZERO123_FILE = "stable_zero123.ckpt"

#: Files a diffusers-format Zero123 folder must hold (besides one of PROJECTION_FOLDERS).
DIFFUSERS_FILES = ("unet/config.json", "vae/config.json", "image_encoder/config.json",
                   "scheduler/scheduler_config.json")
#: Endings of original-layout checkpoint files (a path with one names a file, not a folder or an id).
CHECKPOINT_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth")
#: Where the camera projection sits in the published diffusers layouts, and its layer's name there.
PROJECTION_FOLDERS = {"clip_camera_projection": "proj", "cc_projection": "projection"}

CameraMode = Literal["relative", "stable"]


# ---------------------------------------------------------------------------------------------
# Cameras


def camera_vector(
    elevation: Float[Tensor, "B"], azimuth: Float[Tensor, "B"], distance: Float[Tensor, "B"],
    cond_elevation: Float[Tensor, "B"], cond_azimuth: Float[Tensor, "B"], cond_distance: Float[Tensor, "B"],
    mode: CameraMode = "relative",
) -> Float[Tensor, "B 4"]:
    """The 4 camera numbers Zero123 reads, from lift3d cameras (degrees).

    lift3d puts a camera at elevation e (up from the xy-plane), azimuth a (from +x towards +y) and
    distance r, at r (cos e cos a, cos e sin a, sin e), +z up. Zero123's training renders (Objaverse,
    +z up) describe a camera by its polar angle from +z, theta = 90 - e, its azimuth atan2(y, x) = a
    and its distance, and condition on target minus input:

    * ``relative`` (Zero-1-to-3): [theta_t - theta_c in radians, sin(a_t - a_c), cos(a_t - a_c), r_t - r_c];
      the same view gives [0, 0, 1, 0], a target above the input a negative first number;
    * ``stable`` (Stable Zero123): the last number is the input view's own polar angle theta_c in
      radians (its elevation tells the model how the input was seen).

    The ``cond_*`` tensors broadcast against the targets'.
    """
    polar_change = torch.deg2rad((90.0 - elevation) - (90.0 - cond_elevation))
    turn = torch.deg2rad(azimuth - cond_azimuth)
    if mode == "relative":
        last = distance - cond_distance
    elif mode == "stable":
        last = torch.deg2rad(90.0 - cond_elevation).expand_as(polar_change)
    else:
        raise ValueError(f"unknown Zero123 camera mode {mode!r}; valid: relative, stable")
    return torch.stack([polar_change, torch.sin(turn), torch.cos(turn), last.expand_as(polar_change)], dim=-1)


# ---------------------------------------------------------------------------------------------
# The adapter


class Zero123Prior(LatentDiffusionPrior):
    """Adapter around Zero123's networks: an image-conditioned diffusers ``UNet2DConditionModel`` (8 input
    channels), an ``AutoencoderKL``, a ``CLIPVisionModelWithProjection`` and the camera projection.

    Its space is the VAE latent ``[B, 4, h, w]``. A branch (:data:`Cond`) is ``token`` [B, 1, D] (the
    projected [CLIP embedding, camera], or zeros) and ``image`` [B, 4, h, w] (the conditioning
    image's unscaled latent, or zeros). Resizing, encoding, decoding and the dtype are
    :class:`~lift3d.guidance.latent_diffusion.LatentDiffusionPrior`'s.
    """

    def __init__(self, unet: nn.Module, vae: nn.Module, image_encoder: nn.Module, projection: nn.Module,
                 alphas_cumprod: Tensor, *, scaling_factor: float, clip_mean: tuple[float, ...],
                 clip_std: tuple[float, ...], camera: CameraMode = "relative", prediction_type: str = "epsilon",
                 name: str = "zero123-guidance"):
        super().__init__()
        self.unet, self.vae, self.image_encoder, self.projection = unet, vae, image_encoder, projection
        self.guidance_name = name
        self.camera = camera
        self.prediction_type = prediction_type
        self.num_train_timesteps = int(alphas_cumprod.shape[0])
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().float().clone(), persistent=False)
        self.register_buffer("clip_mean", torch.tensor(clip_mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("clip_std", torch.tensor(clip_std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        size = unet.config.sample_size
        self.latent_size: tuple[int, int] = (int(size), int(size)) if isinstance(size, int) else tuple(map(int, size))
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        #: The working resolution (h, w) in pixels, from the networks' configs.
        self.resolution: tuple[int, int] = (self.latent_size[0] * self.vae_scale_factor,
                                             self.latent_size[1] * self.vae_scale_factor)
        self.scaling_factor = float(scaling_factor)
        self.latent_channels = int(vae.config.latent_channels)
        if int(unet.config.in_channels) != 2 * self.latent_channels:
            raise ConfigError(f"{name}: the UNet takes {unet.config.in_channels} input channels, but Zero123 stacks "
                              f"the noisy latent and the image latent ({2 * self.latent_channels}); is this a "
                              "Zero123 UNet?")
        self.clip_size = int(image_encoder.config.image_size)
        self.embed_dim = int(unet.config.cross_attention_dim)
        proj_in = int(projection.proj.in_features)
        clip_dim, proj_out = int(image_encoder.config.projection_dim), int(projection.proj.out_features)
        if proj_in != clip_dim + 4 or proj_out != self.embed_dim:
            raise ConfigError(f"{name}: the camera projection maps {proj_in} -> {proj_out}, but the CLIP embedding "
                              f"has {clip_dim} entries (+4 camera numbers) and the UNet attends to {self.embed_dim}")
        # (image, its CLIP embedding, its latent) of the last conditioning image: not a buffer, never saved.
        self._embedded: tuple[Tensor, Tensor, Tensor] | None = None

    def set_dtype(self, dtype: torch.dtype) -> None:
        """Cast the networks (not the schedule or the pixel statistics) to ``dtype``."""
        for net in (self.unet, self.vae, self.image_encoder, self.projection):
            if any(p.dtype != dtype for p in net.parameters()):
                net.to(dtype)
        self._embedded = None

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "Zero123Prior":
        self._embedded = None  # computed on the old device / dtype
        return super()._apply(fn, *args, **kwargs)

    # -- images ----------------------------------------------------------------------------------

    @torch.no_grad()
    def embed_image(self, image: Float[Tensor, "N H W 3"]) -> tuple[Float[Tensor, "N D"], Float[Tensor, "N C h w"]]:
        """The conditioning image's CLIP image embedding and its unscaled VAE posterior mode.

        Both start from the image at the working resolution (the original pipeline read its input at
        256 px); CLIP's input is then resized bicubically to the encoder's size and normalised with
        CLIP's pixel statistics, as the original ``FrozenCLIPImageEmbedder`` does.
        """
        cached = self._embedded
        if cached is not None and cached[0].shape == image.shape and cached[0].device == image.device \
                and torch.equal(cached[0], image.to(cached[0].dtype)):
            return cached[1], cached[2]
        dt = self.dtype
        x = self.resize(image.to(self.clip_mean.dtype)).clamp(0, 1)
        latent = self.vae.encode((x * 2 - 1).to(dt)).latent_dist.mode()
        c = F.interpolate(x, (self.clip_size, self.clip_size), mode="bicubic", align_corners=True)
        c = (c - self.clip_mean) / self.clip_std
        clip = self.image_encoder(pixel_values=c.to(dt)).image_embeds
        self._embedded = (image.detach().clone(), clip, latent)
        return clip, latent

    # -- the adapter -----------------------------------------------------------------------------

    def camera_vectors(self, cameras: CameraBatch, cond: CameraBatch) -> Float[Tensor, "B 4"]:
        dev = cameras.elevation.device
        c = [getattr(cond, k).to(dev).float() for k in ("elevation", "azimuth", "distance")]
        if c[0].shape[0] not in (1, len(cameras)):
            raise ValueError(f"{self.guidance_name}: {c[0].shape[0]} conditioning cameras for {len(cameras)} views; "
                             "give one, or one per view")
        return camera_vector(cameras.elevation.float(), cameras.azimuth.float(), cameras.distance.float(), *c,
                             mode=self.camera)

    def condition(self, inp: GuidanceInput, view_dependent_prompting: bool = True) -> Conditioning:
        if inp.cond_image is None or inp.cond_cameras is None:
            raise ValueError(f"{self.guidance_name} needs the input image and its camera (cond_image, cond_cameras): "
                             "use data_type: single-image-datamodule with image=PATH")
        B = len(inp.cameras)
        image = inp.cond_image
        if image.shape[0] not in (1, B):
            raise ValueError(f"{self.guidance_name}: {image.shape[0]} conditioning images for {B} views; give one, "
                             "or one per view")
        clip, latent = self.embed_image(image)
        T = self.camera_vectors(inp.cameras, inp.cond_cameras)  # [B, 4]
        dt = self.dtype
        with torch.no_grad():
            token = self.projection(torch.cat([clip.expand(B, -1).to(dt), T.to(dt)], dim=-1))[:, None, :]
        latent = latent.expand(B, *latent.shape[1:])
        cond = {"token": token, "image": latent, "camera": T}
        uncond = {"token": torch.zeros_like(token), "image": torch.zeros_like(latent), "camera": T}
        return Conditioning(cond=cond, uncond=uncond)

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        dt = self.dtype
        x = torch.cat([x_t.to(dt), cond["image"].to(dt)], dim=1)
        out = self.unet(x, t, encoder_hidden_states=cond["token"].to(dt)).sample
        return out.to(x_t.dtype)

    def drop_text(self, cond: Cond, mask: Tensor) -> Cond:
        """Zero123's "no condition": zeros for the token and the image latent of rows ``mask``."""
        m = mask.view(-1, 1, 1)
        return {**cond, "token": cond["token"].masked_fill(m, 0.0),
                "image": cond["image"].masked_fill(mask.view(-1, 1, 1, 1), 0.0)}


# ---------------------------------------------------------------------------------------------
# Finding and loading the weights


@dataclass
class Zero123Weights:
    """The config keys of the guidances built on Zero123 weights."""

    pretrained_model_name_or_path: str = DEFAULT_ZERO123_MODEL
    """A diffusers-format Zero123 folder, a Hugging Face id found in the local cache, or an original
    checkpoint file (``.ckpt``, or the converter's ``.safetensors``). Never downloaded: fetch it once
    with ``hf download <id>``. Recipes set it to ``${zero123_model}``."""
    checkpoint_file: Optional[str] = None
    """The original checkpoint inside the folder or repository above (``stable_zero123.ckpt`` in
    stabilityai/stable-zero123); null: the folder is in the diffusers layout. Ignored when the path
    above is itself a file."""
    original_architecture: Optional[str] = None
    """For an original checkpoint: a diffusers-format folder whose ``unet/``, ``vae/``,
    ``image_encoder/`` configs (and ``scheduler/``, ``feature_extractor/``) describe its networks;
    null: the released models' (Stable Diffusion 1.x's UNet with 8 input channels, its VAE, CLIP
    ViT-L/14). Only configs are read from it."""
    prefer_ema: bool = True
    """For an original checkpoint that holds the UNet's moving average (``model_ema.*``): use it
    (what the original code loads for sampling); false: the raw weights."""
    revision: Optional[str] = None
    """A Hugging Face revision (branch, tag or commit) to look up in the cache."""
    half_precision_weights: bool = True
    """Keep the networks in float16 while the guidance is on CUDA (float32 on CPU and MPS).
    Ignored when torch_dtype is set."""
    torch_dtype: Optional[Literal["float16", "bfloat16", "float32"]] = None
    """A fixed dtype for the networks on every device; null: as half_precision_weights says."""


def _read_projection(folder: Path, key: str) -> tuple[Tensor, Tensor]:
    """The camera projection's (weight, bias) from a diffusers-format folder (safetensors, else a
    ``.bin`` read with weights_only=True)."""
    from lift3d.priors.zero123 import pickle_message, tensors_of

    for sub, layer in PROJECTION_FOLDERS.items():
        d = folder / sub
        if not d.is_dir():
            continue
        for fname in ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin"):
            f = d / fname
            if not f.is_file():
                continue
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(f))
            else:
                import pickle

                try:
                    state = tensors_of(torch.load(f, map_location="cpu", weights_only=True))
                except pickle.UnpicklingError:
                    raise ConfigError(pickle_message(f, key)) from None
            w, b = state.get(f"{layer}.weight"), state.get(f"{layer}.bias")
            if w is None or b is None:
                raise ConfigError(f"config key '{key}': {f} has no {layer}.weight / {layer}.bias (keys: "
                                  f"{', '.join(sorted(state)) or 'none'})")
            return w.float(), b.float()
        raise ConfigError(f"config key '{key}': {d} holds no weights (diffusion_pytorch_model.safetensors or .bin)")
    raise ConfigError(f"config key '{key}': {folder} has no camera projection ({' or '.join(PROJECTION_FOLDERS)}/)")


def load_diffusers_folder(folder: Path, key: str) -> dict[str, Any]:
    """The networks and schedule of a diffusers-format Zero123 folder, float32 on the CPU."""
    import json

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPVisionModelWithProjection

    from lift3d.priors.zero123 import CLIP_MEAN, CLIP_STD, CameraProjection
    from lift3d.utils.hub import MissingWeightsError

    try:
        f32 = torch.float32
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=f32, local_files_only=True)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=f32, local_files_only=True)
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder", dtype=f32,
                                                                      local_files_only=True)
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise MissingWeightsError(f"config key '{key}': {folder} does not load as a diffusers-format Zero123 model "
                                  f"({type(exc).__name__}: {first}); is the download complete?") from None
    w, b = _read_projection(folder, key)
    projection = CameraProjection(w.shape[1], w.shape[0])
    projection.proj.load_state_dict({"weight": w, "bias": b})
    mean, std = CLIP_MEAN, CLIP_STD
    pre = folder / "feature_extractor" / "preprocessor_config.json"
    if pre.is_file():
        p = json.loads(pre.read_text())
        mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
    return {"unet": unet, "vae": vae, "image_encoder": image_encoder, "projection": projection,
            "alphas_cumprod": scheduler.alphas_cumprod.clone(), "scaling_factor": float(vae.config.scaling_factor),
            "clip_mean": mean, "clip_std": std, "prediction_type": scheduler.config.prediction_type}


class _Zero123Loading:
    """Finding and loading Zero123 weights (``cfg``: :class:`Zero123Weights` keys): what every guidance on
    them shares, SDS and refine alike."""

    prior_family = "zero123"
    prior_inputs = frozenset({"cond_image"})
    #: The camera numbers the network reads (see :func:`camera_vector`).
    camera_mode: CameraMode = "relative"
    cfg: Any
    _cfg_key: str

    @classmethod
    def resolve(cls, cfg: Any, key: str = "system.guidance") -> Path:
        """The weights ``cfg`` names: an original checkpoint file, or a diffusers-format folder; a
        :class:`~lift3d.utils.hub.MissingWeightsError` naming the key when they are not on this machine."""
        from lift3d.utils.hub import MissingWeightsError, resolve_weights

        name = cfg.pretrained_model_name_or_path
        k = f"{key}.pretrained_model_name_or_path"
        as_file = Path(name).expanduser() if name else None
        if as_file is not None and as_file.is_file():
            return as_file.resolve()
        if as_file is not None and as_file.suffix in CHECKPOINT_SUFFIXES:
            raise MissingWeightsError(
                f"config key '{k}' = {name!r}: no such file ({as_file.resolve()}); give the path of the checkpoint, "
                "a folder that holds the weights, or a Hugging Face id")
        required = [cfg.checkpoint_file] if cfg.checkpoint_file else []
        folder = resolve_weights(name, key=k, required=required, revision=cfg.revision).path
        if cfg.checkpoint_file:
            return folder / cfg.checkpoint_file
        missing = [f for f in DIFFUSERS_FILES if not (folder / f).exists()]
        if not any((folder / sub).is_dir() for sub in PROJECTION_FOLDERS):
            missing.append(f"{' or '.join(PROJECTION_FOLDERS)}/")
        if missing:
            ckpts = sorted(p.name for p in folder.glob("*.ckpt"))
            hint = (f"; it holds {', '.join(ckpts)}: name the one to load with {key}.checkpoint_file" if ckpts else
                    "; give a diffusers-format Zero123 folder or an original checkpoint (.ckpt)")
            raise MissingWeightsError(f"config key '{k}' = {name!r}: {folder} lacks {', '.join(missing)}{hint}")
        return folder

    @classmethod
    def missing_weights(cls, cfg: Any) -> str | None:
        """Why the weights cannot be loaded here (None when they can): absent, or an original checkpoint
        that holds pickled objects (the converter's command); nothing is loaded."""
        from lift3d.priors.zero123 import probe
        from lift3d.utils.hub import MissingWeightsError

        try:
            path = cls.resolve(cfg)
        except MissingWeightsError as exc:
            return str(exc)
        if path.is_file():
            return probe(path, "system.guidance.pretrained_model_name_or_path")
        return None

    def build_prior(self) -> Zero123Prior:
        c, key = self.cfg, f"{self._cfg_key}.pretrained_model_name_or_path"
        path = self.resolve(c, self._cfg_key)
        if path.is_file():
            from lift3d.priors.zero123 import Architecture, load_original

            arch = (Architecture.from_folder(c.original_architecture, f"{self._cfg_key}.original_architecture")
                    if c.original_architecture else None)
            w = load_original(path, arch, prefer_ema=c.prefer_ema, key=key)
            parts = {"unet": w.unet, "vae": w.vae, "image_encoder": w.image_encoder, "projection": w.projection,
                     "alphas_cumprod": w.alphas_cumprod, "scaling_factor": w.scaling_factor,
                     "clip_mean": w.clip_mean, "clip_std": w.clip_std, "prediction_type": w.prediction_type}
        else:
            parts = load_diffusers_folder(path, key)
        alphas = parts.pop("alphas_cumprod")
        nets = [parts.pop(n) for n in ("unet", "vae", "image_encoder", "projection")]
        prior = Zero123Prior(*nets, alphas, camera=self.camera_mode, name=self.name(), **parts)
        # float32 unless fixed: the dtype follows the device the guidance moves to (LatentDiffusionWeights._apply).
        prior.set_dtype(weights_dtype(c.torch_dtype, c.half_precision_weights, on_cuda=False))
        return prior


class _Zero123Base(_Zero123Loading, LatentDiffusionWeights, SDSGuidance):
    """What the Zero123 SDS guidances share: the weights, the adapter, SDS with its own forward."""

    @dataclass
    class Config(SDSGuidance.Config, Zero123Weights):
        guidance_scale: Scheduled = 3.0
        """Classifier-free guidance scale ``s``: the guided noise is ``e_u + s (e_c - e_u)``, ``e_c`` the
        prediction given the input image and camera, ``e_u`` the one given zeros for both. That is the
        formula of threestudio's Zero123 guidances (and of the original sampler), so their numbers carry
        over unchanged (threestudio's recipes: 3; unlike its stable-diffusion-guidance, no +1)."""
        image: Literal["rgb", "normal"] = "rgb"
        """What is scored: the render, or its normal map (both VAE-encoded)."""
        return_denoised: bool = False
        """Decode the one-step clean estimate into the diagnostics as ``denoised`` [B, h, w, 3] (a VAE
        decode per step)."""

    cfg: Config

    # -- scoring ---------------------------------------------------------------------------------

    def forward(self, inp: GuidanceInput, t: Tensor | None = None, noise: Tensor | None = None) -> GuidanceOutput:
        s = self.score(inp, t, noise)
        s.diagnostics["camera"] = s.conds.cond["camera"]
        if self.cfg.return_denoised:
            with torch.no_grad():
                s.diagnostics["denoised"] = self.prior.decode(s.denoised())
        return GuidanceOutput(losses={"loss_sds": self.distillation_target(s.x, s.grad)}, diagnostics=s.diagnostics)


@register("zero123-guidance")
class Zero123Guidance(_Zero123Base):
    """SDS with Zero-1-to-3 (Zero123-XL by default): the camera is the change from the input view;
    returns ``loss_sds``."""

    camera_mode = "relative"


@register("stable-zero123-guidance")
class StableZero123Guidance(_Zero123Base):
    """SDS with Stable Zero123: the camera's last number is the input view's polar angle; returns ``loss_sds``."""

    camera_mode = "stable"

    @dataclass
    class Config(_Zero123Base.Config):
        pretrained_model_name_or_path: str = DEFAULT_STABLE_ZERO123_MODEL
        """Stability AI's repository holding ``stable_zero123.ckpt`` (found in the local Hugging Face
        cache), a folder, the checkpoint file itself, or a diffusers-format conversion (with
        ``checkpoint_file: null``). Never downloaded: ``hf download stabilityai/stable-zero123`` once.
        Recipes set it to ``${zero123_model}``."""
        checkpoint_file: Optional[str] = DEFAULT_STABLE_ZERO123_FILE
        """The original checkpoint inside that folder or repository; null for a diffusers-format folder."""


__all__ = ["Zero123Prior", "Zero123Guidance", "StableZero123Guidance", "Zero123Weights", "camera_vector",
           "load_diffusers_folder", "DEFAULT_ZERO123_MODEL", "DEFAULT_STABLE_ZERO123_MODEL"]


# ---------------------------------------------------------------------------------------------
# DreamGaussian's texture refinement with Zero123


@register("zero123-refine-guidance")
class Zero123RefineGuidance(_Zero123Loading, LatentDiffusionWeights, LatentRefineGuidance):
    """MSE to Zero123's multi-step denoised render (DreamGaussian's image-to-3D texture stage); returns
    ``loss_refine``.

    Each render is encoded, noised to ``strength`` of the schedule, walked back in ``n_steps`` DDIM
    steps under classifier-free guidance given the input image and the camera change, decoded, and the
    render is fitted to that target: the latent-space refine loop that Stable Diffusion's refine uses
    (:class:`~lift3d.guidance.stable_diffusion_refine.LatentRefineGuidance`), on weights found and loaded
    as ``zero123-guidance`` loads them (same keys).
    """

    @dataclass
    class Config(RefineGuidance.Config, Zero123Weights):
        guidance_scale: Scheduled = 5.0
        """Classifier-free guidance scale of the denoising steps, ``e_u + s (e_c - e_u)`` (DreamGaussian's
        Zero123 refinement uses 5 in this form)."""
        strength: Scheduled = 0.2
        """How far each render is noised, as a fraction of the timesteps (0: the target is the render).
        DreamGaussian's image recipe goes from about 0.18 to 0.04 over its texture stage."""
        n_steps: int = 10
        """DDIM steps from the noised render back to a clean latent (capped at the starting timestep)."""
        camera: CameraMode = "relative"
        """The camera numbers the network reads: ``relative`` for Zero-1-to-3 and Zero123-XL, ``stable``
        for Stable Zero123 weights (see :func:`camera_vector`)."""

    cfg: Config

    @property
    def camera_mode(self) -> CameraMode:  # type: ignore[override]
        """Read by ``build_prior``: this guidance's ``camera`` setting."""
        return self.cfg.camera


__all__ += ["Zero123RefineGuidance"]
