"""What the latent-diffusion adapters share: Stable Diffusion, MVDream and Zero123.

All three score renders in the latent space of a KL autoencoder (Rombach et al. 2022): a render
is resized to the working resolution, mapped to [-1, 1] and encoded, the latent being the
posterior *mean* times the VAE's ``scaling_factor`` (deterministic given ``t`` and the noise;
threestudio draws a posterior sample). Their frozen networks may run in float16 while everything
around them is float32: inputs are cast to the weights' dtype on the way in, outputs back to the
caller's on the way out. By default the weights are float16 on CUDA and float32 elsewhere, and
follow the guidance when it moves between devices (:func:`follow_device_dtype`).

The two text-conditioned ones (Stable Diffusion, MVDream) also read their prompt the same way:
hidden states from their prompt processor, Perp-Neg's negatives when the prompt asks for them, and
the empty text's states as "no text" (:meth:`LatentDiffusionPrior.text_embeddings`,
:meth:`LatentDiffusionPrior.drop_text`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from lift3d.guidance.base import GuidanceInput
from lift3d.guidance.score_distillation import Cond, Conditioning, DiffusionPrior

#: ``torch_dtype`` names and their dtypes.
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def weights_dtype(torch_dtype: Optional[str], half_precision_weights: bool, on_cuda: bool) -> torch.dtype:
    """The dtype of the frozen weights: ``torch_dtype`` when set, else float16 on CUDA (when
    ``half_precision_weights``) and float32 elsewhere (half precision on a CPU is slow or unsupported)."""
    if torch_dtype is not None:
        return DTYPES[torch_dtype]
    return torch.float16 if (half_precision_weights and on_cuda) else torch.float32


def follow_device_dtype(cfg: Any, prior: "LatentDiffusionPrior") -> None:
    """Cast ``prior``'s networks to float16 on CUDA and float32 elsewhere, after a move; nothing when
    ``cfg`` fixes the dtype (``torch_dtype``) or turns half precision off, or when the networks were
    set to yet another dtype on purpose (float64 in tests)."""
    if cfg.torch_dtype is not None or not cfg.half_precision_weights:
        return
    want = weights_dtype(None, True, on_cuda=prior.alphas_cumprod.device.type == "cuda")
    if prior.dtype in (torch.float16, torch.float32) and prior.dtype != want:
        prior.set_dtype(want)


class LatentDiffusionPrior(DiffusionPrior):
    """A :class:`~lift3d.guidance.score_distillation.DiffusionPrior` whose space is a VAE's scaled latent.

    Subclasses set ``unet``, ``vae``, ``guidance_name``, ``resolution`` (h, w, the working resolution
    in pixels) and ``scaling_factor``; a text-conditioned one also sets ``text_dim`` (the width of
    the hidden states its UNet attends to) and names its prompt processor in :attr:`prompt_processor`
    and :attr:`same_weights_hint`.
    """

    unet: nn.Module
    vae: nn.Module
    guidance_name: str
    resolution: tuple[int, int]
    scaling_factor: float
    text_dim: int
    #: Antialias when a render is shrunk to the working resolution.
    antialias: bool = True
    #: The registered prompt processor whose hidden states the UNet reads (for messages).
    prompt_processor: str = "stable-diffusion-prompt-processor"
    #: How to make that processor read the guidance's own weights (for messages).
    same_weights_hint: str = "with the same model as the guidance (sd_model=... sets both)"

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the UNet and VAE compute in."""
        return next(self.unet.parameters()).dtype

    def set_dtype(self, dtype: torch.dtype) -> None:
        """Cast the UNet and the VAE (not the schedule) to ``dtype``."""
        self.unet.to(dtype)
        self.vae.to(dtype)

    # -- images ----------------------------------------------------------------------------------

    def resize(self, images: Float[Tensor, "B H W 3"]) -> Float[Tensor, "B 3 h w"]:
        """Images ``[B, H, W, 3]`` -> channels first at the working resolution (differentiable)."""
        x = images.permute(0, 3, 1, 2)
        if tuple(x.shape[-2:]) != self.resolution:
            # antialias only acts when shrinking (a render larger than the working resolution)
            x = F.interpolate(x, self.resolution, mode="bilinear", align_corners=False, antialias=self.antialias)
        return x

    def encode(self, images: Float[Tensor, "B H W 3"]) -> Float[Tensor, "B C h w"]:
        """Renders in [0, 1] -> scaled VAE latents (the posterior mean), in the renders' dtype."""
        x = self.resize(images) * 2 - 1
        posterior = self.vae.encode(x.to(self.dtype)).latent_dist
        return (posterior.mean * self.scaling_factor).to(images.dtype)

    def decode(self, x: Float[Tensor, "B C h w"]) -> Float[Tensor, "B H W 3"]:
        """Scaled latents -> images in [0, 1] at the working resolution, in the latents' dtype."""
        img = self.vae.decode((x / self.scaling_factor).to(self.dtype)).sample
        return (img.to(x.dtype) * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)

    # -- text ------------------------------------------------------------------------------------

    def text_embeddings(self, inp: GuidanceInput, view_dependent_prompting: bool) -> tuple:
        """(cond, uncond, negatives, neg_weights, null) of the batch's prompt: the hidden states
        ``[B, L, D]`` of the prompt and of its negative (or the empty text), Perp-Neg's negatives (a
        list, empty without it) and their weights ``[B, K]`` (None), and the empty text's states
        expanded to ``[B, L, D]`` when the processor supplies them (else None)."""
        prompt = inp.prompt
        if prompt is None:
            raise ValueError(f"{self.guidance_name} needs text embeddings: set prompt_processor_type: "
                             f"{self.prompt_processor} (and prompt=... on the command line)")
        cams = inp.cameras
        args = (cams.elevation, cams.azimuth, cams.distance, view_dependent_prompting)
        negatives, weights = [], None
        if prompt.use_perp_neg:
            cond, uncond, neg, weights = prompt.get_text_embeddings_perp_neg(*args)
            negatives = [neg[:, k] for k in range(neg.shape[1])]
        else:
            cond, uncond = prompt.get_text_embeddings(*args)
        if not cond.is_floating_point() or cond.dim() != 3 or cond.shape[-1] != self.text_dim:
            raise ValueError(
                f"{self.guidance_name}: the UNet attends to text hidden states [B, L, {self.text_dim}], but the prompt "
                f"processor '{getattr(prompt, 'source', '?')}' gave {cond.dtype} {tuple(cond.shape)}; use "
                f"{self.prompt_processor} {self.same_weights_hint}")
        null = getattr(prompt, "extras", {}).get("null_text_embeddings")
        if null is not None:
            null = null.to(cond.device).expand(cond.shape[0], *null.shape[1:])
        return cond, uncond, negatives, weights, null

    @staticmethod
    def text_branches(cond: Tensor, uncond: Tensor, negatives: list[Tensor], weights: Optional[Tensor],
                      shared: Cond) -> Conditioning:
        """The :class:`~lift3d.guidance.score_distillation.Conditioning` whose branches are the texts
        of :meth:`text_embeddings` (as ``text``), each with the tensors of ``shared`` besides."""

        def branch(text: Tensor) -> Cond:
            return {"text": text, **shared}

        return Conditioning(cond=branch(cond), uncond=branch(uncond), negatives=[branch(n) for n in negatives],
                            neg_weights=weights)

    def drop_text(self, cond: Cond, mask: Tensor) -> Cond:
        """The branch with the text of rows ``mask`` replaced by the empty text's states (``null``)."""
        if "null" not in cond:
            raise ValueError(f"{self.guidance_name}: dropping the text needs the empty prompt's embedding, which "
                             f"only {self.prompt_processor} supplies")
        keep = ~mask.view(-1, *([1] * (cond["text"].dim() - 1)))
        return {**cond, "text": torch.where(keep, cond["text"], cond["null"])}


class LatentDiffusionWeights:
    """Mixed into a guidance (before its score-distillation base) whose prior is a
    :class:`LatentDiffusionPrior` and whose config has ``torch_dtype`` and ``half_precision_weights``:
    the working resolution, and the weights' dtype following the device after every move."""

    @property
    def resolution(self) -> tuple[int, int]:
        """The working resolution (h, w) in pixels, from the networks' configs."""
        return self.prior.resolution

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        out = super()._apply(fn, *args, **kwargs)
        prior = self.__dict__.get("prior")
        if prior is not None:
            follow_device_dtype(self.cfg, prior)
        return out


__all__ = ["DTYPES", "LatentDiffusionPrior", "LatentDiffusionWeights", "weights_dtype", "follow_device_dtype"]
