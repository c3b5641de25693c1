"""Variational score distillation on Stable Diffusion: ProlificDreamer (Wang et al. 2023).

VSD treats the 3D scene as a distribution and moves each render by the difference of two scores,
``w(t) (eps_pre - eps_phi)``: ``eps_pre`` from the frozen Stable Diffusion under classifier-free
guidance, ``eps_phi`` from a LoRA model fitted, as training goes, to the renders themselves. The
maths (the gradient, the LoRA's training loss, its own AdamW, what is checkpointed) is the core's
:class:`~lift3d.guidance.score_distillation.VSDGuidance`; this module supplies the Stable Diffusion
adapter and ProlificDreamer's choices:

* **One copy of the UNet.** The LoRA model (:class:`~lift3d.guidance.stable_diffusion.StableDiffusionLoRAPrior`)
  is a twin of the prior's UNet that shares every frozen tensor with it and adds peft LoRA adapters
  on the attention projections. The pretrained pass runs the prior's own modules, which hold no
  adapter: nothing is disabled and re-enabled around it, so it cannot see the LoRA by mistake. The
  price of one copy: the LoRA model is the prior's model. threestudio pairs SD 2.1-base (epsilon)
  with a separate SD 2.1 (768, v-prediction) LoRA model, a second UNet in memory; here the LoRA model
  predicts in the prior's parameterisation (epsilon for 2.1-base and 1.x, v for 2.0 / 2.1 at 768),
  is trained on that target (noise, or ``v = sqrt(a) eps - sqrt(1 - a) x0``) and converted to epsilon
  like the prior before the two are subtracted.
* **Camera conditioning.** The LoRA model reads the flattened camera-to-world matrix through the
  UNet's class embedding (an MLP 16 -> time-embedding width, added to the time embedding; its last
  layer starts at zero so the fresh LoRA model *is* the prior). It trains with the camera zeroed for
  10% of the renders (the prior's ``p_uncond``), so ``lora_guidance_scale`` can guide it by camera.
* **Text.** The pretrained pass reads the view-dependent prompt ("..., side view") and the negative
  prompt; the LoRA model the plain prompt for every view, as ProlificDreamer does.

Guidance scales follow diffusers' ``e_u + s (e_c - e_u)``, as threestudio's VSD does: its
``guidance_scale: 7.5`` is ours 7.5 (unlike its SDS guidance, whose numbers are ours minus one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from lift3d.config import ConfigError, Scheduled
from lift3d.guidance.base import GuidanceInput
from lift3d.guidance.score_distillation import VSDGuidance
from lift3d.guidance.stable_diffusion import (DEFAULT_LORA_TARGETS, StableDiffusionLoRAPrior, StableDiffusionWeights,
                                              _StableDiffusionPrior)
from lift3d.registry import register


@register("stable-diffusion-vsd-guidance")
class StableDiffusionVSDGuidance(_StableDiffusionPrior, VSDGuidance):
    """VSD with Stable Diffusion and a camera-conditioned LoRA model sharing its UNet; returns
    ``loss_vsd`` (diagnostics: ``lora_loss``, ``grad_norm``, ``t``, ``denoised``)."""

    @dataclass
    class Config(VSDGuidance.Config, StableDiffusionWeights):
        return_denoised: bool = False
        """Decode the one-step clean estimate for diagnostics (a VAE decode per step at 512 px: off)."""
        guidance_scale: Scheduled = 7.5
        """CFG scale ``s`` of the pretrained pass: ``e_u + s (e_c - e_u)``, ``e_c`` on the
        view-dependent prompt, ``e_u`` on the negative prompt. ProlificDreamer uses 7.5 (the same
        number in threestudio's VSD guidance, which writes CFG this way too)."""
        lora_guidance_scale: Scheduled = 1.0
        """CFG scale of the LoRA model between its camera-conditioned and its zero-camera
        predictions, on the same plain prompt (1: the camera-conditioned one only, ProlificDreamer's)."""
        lora_rank: int = 4
        """Rank of each LoRA adapter (4, diffusers' LoRAAttnProcessor default that ProlificDreamer used)."""
        lora_alpha: float = 4.0
        """LoRA scaling numerator: adapters are scaled by lora_alpha / lora_rank (1 by default)."""
        lora_lr: float = 1.0e-4
        """Learning rate of the AdamW that trains the LoRA adapters and the camera embedding."""
        lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
        """Names (suffixes) of the UNet's Linear layers that get adapters: by default the q, k, v and
        output projections of every attention layer."""

    cfg: Config
    phi: StableDiffusionLoRAPrior

    def configure(self) -> None:
        if self.cfg.enable_sequential_cpu_offload:
            raise ConfigError(f"{self.name()}: enable_sequential_cpu_offload is not supported with VSD (the LoRA "
                              "model trains on the UNet's weights); set it to false")
        super().configure()

    def scored_image(self, inp: GuidanceInput) -> Tensor:
        x = super().scored_image(inp)
        return self.prior.encode_latents(x) if self.cfg.image == "latents" else x

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "StableDiffusionVSDGuidance":
        out = super()._apply(fn, *args, **kwargs)
        phi, prior = self.__dict__["_modules"].get("phi"), self.__dict__.get("prior")
        if phi is not None and prior is not None:
            phi.tie_to(prior.unet)
        return out


__all__ = ["StableDiffusionVSDGuidance"]
