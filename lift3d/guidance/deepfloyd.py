"""DeepFloyd IF stage I as a score-distillation prior: SDS in pixel space (``deepfloyd-guidance``).

IF (DeepFloyd, 2023) is a cascade of pixel-space diffusion models conditioned on T5-XXL text
states; its first stage denoises 64x64 images, which makes it the closest open model to Imagen's
base stage that DreamFusion (Poole et al. 2022) distilled. :class:`DeepFloydPrior` adapts that
UNet to :mod:`lift3d.guidance.score_distillation`, which holds the SDS maths:

* space: the render resized to the UNet's ``sample_size`` (64 for IF-I; a tiny test model's own
  size) and mapped to [-1, 1]; no VAE;
* output: the UNet predicts 6 channels, epsilon and a learned variance (``learned_range``); only
  the first 3 (epsilon) are used, so classifier-free guidance and Perp-Neg act on epsilon alone;
* schedule: ``alphas_cumprod`` and the prediction type come from the folder's
  ``scheduler/scheduler_config.json`` (IF's squared-cosine DDPM schedule);
* text: T5 states from ``deepfloyd-prompt-processor``. The guidance never loads the text encoder,
  only the UNet, when it is built.

IF is gated: its weights download only after its licence is accepted on the model page, which the
missing-weights error names.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lift3d.config import ConfigError, Scheduled
from lift3d.guidance.base import GuidanceInput
from lift3d.guidance.score_distillation import Cond, Conditioning, DiffusionPrior, SDSGuidance
from lift3d.prompts.t5 import DEFAULT_IF_MODEL, has_fp16_variant, if_licence_url
from lift3d.registry import register

#: Files of an IF folder the guidance reads (the UNet's weights are checked when they load).
UNET_FILES = ("unet/config.json", "scheduler/scheduler_config.json")
#: Where the key of a guidance built outside a system points, for messages.
DEFAULT_KEY = "system.guidance"


def _weights_variant(folder: Path, half: bool) -> str | None:
    """``"fp16"`` when the fp16 files should be read: half precision asked and present, or only they are there."""
    has_fp16, has_plain = has_fp16_variant(folder)
    return "fp16" if has_fp16 and (half or not has_plain) else None


class DeepFloydPrior(DiffusionPrior):
    """Adapter around an IF UNet (``UNet2DConditionModel``, 3 channels in, 6 out).

    A branch (:data:`Cond`) is ``text`` [B, L, D], the T5 states, and ``null`` [B, L, D], the empty
    text's states (what :meth:`drop_text` swaps in; ``deepfloyd-prompt-processor`` hands them over
    in ``PromptUtils.extras``). The UNet runs in its own dtype (float16 on CUDA by default) with
    autocast off; its output comes back in the input's dtype.
    """

    def __init__(self, unet: nn.Module, scheduler_config: Any, name: str = "deepfloyd-guidance"):
        super().__init__()
        from diffusers import DDPMScheduler

        self.unet = unet
        self.guidance_name = name
        sched = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = sched.config.prediction_type
        self.num_train_timesteps = int(sched.config.num_train_timesteps)
        self.register_buffer("alphas_cumprod", sched.alphas_cumprod.clone().float(), persistent=False)
        size = unet.config.sample_size
        self.resolution: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.in_channels = int(unet.config.in_channels)
        #: Width of the text states the UNet takes (T5-XXL's 4096 for IF).
        self.text_width = int(unet.config.encoder_hid_dim or unet.config.cross_attention_dim)

    @classmethod
    def load(cls, folder: str | Path, *, dtype: torch.dtype = torch.float32, name: str = "deepfloyd-guidance",
             key: str = f"{DEFAULT_KEY}.pretrained_model_name_or_path") -> "DeepFloydPrior":
        """The UNet and scheduler of the IF folder ``folder`` (diffusers layout), nothing else."""
        from diffusers import DDPMScheduler, UNet2DConditionModel

        from lift3d.utils.hub import MissingWeightsError

        folder = Path(folder)
        try:
            sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
            unet = UNet2DConditionModel.from_pretrained(
                folder, subfolder="unet", torch_dtype=dtype, local_files_only=True,
                variant=_weights_variant(folder / "unet", dtype == torch.float16))
        except (OSError, ValueError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise MissingWeightsError(f"config key '{key}': could not load IF's UNet from {folder} "
                                      f"({type(exc).__name__}: {first}); is the download complete?") from None
        return cls(unet, sched.config, name)

    # -- the adapter ------------------------------------------------------------------------------

    def encode(self, images: Tensor) -> Tensor:
        """[B, H, W, 3] in [0, 1] -> [B, 3, h, w] in [-1, 1] at the UNet's size (antialiased when shrinking)."""
        x = images.permute(0, 3, 1, 2)
        if tuple(x.shape[-2:]) != self.resolution:
            shrink = x.shape[-2] > self.resolution[0] or x.shape[-1] > self.resolution[1]
            x = F.interpolate(x, self.resolution, mode="bilinear", align_corners=False, antialias=shrink)
        return x * 2 - 1

    def decode(self, x: Tensor) -> Tensor:
        return ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)

    def _text(self, emb: Tensor, source: str) -> Tensor:
        if not emb.is_floating_point() or emb.dim() < 3 or emb.shape[-1] != self.text_width:
            raise ValueError(
                f"{self.guidance_name} needs T5 text states [B, L, {self.text_width}] from deepfloyd-prompt-processor, "
                f"but prompt processor {source!r} gave {tuple(emb.shape)} {emb.dtype}; set "
                "system.prompt_processor_type: deepfloyd-prompt-processor, with the same model as the guidance")
        return emb

    def condition(self, inp: GuidanceInput, view_dependent_prompting: bool = True) -> Conditioning:
        prompt = inp.prompt
        if prompt is None or not getattr(prompt, "has_embeddings", False):
            raise ValueError(f"{self.guidance_name} needs T5 text states: use prompt_processor_type "
                             "deepfloyd-prompt-processor (and set prompt=... on the command line)")
        source = getattr(prompt, "source", "") or "?"
        cams = inp.cameras
        dev = cams.elevation.device
        el, az, dist = cams.elevation, cams.azimuth, cams.distance
        null = prompt.extras.get("empty_text_embedding")
        if prompt.use_perp_neg:
            cond, uncond, negs, weights = prompt.get_text_embeddings_perp_neg(el, az, dist, view_dependent_prompting)
            negatives = [negs[:, k] for k in range(negs.shape[1])]
        else:
            cond, uncond = prompt.get_text_embeddings(el, az, dist, view_dependent_prompting=view_dependent_prompting)
            negatives, weights = [], None
        cond = self._text(cond, source).to(dev)
        # Without the processor's empty-text states, the uncond branch stands in for "no text".
        null = (uncond if null is None else null).to(dev, cond.dtype).expand_as(cond)
        branch = lambda e: {"text": self._text(e, source).to(dev), "null": null}  # noqa: E731
        return Conditioning(cond=branch(cond), uncond=branch(uncond), negatives=[branch(n) for n in negatives],
                            neg_weights=None if weights is None else weights.to(dev))

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """Epsilon (the first 3 of the UNet's 6 channels; the learned variance is dropped)."""
        dtype = self.unet.dtype
        dev_type = x_t.device.type
        # The UNet runs in the dtype it was loaded in, whatever autocast the trainer has on.
        ctx = torch.autocast(dev_type, enabled=False) if dev_type in ("cuda", "cpu") else contextlib.nullcontext()
        with ctx:
            out = self.unet(x_t.to(dtype), t, encoder_hidden_states=cond["text"].to(dtype)).sample
        if out.shape[1] == 2 * x_t.shape[1]:
            out = out[:, : x_t.shape[1]]
        return out.to(x_t.dtype)

    def drop_text(self, cond: Cond, mask: Tensor) -> Cond:
        m = mask.view(-1, *([1] * (cond["text"].dim() - 1)))
        return {**cond, "text": torch.where(m, cond["null"], cond["text"])}


@register("deepfloyd-guidance")
class DeepFloydGuidance(SDSGuidance):
    """SDS with DeepFloyd IF stage I in pixel space; returns ``loss_sds``."""

    prior_family = "deepfloyd"
    prior_inputs = frozenset({"prompt_embeddings"})

    @dataclass
    class Config(SDSGuidance.Config):
        pretrained_model_name_or_path: str = DEFAULT_IF_MODEL
        """IF stage-I model: a hub id (read from the local Hugging Face cache only; the model is gated,
        accept its licence on its page before downloading) or a folder in the diffusers layout. Only
        ``unet/`` and ``scheduler/`` are read; the text encoder is the prompt processor's."""
        guidance_scale: Scheduled = 21.0
        """Classifier-free guidance scale ``e_u + s (e_c - e_u)``. 21 is threestudio's 20: it writes
        ``e_c + s (e_c - e_u)`` for plain CFG (its Perp-Neg path uses our form)."""
        half_precision_weights: Optional[bool] = None
        """Load the UNet in float16 (reading the fp16 files when the folder has them); null: on CUDA
        only (float16 on a CPU is slow, and the weights are built before the move to the device)."""
        enable_attention_slicing: bool = False
        """Compute attention in slices: less memory, slower (IF-I-XL at batch 1 does not need it)."""
        enable_channels_last_format: bool = True
        """Keep the UNet's weights channels-last (faster convolutions on tensor cores; free to set)."""

    cfg: Config

    @classmethod
    def resolve(cls, cfg: Any, key: str = DEFAULT_KEY) -> Path:
        """The IF folder ``cfg`` names, or a MissingWeightsError naming the key, the id and the licence page."""
        from lift3d.utils.hub import resolve_weights

        name = cfg.pretrained_model_name_or_path
        return resolve_weights(name, key=f"{key}.pretrained_model_name_or_path", required=UNET_FILES,
                               gated_url=if_licence_url(name)).path

    def weights_dtype(self) -> torch.dtype:
        half = self.cfg.half_precision_weights
        return torch.float16 if (torch.cuda.is_available() if half is None else half) else torch.float32

    def configure(self) -> None:
        if self.cfg.image == "latents":
            raise ConfigError(f"{self._cfg_key}.image: IF denoises pixels and has no latent space; "
                              "use image: rgb (or normal)")
        super().configure()

    def build_prior(self) -> DeepFloydPrior:
        # Resolved before diffusers is imported: missing weights fail at once.
        folder = self.resolve(self.cfg, self._cfg_key)
        prior = DeepFloydPrior.load(folder, dtype=self.weights_dtype(), name=self.name(),
                                    key=f"{self._cfg_key}.pretrained_model_name_or_path")
        if self.cfg.enable_attention_slicing:
            prior.unet.set_attention_slice("auto")
        if self.cfg.enable_channels_last_format:
            prior.unet.to(memory_format=torch.channels_last)
        return prior


__all__ = ["DeepFloydPrior", "DeepFloydGuidance"]
