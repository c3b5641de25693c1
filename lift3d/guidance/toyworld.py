"""The toy-world prior as a score-distillation adapter, and its three guidances.

The embedded toy-world prior (``lift3d.priors.toyworld``) is a pixel-space diffusion model
conditioned on text tokens and on the camera, so the batch's elevation, azimuth and distance play
the role that view-dependent prompting plays for text-only priors. :class:`ToyWorldPrior` adapts it
to :mod:`lift3d.guidance.score_distillation`; the registered guidances are that core's SDS, VSD
and refine, configured with the toy prior's weights:

* ``toyworld-guidance``: SDS (DreamFusion);
* ``toyworld-vsd-guidance``: VSD (ProlificDreamer) with a LoRA copy whose camera MLP also trains;
* ``toyworld-refine-guidance``: DreamGaussian's multi-step denoised texture targets.

Text comes from the ``toyworld-prompt-processor`` as token ids; a row of padding only (the empty
negative prompt, or no prompt at all) means "text dropped": the prior's learned null embedding.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lift3d.config import ConfigError
from lift3d.guidance.base import GuidanceInput
from lift3d.guidance.score_distillation import (Cond, Conditioning, DiffusionPrior, RefineGuidance, SDSGuidance,
                                                VSDGuidance)
from lift3d.registry import register

#: Layers of the toy UNet that get LoRA adapters in VSD by default.
DEFAULT_LORA_TARGETS = ["conv1", "conv2", "conv_shortcut", "time_emb_proj", "to_q", "to_k", "to_v", "to_out.0"]

#: ``autocast`` values of the toy guidances and the dtype each runs the network in (None: float32).
AUTOCAST_DTYPES: dict[Optional[str], Optional[torch.dtype]] = {None: None, "none": None, "bf16": torch.bfloat16}


def autocast_dtype(value: Optional[str], key: str = "autocast") -> Optional[torch.dtype]:
    """The dtype of a guidance's ``autocast`` setting; a clear error for anything else."""
    if value not in AUTOCAST_DTYPES:
        raise ConfigError(f"{key} must be one of 'bf16', 'none' or null (float32), got {value!r}")
    return AUTOCAST_DTYPES[value]


class ToyWorldPrior(DiffusionPrior):
    """Adapter around a ``lift3d.priors.toyworld.model.ToyWorldPrior`` network.

    Its space is pixels in [-1, 1] at the network's resolution; a branch (:data:`Cond`) is
    ``tokens`` [B, L], ``camera`` [B, 4] (the prior's camera vector) and ``drop`` [B] (text dropped).
    With ``autocast`` "bf16" the network runs under bfloat16 autocast and its output comes back in
    the input's dtype (float32): what the prior was trained under, faster on CPUs with AMX or
    AVX512-BF16, and an SDS gradient about 2% (relative L2) away from float32's.
    """

    def __init__(self, model: nn.Module, name: str = "toyworld", autocast: Optional[str] = None):
        super().__init__()
        from lift3d.priors.toyworld.model import make_scheduler

        self.model = model
        self.guidance_name = name
        self.autocast = autocast
        self.autocast_dtype = autocast_dtype(autocast, f"{name}.autocast")
        self.prediction_type = model.cfg.prediction_type
        self.num_train_timesteps = model.cfg.num_train_timesteps
        self.p_uncond = model.cfg.p_uncond
        self.resolution = model.cfg.resolution
        sched = make_scheduler(model.cfg, "ddpm")
        self.register_buffer("alphas_cumprod", sched.alphas_cumprod.clone().float(), persistent=False)

    @classmethod
    def load(cls, path: str | None, name: str = "toyworld", autocast: Optional[str] = None) -> "ToyWorldPrior":
        """From a toy-world safetensors file (None: the weights shipped in lift3d)."""
        from lift3d.priors.toyworld.model import ToyWorldPrior as Network

        autocast_dtype(autocast, f"{name}.autocast")  # a bad value fails before the weights load
        return cls(Network.load(path), name, autocast)

    def encode(self, images: Tensor) -> Tensor:
        """[B, H, W, 3] in [0, 1] -> [B, 3, res, res] in [-1, 1] at the prior's resolution."""
        res = self.resolution
        x = images.permute(0, 3, 1, 2)
        if x.shape[-2:] != (res, res):
            x = F.interpolate(x, (res, res), mode="bilinear", align_corners=False, antialias=True)
        return x * 2 - 1

    def decode(self, x: Tensor) -> Tensor:
        return ((x + 1) / 2).permute(0, 2, 3, 1)

    def condition(self, inp: GuidanceInput, view_dependent_prompting: bool = True) -> Conditioning:
        from lift3d.priors.toyworld.data import camera_vector

        if inp.prompt is None or getattr(inp.prompt, "text_embeddings", None) is None:
            raise ValueError(f"{self.guidance_name} needs the prompt's token ids: use prompt_processor_type "
                             "toyworld-prompt-processor (and set prompt=... on the command line)")
        cams = inp.cameras
        dev = cams.elevation.device
        cond, uncond = inp.prompt.get_text_embeddings(cams.elevation, cams.azimuth, cams.distance,
                                                      view_dependent_prompting=view_dependent_prompting)
        cond, uncond = cond.to(dev), uncond.to(dev)
        cam = camera_vector(cams.elevation.float(), cams.azimuth.float(), cams.distance.float()).to(dev)
        return Conditioning(cond={"tokens": cond, "camera": cam, "drop": (cond == 0).all(-1)},
                            uncond={"tokens": uncond, "camera": cam, "drop": (uncond == 0).all(-1)})

    def network_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of every network call besides the branch's tensors (none here)."""
        return {}

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        args = (x_t, t, cond["tokens"], cond["camera"], cond["drop"])
        if self.autocast_dtype is None:
            return self.model(*args, **self.network_kwargs())
        with torch.autocast(x_t.device.type, dtype=self.autocast_dtype):
            out = self.model(*args, **self.network_kwargs())
        return out.to(x_t.dtype)

    def drop_text(self, cond: Cond, mask: Tensor) -> Cond:
        return {**cond, "drop": cond["drop"] | mask}

    def lora_copy(self, rank: int, alpha: float, targets: list[str]) -> "ToyWorldPrior":
        """A copy with peft LoRA adapters on ``targets`` of the UNet and its camera MLP trainable."""
        from peft import LoraConfig, inject_adapter_in_model

        targets = targets or list(DEFAULT_LORA_TARGETS)
        phi = copy.deepcopy(self.model)
        phi.requires_grad_(False)
        layers = [n for n, m in phi.unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        for target in targets:
            if not any(n == target or n.endswith("." + target) for n in layers):
                raise ConfigError(f"{self.guidance_name}: lora_targets entry {target!r} names no Linear/Conv2d layer "
                                  f"of the UNet; layer names: {', '.join(sorted({n.rsplit('.', 1)[-1] for n in layers}))}")
        lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                          init_lora_weights=True)
        inject_adapter_in_model(lora, phi.unet)
        phi.camera_mlp.requires_grad_(True)
        # Eval mode, as the prior: the network has no dropout to switch on, yet in train mode its
        # outputs differed in the last bits (VSD runs then drifted from eval-mode ones by 1e-6 a step).
        return ToyWorldPrior(phi, self.guidance_name, self.autocast).eval()


def warn_if_bf16_emulated(prior: ToyWorldPrior, name: str) -> None:
    """A RuntimeWarning when ``prior`` runs under bfloat16 autocast on a CPU that only emulates bfloat16."""
    if prior.autocast_dtype is torch.bfloat16 and not torch.cuda.is_available():
        from lift3d.priors.toyworld.train import cpu_has_native_bf16

        if cpu_has_native_bf16() is False:
            warnings.warn(f"{name}: autocast bf16 on a CPU without bf16 instructions (AMX, "
                          "AVX512-BF16): torch emulates bfloat16 there, slower than float32 (autocast: null)",
                          RuntimeWarning, stacklevel=3)


@dataclass
class _ToyWeights:
    pretrained: Optional[str] = None
    """Path of a toy-world safetensors file; null: the weights shipped in lift3d."""
    autocast: Optional[str] = None
    """"bf16": run the prior's network under bfloat16 autocast (as it was trained; its output and
    everything after it stay float32). Faster on CPUs with AMX or AVX512-BF16 (1.07x a dreamfusion
    step, 1.16x a dreamgaussian one: bench/README.md), slower on CPUs without (torch emulates bf16
    there); changes the results slightly. null or "none": float32."""


class _ToyWorldPrior:
    """What the three toy-world guidances share: the prior they build and the token ids they need."""

    prior_family = "toyworld"
    prior_inputs = frozenset({"prompt_embeddings"})

    @classmethod
    def missing_weights(cls, cfg: Any) -> str | None:
        from lift3d.priors.toyworld.model import DEFAULT_WEIGHTS

        path = Path(cfg.pretrained) if cfg.pretrained else DEFAULT_WEIGHTS
        return None if path.is_file() else f"no toy-world weights at {path}"

    def build_prior(self) -> ToyWorldPrior:
        prior = ToyWorldPrior.load(self.cfg.pretrained, self.name(), self.cfg.autocast)
        warn_if_bf16_emulated(prior, self.name())
        return prior


@register("toyworld-guidance")
class ToyWorldGuidance(_ToyWorldPrior, SDSGuidance):
    """SDS with the toy-world prior; returns ``loss_sds``."""

    @dataclass
    class Config(SDSGuidance.Config, _ToyWeights):
        pass


@register("toyworld-vsd-guidance")
class ToyWorldVSDGuidance(_ToyWorldPrior, VSDGuidance):
    """VSD with the toy-world prior and a camera-conditioned LoRA copy; returns ``loss_vsd``."""

    @dataclass
    class Config(VSDGuidance.Config, _ToyWeights):
        lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
        """Names (suffixes) of the UNet's Linear/Conv2d layers that get adapters."""


@register("toyworld-refine-guidance")
class ToyWorldRefineGuidance(_ToyWorldPrior, RefineGuidance):
    """MSE to the toy prior's multi-step denoised render; returns ``loss_refine``."""

    @dataclass
    class Config(RefineGuidance.Config, _ToyWeights):
        pass


__all__ = ["AUTOCAST_DTYPES", "autocast_dtype", "warn_if_bf16_emulated", "ToyWorldPrior", "ToyWorldGuidance",
           "ToyWorldVSDGuidance", "ToyWorldRefineGuidance"]
