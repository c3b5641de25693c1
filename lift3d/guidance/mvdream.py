"""MVDream as a score-distillation prior: ``mvdream-guidance``.

MVDream (Shi et al. 2023) scores a group of views of one object at once (4 for the published
model, at azimuths a quarter turn apart, sharing elevation, distance and field of view: what
``random-camera-datamodule`` yields with ``n_views: 4``). :class:`MVDreamPrior` adapts the network
of :mod:`~lift3d.priors.mvdream.network` and the VAE to :mod:`lift3d.guidance.score_distillation`:

* renders are resized (bilinearly) to ``image_size`` (256 for the published model), mapped to
  [-1, 1] and VAE-encoded; the latent is the posterior *mean* times the VAE's scale, so a step is
  deterministic given ``t`` and the noise (MVDream's threestudio guidance draws a posterior sample);
* a branch of conditioning is the text (``mvdream-prompt-processor``'s hidden states) and the
  camera (:func:`~lift3d.priors.mvdream.cameras.mvdream_camera`); the camera is the same in the
  conditional and unconditional branches, only the text differs;
* the network predicts epsilon; consecutive rows are the views of one group, which its
  self-attention sees together.

The guidance (:class:`MVDreamGuidance`) draws one timestep per view group, combines the branches
with classifier-free guidance ``e_u + s (e_c - e_u)`` (the same convention as MVDream's threestudio
guidance, so its scale carries over unchanged) and, by default, uses MVDream's x0-reconstruction
loss (paper Sec. 3.2 and appendix): the one-step clean estimate ``x0 = (x_t - sqrt(1 - a) e_cfg) / sqrt(a)``
is the target and the gradient on the latent is ``x - x0``. Written as SDS that is a weighting
``w(t) = sqrt((1 - a) / a)`` on ``e_cfg - eps``. Large guidance scales inflate ``x0``'s spread; CFG
rescale pulls it back: per view group, ``x0`` is scaled by ``std(x0_cond) / std(x0_cfg)`` (the
standard deviation over all views, channels and pixels of the group; ``x0_cond`` from the prompt's
prediction alone) and blended with the unscaled ``x0`` as ``r * scaled + (1 - r) * x0``
(``recon_std_rescale`` = r). With ``recon_loss: false`` the plain SDS of the core is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn as nn
from torch import Tensor

from lift3d.config import ConfigError, Scheduled
from lift3d.guidance.base import GuidanceInput, GuidanceOutput, check_view_groups
from lift3d.guidance.latent_diffusion import LatentDiffusionPrior, LatentDiffusionWeights, weights_dtype
from lift3d.priors.mvdream.cameras import mvdream_camera
from lift3d.priors.mvdream.checkpoint import (
    DEFAULT_MVDREAM_FILE,
    DEFAULT_MVDREAM_MODEL,
    SCALING_FACTOR,
    load_mvdream,
    resolve_checkpoint,
)
from lift3d.guidance.score_distillation import Cond, Conditioning, SDSGuidance, guided_eps
from lift3d.registry import register

DEFAULT_KEY = "system.guidance"


class MVDreamPrior(LatentDiffusionPrior):
    """Adapter around MVDream's multi-view UNet and its VAE.

    Its space is the VAE latent ``[B, 4, h, w]`` at the UNet's sample size; a branch (:data:`Cond`)
    holds ``text`` ``[B, L, D]``, ``camera`` ``[B, 16]`` and, when the prompt processor supplies it,
    ``null`` ``[B, L, D]`` (the empty text, what :meth:`drop_text` swaps in). Rows come in groups of
    ``n_views`` consecutive views. Encoding, decoding, the dtype and the reading of the prompt are
    :class:`~lift3d.guidance.latent_diffusion.LatentDiffusionPrior`'s; renders are resized without
    antialiasing.
    """

    antialias = False
    prompt_processor = "mvdream-prompt-processor"
    same_weights_hint = "with the same checkpoint as the guidance (mvdream_model=... sets both)"

    def __init__(self, unet: nn.Module, vae: nn.Module, alphas_cumprod: Tensor, image_size: int, n_views: int,
                 scaling_factor: float = SCALING_FACTOR, name: str = "mvdream-guidance"):
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.guidance_name = name
        self.prediction_type = "epsilon"
        self.num_train_timesteps = int(alphas_cumprod.shape[0])
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().float().clone(), persistent=False)
        self.n_views = int(n_views)
        self.scaling_factor = float(scaling_factor)
        size = int(unet.config.sample_size)
        self.latent_size = (size, size)
        self.resolution = (int(image_size), int(image_size))
        self.text_dim = int(unet.config.cross_attention_dim)

    def condition(self, inp: GuidanceInput, view_dependent_prompting: bool = False) -> Conditioning:
        cond, uncond, negatives, weights, null = self.text_embeddings(inp, view_dependent_prompting)
        shared: Cond = {"camera": mvdream_camera(inp.cameras.c2w.to(cond.device, torch.float32))}
        if null is not None:
            shared["null"] = null
        return self.text_branches(cond, uncond, negatives, weights, shared)

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        dt = self.dtype
        out = self.unet(x_t.to(dt), t, cond["text"].to(dt), cond["camera"].to(dt), self.n_views)
        return out.to(x_t.dtype)


def rescale_x0(x0_cfg: Tensor, x0_cond: Tensor, n_views: int, r: float) -> Tensor:
    """CFG rescale of the clean estimate, per group of ``n_views`` rows (see the module docstring)."""
    B = x0_cfg.shape[0]
    groups = B // n_views
    std_cond = x0_cond.reshape(groups, -1).std(dim=1)
    std_cfg = x0_cfg.reshape(groups, -1).std(dim=1)
    factor = ((std_cond + 1e-8) / (std_cfg + 1e-8)).repeat_interleave(n_views).view(B, *([1] * (x0_cfg.dim() - 1)))
    return r * (x0_cfg * factor) + (1 - r) * x0_cfg


@register("mvdream-guidance")
class MVDreamGuidance(LatentDiffusionWeights, SDSGuidance):
    """Score distillation with MVDream over groups of views; ``loss_sds`` (the x0-reconstruction
    loss by default, plain SDS with ``recon_loss: false``)."""

    prior_family = "mvdream"
    prior_inputs = frozenset({"prompt_embeddings"})

    @dataclass
    class Config(SDSGuidance.Config):
        pretrained_model_name_or_path: str = DEFAULT_MVDREAM_MODEL
        """MVDream's checkpoint in the original single-file layout: a ``.pt`` / ``.safetensors`` file, a
        folder holding ``filename``, or a Hugging Face id found in the local cache (never downloaded:
        ``hf download MVDream/MVDream sd-v2.1-base-4view.pt`` once). Recipes set it to ``${mvdream_model}``.
        The SD 1.5 model (``sd-v1.5-4view.pt``) loads the same way: which of the two a file is, is
        read off its keys and shapes."""
        filename: str = DEFAULT_MVDREAM_FILE
        """The file to read from a folder or a Hugging Face id (``sd-v1.5-4view.pt`` for the SD 1.5
        model; ignored when ``pretrained_model_name_or_path`` is the file itself)."""
        revision: Optional[str] = None
        """A Hugging Face revision to look up in the cache."""
        guidance_scale: Scheduled = 50.0
        """Classifier-free guidance scale ``s`` of ``e_u + s (e_c - e_u)`` (MVDream's threestudio guidance
        writes the same, so its 50 is ours)."""
        view_dependent_prompting: bool = False
        """MVDream knows the view from the camera; view-dependent prompt wording is off, as in MVDream."""
        timestep_sharing: Literal["view", "group", "batch"] = "group"
        """One t per view group (MVDream's training noised a group's views at one t)."""
        n_views: int = 4
        """Views per group; the published model was trained on 4. The batch must be whole groups, and
        the data module's n_views the same."""
        image_size: int = 256
        """Working resolution in pixels (renders are resized to it): 256 for the published model. The
        UNet's latent size is this over the VAE's downscale factor."""
        recon_loss: bool = True
        """MVDream's x0-reconstruction loss (gradient ``x - x0_hat``); false: SDS ``w(t)(e_cfg - eps)``."""
        recon_std_rescale: Scheduled = 0.5
        """CFG rescale ``r`` of the x0 target (0: none); only with recon_loss."""
        return_denoised: bool = False
        """Decode the clean estimate into the diagnostics as ``denoised`` (a VAE decode per step)."""
        half_precision_weights: bool = True
        """Keep the UNet and VAE in float16 while the guidance is on CUDA (float32 elsewhere)."""
        torch_dtype: Optional[Literal["float16", "bfloat16", "float32"]] = None
        """A fixed dtype for the UNet and VAE on every device; null: as half_precision_weights says."""

    cfg: Config

    @classmethod
    def resolve(cls, cfg: Any, key: str = DEFAULT_KEY) -> Path:
        """The checkpoint file of ``cfg``, or :class:`~lift3d.utils.hub.MissingWeightsError`."""
        return resolve_checkpoint(cfg.pretrained_model_name_or_path, cfg.filename,
                                  key=f"{key}.pretrained_model_name_or_path", revision=cfg.revision)

    def configure(self) -> None:
        c, key = self.cfg, self._cfg_key
        if c.n_views < 1:
            raise ConfigError(f"{key}.n_views must be >= 1 (the published model: 4), got {c.n_views}")
        if c.image == "latents":
            raise ConfigError(f"{key}.image: MVDream scores VAE-encoded renders; use image: rgb (or normal)")
        if c.image_size < 8:
            raise ConfigError(f"{key}.image_size must be a positive multiple of the VAE's factor, got {c.image_size}")
        super().configure()

    def build_prior(self) -> MVDreamPrior:
        from lift3d.utils.hub import MissingWeightsError

        c, key = self.cfg, self._cfg_key
        path = self.resolve(c, key)
        dtype = weights_dtype(c.torch_dtype, c.half_precision_weights, on_cuda=False)
        try:
            weights = load_mvdream(path, parts=("unet", "vae"), image_size=c.image_size, dtype=dtype)
        except (OSError, EOFError, RuntimeError) as exc:
            raise MissingWeightsError(f"config key '{key}.pretrained_model_name_or_path' = "
                                      f"{c.pretrained_model_name_or_path!r}: {path} does not load (interrupted "
                                      f"download?): {exc}") from exc
        return MVDreamPrior(weights.unet, weights.vae, weights.alphas_cumprod, c.image_size, c.n_views,
                            name=self.name())

    def check_views(self, inp: GuidanceInput) -> None:
        """The batch must be whole view groups of ``n_views``, sampled as groups by the data module."""
        check_view_groups(self.name(), self._cfg_key, self.cfg.n_views, inp)

    def forward(self, inp: GuidanceInput, t: Tensor | None = None, noise: Tensor | None = None) -> GuidanceOutput:
        c = self.cfg
        self.check_views(inp)
        x, t, noise, a, x_t, conds = self.noised(inp, t, noise)
        with torch.no_grad():
            eps = self.branch_eps(x_t, t, conds)
            e_cfg = guided_eps(eps[0], eps[1], self.C(c.guidance_scale), list(eps[2:]), conds.neg_weights)
            x0 = (x_t - (1 - a).sqrt() * e_cfg) / a.sqrt()
            if c.recon_loss:
                r = float(self.C(c.recon_std_rescale))
                if r > 0:
                    x0_cond = (x_t - (1 - a).sqrt() * eps[0]) / a.sqrt()
                    x0 = rescale_x0(x0, x0_cond, c.n_views, r)
                grad = self.process_grad(x.detach() - x0)
            else:
                grad = self.process_grad(self.weight(t).view_as(a) * (e_cfg - noise))
        diagnostics = self.step_diagnostics(grad, t)
        if c.return_denoised:
            with torch.no_grad():
                diagnostics["denoised"] = self.prior.decode(x0)
        return GuidanceOutput(losses={"loss_sds": self.distillation_target(x, grad)}, diagnostics=diagnostics)


__all__ = ["MVDreamPrior", "MVDreamGuidance", "rescale_x0", "DEFAULT_MVDREAM_MODEL", "DEFAULT_MVDREAM_FILE"]
