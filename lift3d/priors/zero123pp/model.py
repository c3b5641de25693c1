"""Zero123++'s networks and conditioning on diffusers parts, loaded from the published folder layout.

Zero123++ (Shi et al. 2023, "Zero123++: a Single Image to Consistent Multi-view Diffusion Base
Model") fine-tunes Stable Diffusion 2's v-prediction UNet to draw six views of an object, tiled in
one image, from one input image. The UNet is a plain ``UNet2DConditionModel``; the input image
reaches it two ways, both built here from diffusers / transformers parts:

* **local**: reference attention (:mod:`lift3d.priors.zero123pp.attention`). The input image's VAE
  latent (a posterior sample, *unscaled*), noised to the current timestep, goes through the UNet
  first; the pass over the views then attends to its self-attention states as well.
* **global**: the input's CLIP image embedding (``vision_encoder``, a
  ``CLIPVisionModelWithProjection``) is added to the text encoder's states of the empty prompt,
  token i weighted by ``ramping_coefficients[i]`` (77 learned numbers the pipeline keeps in its
  ``model_index.json``): ``states = text("") + ramp[:, None] * embed``.

Classifier-free guidance pairs that with an unconditional branch of plain ``text("")`` states and
the reference latent of a blank image (zeros after the VAE preprocessor's normalisation).

The views live in a rescaled latent space. A VAE latent ``l`` (times the VAE's ``scaling_factor``)
becomes ``z = (l - 0.22) * 0.75``, and pixels in [-1, 1] are multiplied by 0.5 / 0.8 before the VAE
encodes them (so decoding divides by it): the authors' normalisation of rendered data towards
natural-image statistics (zero123plus issue 86). :func:`scale_latents` / :func:`unscale_latents`
and :func:`scale_image` / :func:`unscale_image` are these maps.

The folder is the one ``hf download sudo-ai/zero123plus-v1.2`` (or ``-v1.1``) fetches:
``model_index.json`` (with ``ramping_coefficients``), ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``vision_encoder/``, ``feature_extractor_clip/``, ``feature_extractor_vae/``,
``scheduler/``. Its ``unet/`` holds plain diffusers UNet keys: the original pipeline wraps the UNet
(``RefOnlyNoisedUNet``) only at call time. A fine-tuned UNet saved from that wrapper, or from a
training module holding it, carries a ``unet.`` or ``unet.unet.`` prefix; :func:`load_unet_weights`
reads such a file (safetensors, or a tensors-only ``torch.load`` with ``weights_only=True``) through
an explicit prefix map, checked both ways.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from lift3d.config import ConfigError
from lift3d.priors.zero123pp.attention import ReferenceState, install_reference_attention

#: The Hugging Face repositories of the released models.
HUB_IDS = {"v1.1": "sudo-ai/zero123plus-v1.1", "v1.2": "sudo-ai/zero123plus-v1.2"}
DEFAULT_MODEL = HUB_IDS["v1.2"]

#: Files a Zero123++ folder must hold (the published diffusers layout).
REQUIRED_FILES = (
    "model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer",
    "vision_encoder/config.json", "feature_extractor_clip/preprocessor_config.json",
    "feature_extractor_vae/preprocessor_config.json", "scheduler/scheduler_config.json",
)

LATENT_SHIFT, LATENT_SCALE = 0.22, 0.75
IMAGE_SCALE = 0.5 / 0.8
#: The grey the original pipeline pastes an RGBA input over (8-bit level 127).
INPUT_BACKGROUND = 127.0 / 255.0


def scale_latents(latents: Tensor) -> Tensor:
    """VAE latent (times ``scaling_factor``) -> Zero123++'s diffusion space."""
    return (latents - LATENT_SHIFT) * LATENT_SCALE


def unscale_latents(z: Tensor) -> Tensor:
    return z / LATENT_SCALE + LATENT_SHIFT


def scale_image(x: Tensor) -> Tensor:
    """Pixels in [-1, 1] -> what the VAE encodes for Zero123++'s views."""
    return x * IMAGE_SCALE


def unscale_image(x: Tensor) -> Tensor:
    return x / IMAGE_SCALE


# ---------------------------------------------------------------------------------------------
# Image preprocessing, read from the folder's CLIPImageProcessor configs


@dataclass(frozen=True)
class Preprocess:
    """What a ``preprocessor_config.json`` asks for, done in torch on [0, 1] images."""

    size: int
    crop: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: bool = True
    center_crop: bool = True
    normalize: bool = True

    @classmethod
    def from_file(cls, path: Path) -> "Preprocess":
        c = json.loads(Path(path).read_text())

        def edge(v: Any, name: str) -> int:
            if isinstance(v, int):
                return v
            if isinstance(v, dict):
                for k in ("shortest_edge", "height"):
                    if k in v:
                        return int(v[k])
            raise ConfigError(f"{path}: cannot read '{name}' = {v!r} (expected an int or shortest_edge / height)")

        size = edge(c.get("size", 224), "size")
        crop_v = c.get("crop_size", size)
        crop = (int(crop_v["height"]), int(crop_v["width"])) if isinstance(crop_v, dict) and "height" in crop_v \
            else (edge(crop_v, "crop_size"),) * 2
        return cls(size=size, crop=crop, mean=tuple(c.get("image_mean", (0.5, 0.5, 0.5))),
                   std=tuple(c.get("image_std", (0.5, 0.5, 0.5))), resize=bool(c.get("do_resize", True)),
                   center_crop=bool(c.get("do_center_crop", True)), normalize=bool(c.get("do_normalize", True)))

    def __call__(self, image: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B 3 h w"]:
        x = image
        if self.resize:
            H, W = x.shape[-2:]
            s = self.size / min(H, W)
            size = (max(1, round(H * s)), max(1, round(W * s)))
            if size != (H, W):
                x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        if self.center_crop:
            H, W = x.shape[-2:]
            ch, cw = self.crop
            if H < ch or W < cw:
                x = F.pad(x, (0, max(0, cw - W), 0, max(0, ch - H)))
                H, W = x.shape[-2:]
            top, left = (H - ch) // 2, (W - cw) // 2
            x = x[..., top:top + ch, left:left + cw]
        if self.normalize:
            mean = x.new_tensor(self.mean).view(1, 3, 1, 1)
            std = x.new_tensor(self.std).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x

    def blank(self, like: Tensor) -> Tensor:
        """The pipeline's "no image": zeros after normalisation."""
        return torch.zeros(like.shape[0], 3, *self.crop, dtype=like.dtype, device=like.device)


def composite_input(rgb: Float[Tensor, "H W 3"], alpha: Optional[Float[Tensor, "H W"]] = None,
                    background: float = INPUT_BACKGROUND) -> Float[Tensor, "1 3 H W"]:
    """The conditioning image as the model saw it: RGB, an RGBA input pasted over mid grey."""
    x = rgb.float()
    if alpha is not None:
        a = alpha.float()[..., None]
        x = x * a + background * (1.0 - a)
    return x.clamp(0, 1).permute(2, 0, 1)[None].contiguous()


# ---------------------------------------------------------------------------------------------
# The model


class Zero123PlusPlus(nn.Module):
    """The frozen networks of Zero123++ and its conditioning (see the module docstring).

    ``text_states`` is the text encoder's output for the empty prompt ``[1, 77, D]``, computed once
    at load (the text encoder is not kept); ``ramp`` the 77 ramping coefficients.
    """

    def __init__(self, unet: nn.Module, vae: nn.Module, vision_encoder: nn.Module, text_states: Tensor,
                 ramp: Sequence[float], alphas_cumprod: Tensor, *, prediction_type: str, vae_pre: Preprocess,
                 clip_pre: Preprocess, scaling_factor: float):
        super().__init__()
        self.unet, self.vae, self.vision_encoder = unet, vae, vision_encoder
        self.state: ReferenceState = install_reference_attention(unet)
        ramp_t = torch.as_tensor(list(ramp), dtype=torch.float32)
        if text_states.dim() != 3 or ramp_t.numel() != text_states.shape[1]:
            raise ConfigError(f"Zero123++: {ramp_t.numel()} ramping coefficients for {text_states.shape[1]} text "
                              "tokens; model_index.json's ramping_coefficients must have one per token")
        embed = int(vision_encoder.config.projection_dim)
        if embed != text_states.shape[2] or int(unet.config.cross_attention_dim) != embed:
            raise ConfigError(f"Zero123++: the CLIP image embedding has {embed} entries, the text states "
                              f"{text_states.shape[2]} and the UNet attends to {unet.config.cross_attention_dim}; "
                              "they must agree")
        self.register_buffer("text_states", text_states.detach().float().clone(), persistent=False)
        self.register_buffer("ramp", ramp_t, persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().float().clone(), persistent=False)
        self.prediction_type = prediction_type
        self.vae_pre, self.clip_pre = vae_pre, clip_pre
        self.scaling_factor = float(scaling_factor)
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(vae.config.latent_channels)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    # -- conditioning ------------------------------------------------------------------------

    @torch.no_grad()
    def encoder_states(self, image: Float[Tensor, "1 3 H W"]) -> tuple[Tensor, Tensor]:
        """(conditional, unconditional) cross-attention states ``[1, 77, D]`` for the input ``image`` in [0, 1]."""
        pix = self.clip_pre(image.to(self.device, torch.float32)).to(self.dtype)
        embed = self.vision_encoder(pixel_values=pix).image_embeds.float()  # [1, D]
        text = self.text_states.to(self.device)
        cond = text + self.ramp.to(self.device)[None, :, None] * embed[:, None, :]
        return cond, text

    @torch.no_grad()
    def reference_latents(self, image: Float[Tensor, "1 3 H W"], generator: Optional[torch.Generator] = None
                          ) -> tuple[Tensor, Tensor]:
        """(conditional, unconditional) reference latents: VAE posterior samples (unscaled, as the original
        pipeline feeds them) of the preprocessed input and of the blank image."""
        pix = self.vae_pre(image.to(self.device, torch.float32))
        both = torch.cat([pix, self.vae_pre.blank(pix)]).to(self.dtype)
        dist = self.vae.encode(both).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator, device=generator.device if generator else None,
                            dtype=torch.float32).to(self.device)
        lat = dist.mean.float() + dist.std.float() * noise
        return lat[:1], lat[1:]

    # -- the network -------------------------------------------------------------------------

    def predict(self, x_t: Tensor, t: Tensor, states: Tensor, reference: Tensor) -> Tensor:
        """The UNet's output at ``x_t`` [B, C, H, W] and integer timesteps ``t`` [B], its self-attention
        extended by the reference pass over ``reference`` [B, C, h, w] (already noised to ``t``)."""
        dt = self.dtype
        st = self.state
        try:
            st.cache.clear()
            st.mode = "write"
            self.unet(reference.to(dt), t, encoder_hidden_states=states.to(dt))
            st.mode = "read"
            out = self.unet(x_t.to(dt), t, encoder_hidden_states=states.to(dt)).sample
        finally:
            st.clear()
        return out.float()

    # -- pixels and latents ------------------------------------------------------------------

    @torch.no_grad()
    def encode_views(self, images: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B C h w"]:
        """Images in [0, 1] (a tiled grid) -> Zero123++'s diffusion space (posterior means)."""
        x = scale_image(images.to(self.device, torch.float32) * 2 - 1).to(self.dtype)
        return scale_latents(self.vae.encode(x).latent_dist.mean.float() * self.scaling_factor)

    @torch.no_grad()
    def decode_latents(self, z: Float[Tensor, "B C h w"]) -> Float[Tensor, "B 3 H W"]:
        """Zero123++'s diffusion space -> images in [0, 1]."""
        lat = unscale_latents(z.float()) / self.scaling_factor
        x = unscale_image(self.vae.decode(lat.to(self.dtype)).sample.float())
        return ((x + 1) / 2).clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# Loading


def folder_files_missing(folder: Path) -> list[str]:
    return [r for r in REQUIRED_FILES if not (folder / r).exists()]


def read_ramp(folder: Path, key: str) -> list[float]:
    """The ramping coefficients: ``model_index.json``'s ``ramping_coefficients`` (where the pipeline's
    ``register_to_config`` puts them); else ``unet/config.json``'s, else a ``ramping_coefficients.json``
    list beside ``model_index.json`` (layouts of re-saved copies)."""
    ramp = json.loads((folder / "model_index.json").read_text()).get("ramping_coefficients")
    if ramp is None:
        ramp = json.loads((folder / "unet" / "config.json").read_text()).get("ramping_coefficients")
    side = folder / "ramping_coefficients.json"
    if ramp is None and side.is_file():
        ramp = json.loads(side.read_text())
    if not isinstance(ramp, list) or not ramp or not all(isinstance(v, (int, float)) for v in ramp):
        raise ConfigError(f"config key '{key}': {folder / 'model_index.json'} has no 'ramping_coefficients' list "
                          "(the 77 weights of the CLIP image embedding per text token); is this a Zero123++ folder "
                          f"(`hf download {DEFAULT_MODEL}`)?")
    return [float(v) for v in ramp]


def alphas_from_scheduler(folder: Path) -> tuple[Tensor, str]:
    """The training noise schedule's alphas_cumprod and the prediction type, from ``scheduler/``."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_pretrained(folder / "scheduler")
    return sched.alphas_cumprod.float().clone(), str(sched.config.get("prediction_type", "epsilon"))


@torch.no_grad()
def empty_prompt_states(folder: Path, dtype: torch.dtype = torch.float32) -> Tensor:
    """The text encoder's last hidden states for the empty prompt, padded to the tokenizer's length."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    enc = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype).eval()
    ids = tok([""], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    mask = None
    if getattr(enc.config, "use_attention_mask", False):
        mask = (ids != tok.pad_token_id).long()
    return enc(ids, attention_mask=mask).last_hidden_state.float()


#: Prefixes a UNet state dict may carry, longest first: a training module holding the reference-
#: attention wrapper (``unet.unet.``), the wrapper itself (``unet.``), a plain UNet (none).
UNET_PREFIXES = ("unet.unet.", "unet.", "")
#: Keys of a wrapper state dict that are not the base UNet, skipped on purpose, with the reason.
SKIPPED_PREFIXES = {"controlnet.": "the depth ControlNet of the original DepthControlUNet wrapper (not used here)"}


def unet_key_map(names: Sequence[str], ours: Sequence[str], source: str) -> dict[str, str]:
    """``{our parameter: file key}`` for a UNet state dict with keys ``names``: the one prefix of
    :data:`UNET_PREFIXES` under which the file holds every parameter of ours. Checked both ways: a
    file key that is neither placed nor skipped, or a parameter of ours left unfilled, is an error."""
    ours_set = set(ours)
    for prefix in UNET_PREFIXES:
        placed = {k[len(prefix):]: k for k in names if k.startswith(prefix) and k[len(prefix):] in ours_set}
        if len(placed) != len(ours_set):
            continue
        rest = [k for k in names if k not in set(placed.values())
                and not any(k.startswith(s) for s in SKIPPED_PREFIXES)]
        if rest:
            raise ConfigError(f"{source}: {len(rest)} key(s) no rule places under the prefix {prefix!r}: "
                              f"{', '.join(sorted(rest)[:8])}{' ...' if len(rest) > 8 else ''}")
        return placed
    best = max(UNET_PREFIXES, key=lambda p: sum(k.startswith(p) and k[len(p):] in ours_set for k in names))
    found = {k[len(best):] for k in names if k.startswith(best)}
    missing = sorted(ours_set - found)
    raise ConfigError(f"{source}: not a UNet of this architecture under any known prefix "
                      f"({', '.join(repr(p) for p in UNET_PREFIXES)}); with {best!r}, {len(missing)} parameter(s) "
                      f"are missing: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")


def read_tensors(path: Path) -> dict[str, Tensor]:
    """A state dict from a safetensors file, or a ``.bin`` / ``.pt`` / ``.ckpt`` loaded with
    ``weights_only=True`` (a Lightning-style ``{"state_dict": ...}`` is unwrapped). Never unpickles code."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle that needs code to load, or not a torch file at all
        raise ConfigError(f"{path}: cannot be read as tensors with torch.load(weights_only=True) "
                          f"({type(exc).__name__}); convert it to safetensors") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ConfigError(f"{path}: not a state dict of tensors")
    return obj


def load_unet_weights(unet: nn.Module, path: Path, key: str = "unet_weights") -> None:
    """Fill ``unet`` from a weights file in any of the layouts of :data:`UNET_PREFIXES`."""
    sd = read_tensors(path)
    ours = unet.state_dict()
    placed = unet_key_map(list(sd), list(ours), f"config key '{key}' = {path}")
    new = {}
    for name, src in placed.items():
        t = sd[src]
        if t.shape != ours[name].shape:
            raise ConfigError(f"config key '{key}' = {path}: {src} has shape {tuple(t.shape)}, the UNet's {name} "
                              f"{tuple(ours[name].shape)}")
        new[name] = t
    unet.load_state_dict(new, strict=True)


def load_folder(folder: str | Path, *, key: str = "pretrained_model_name_or_path",
                dtype: torch.dtype = torch.float32, unet_weights: Optional[str] = None) -> Zero123PlusPlus:
    """A :class:`Zero123PlusPlus` from a folder in the published layout (see the module docstring);
    ``unet_weights`` optionally replaces the UNet's weights (a fine-tuned UNet file). Reads local
    files only."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionModelWithProjection

    folder = Path(folder)
    missing = folder_files_missing(folder)
    if missing:
        raise ConfigError(f"config key '{key}' = {folder}: not a complete Zero123++ folder, it lacks "
                          f"{', '.join(missing)} (expected the layout of `hf download {DEFAULT_MODEL}`)")
    ramp = read_ramp(folder, key)
    alphas, prediction_type = alphas_from_scheduler(folder)
    kw = dict(torch_dtype=dtype, local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", **kw).eval()
    if unet_weights:
        load_unet_weights(unet, Path(unet_weights).expanduser(), "unet_weights")
    vae = AutoencoderKL.from_pretrained(folder / "vae", **kw).eval()
    vision = CLIPVisionModelWithProjection.from_pretrained(folder / "vision_encoder", torch_dtype=dtype).eval()
    text = empty_prompt_states(folder, torch.float32)
    model = Zero123PlusPlus(
        unet, vae, vision, text, ramp, alphas, prediction_type=prediction_type,
        vae_pre=Preprocess.from_file(folder / "feature_extractor_vae" / "preprocessor_config.json"),
        clip_pre=Preprocess.from_file(folder / "feature_extractor_clip" / "preprocessor_config.json"),
        scaling_factor=float(vae.config.scaling_factor))
    model.requires_grad_(False)
    return model


def resolve_model(name_or_path: str, key: str) -> Path:
    """The folder of ``name_or_path`` (a folder, or a hub id in the local cache), or a MissingWeightsError
    naming ``key`` and the download command."""
    from lift3d.utils.hub import resolve_weights

    return resolve_weights(name_or_path, key=key, required=REQUIRED_FILES).path


__all__ = ["Zero123PlusPlus", "Preprocess", "load_folder", "resolve_model", "load_unet_weights", "unet_key_map",
           "read_tensors", "scale_latents", "unscale_latents", "scale_image", "unscale_image", "composite_input",
           "REQUIRED_FILES", "HUB_IDS", "DEFAULT_MODEL"]
