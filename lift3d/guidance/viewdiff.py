"""ViewDiff as a score-distillation prior: ``viewdiff-guidance``.

ViewDiff (Höllein et al., CVPR 2024) turns a text-to-image Stable Diffusion into a model of groups
of posed views of one object: cross-frame attention with a pose-conditioned LoRA and projection
layers that share a 3D feature volume between the views (:mod:`lift3d.priors.viewdiff`). No
checkpoint is published; ``python -m lift3d.priors.viewdiff train ...`` makes one, and this guidance
distils it, like MVDream's, over groups of ``n_views`` renders of the object:

* renders are resized to the base model's working resolution (512 for SD 2.1-base), mapped to
  [-1, 1] and VAE-encoded (the posterior mean, so a step is deterministic given ``t`` and the noise);
* a branch of conditioning is the text (the ``stable-diffusion-prompt-processor``'s CLIP states of
  the same base model) and, the same in every branch, each view's camera (``c2w``, and normalised
  intrinsics from the field of view and the render's aspect) and intensity (by default the render's
  own mean brightness, detached; or a fixed ``intensity``);
* the network predicts in the base scheduler's parameterisation; the core converts to epsilon and
  the SDS of :mod:`lift3d.guidance.score_distillation` runs unchanged: one timestep per view group,
  the gradient ``w(t) (e_cfg - eps)`` with ``e_cfg = e_u + s (e_c - e_u)``.

The batch must be whole groups (``data.n_views`` = ``n_views``, batch size a multiple), checked
each step with a message that says which keys to set.
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
from lift3d.guidance.score_distillation import Cond, Conditioning, SDSGuidance
from lift3d.registry import register

DEFAULT_KEY = "system.guidance"
#: Where ``python -m lift3d.priors.viewdiff train`` puts the weights with its default out_dir.
DEFAULT_WEIGHTS = "outputs/viewdiff/viewdiff.safetensors"
DEFAULT_BASE_MODEL = "stabilityai/stable-diffusion-2-1-base"


class ViewDiffPrior(LatentDiffusionPrior):
    """Adapter around a :class:`~lift3d.priors.viewdiff.model.ViewDiffUNet` and the base model's VAE.

    Its space is the VAE latent ``[B, 4, h, w]``; a branch (:data:`Cond`) holds ``text`` ``[B, L, D]``,
    ``c2w`` ``[B, 4, 4]``, ``intrinsics`` ``[B, 3, 3]``, ``intensity`` ``[B]`` and, when the prompt
    processor supplies it, ``null`` (the empty text). Rows come in groups of ``n_views``.
    """

    prompt_processor = "stable-diffusion-prompt-processor"
    same_weights_hint = "with the guidance's base model (sd_model=... in the recipe sets both)"

    def __init__(self, model: nn.Module, vae: nn.Module, alphas_cumprod: Tensor, prediction_type: str,
                 num_train_timesteps: int, n_views: int, intensity: Optional[float] = None,
                 name: str = "viewdiff-guidance", scores: str = "rgb"):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ConfigError(f"{name}: the base scheduler's prediction_type is {prediction_type!r}; "
                              "valid: epsilon, v_prediction, sample")
        self.unet = model
        self.vae = vae
        self.guidance_name = name
        self.prediction_type = prediction_type
        self.num_train_timesteps = int(num_train_timesteps)
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().float().clone(), persistent=False)
        self.n_views = int(n_views)
        self.intensity = intensity
        #: Which render is scored (``rgb`` or ``normal``): its brightness is the measured intensity.
        self.scores = scores
        base = model.unet.config
        size = base.sample_size
        self.latent_size = (int(size), int(size)) if isinstance(size, int) else tuple(map(int, size))
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.resolution = (self.latent_size[0] * factor, self.latent_size[1] * factor)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.text_dim = int(base.cross_attention_dim)

    def condition(self, inp: GuidanceInput, view_dependent_prompting: bool = False) -> Conditioning:
        from lift3d.priors.viewdiff.cameras import intrinsics_from_fovy

        cond, uncond, negatives, weights, null = self.text_embeddings(inp, view_dependent_prompting)
        B, dev, cams = cond.shape[0], cond.device, inp.cameras
        img = inp.normal if self.scores == "normal" else inp.rgb
        # Renders are resized to the square working resolution without cropping: normalised
        # intrinsics keep the render's aspect (fx = fy * H / W).
        aspect = float(img.shape[2]) / float(img.shape[1]) if img is not None else 1.0
        K = intrinsics_from_fovy(cams.fovy.detach().float().cpu(), aspect=aspect).to(dev)
        if self.intensity is not None or img is None:
            level = 0.5 if self.intensity is None else float(self.intensity)
            intensity = torch.full((B,), level, device=dev)
        else:
            intensity = img.detach().float().mean(dim=(1, 2, 3)).to(dev)
        shared: Cond = {"c2w": cams.c2w.detach().to(dev, torch.float32), "intrinsics": K, "intensity": intensity}
        if null is not None:
            shared["null"] = null
        return self.text_branches(cond, uncond, negatives, weights, shared)

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        dt = self.dtype
        out = self.unet(x_t.to(dt), t, cond["text"].to(dt), cond["c2w"].to(dt), cond["intrinsics"].to(dt),
                        cond["intensity"].to(dt), self.n_views)
        return out.to(x_t.dtype)


@register("viewdiff-guidance")
class ViewDiffGuidance(LatentDiffusionWeights, SDSGuidance):
    """Score distillation with a trained ViewDiff model over groups of views; ``loss_sds``."""

    prior_family = "viewdiff"
    prior_inputs = frozenset({"prompt_embeddings"})

    @dataclass
    class Config(SDSGuidance.Config):
        pretrained_model_name_or_path: str = DEFAULT_BASE_MODEL
        """The base Stable Diffusion the ViewDiff weights were trained on: a diffusers folder or a
        Hugging Face id found in the local cache (never downloaded: ``hf download <id>`` once). configs/viewdiff.yaml
        sets it to ``${sd_model}``, which its prompt processor reads too."""
        revision: Optional[str] = None
        """A Hugging Face revision of the base model to look up in the cache."""
        weights: str = DEFAULT_WEIGHTS
        """The ViewDiff weights file (or the out_dir holding viewdiff.safetensors) written by
        ``python -m lift3d.priors.viewdiff train``; none is published."""
        guidance_scale: Scheduled = 50.0
        """Classifier-free guidance scale ``s`` of ``e_u + s (e_c - e_u)``."""
        view_dependent_prompting: bool = False
        """ViewDiff reads the view from the cameras; view-dependent wording is off."""
        timestep_sharing: Literal["view", "group", "batch"] = "group"
        """One t per view group (the group's views were noised together in training)."""
        n_views: int = 4
        """Views per group (the batch must be whole groups, and data.n_views the same)."""
        intensity: Optional[float] = None
        """The image intensity (mean brightness in [0, 1]) every view is conditioned on; null: each
        render's own mean brightness (detached)."""
        return_denoised: bool = False
        """Decode the one-step clean estimate into the diagnostics as ``denoised`` (a VAE decode per step)."""
        half_precision_weights: bool = True
        """Keep the networks in float16 while the guidance is on CUDA (float32 elsewhere)."""
        torch_dtype: Optional[Literal["float16", "bfloat16", "float32"]] = None
        """A fixed dtype for the networks on every device; null: as half_precision_weights says."""

    cfg: Config

    @classmethod
    def resolve(cls, cfg: Any, key: str = DEFAULT_KEY) -> tuple[Path, Path]:
        """(the base model's folder, the ViewDiff weights file) of ``cfg``, or
        :class:`~lift3d.utils.hub.MissingWeightsError` naming the key and how to get them."""
        from lift3d.priors.viewdiff.model import resolve_base, resolve_viewdiff_weights
        from lift3d.utils.hub import MissingWeightsError

        found: list[Path] = []
        problems: list[str] = []
        for find_it in (lambda: resolve_viewdiff_weights(cfg.weights, key=f"{key}.weights"),
                        lambda: resolve_base(cfg.pretrained_model_name_or_path,
                                             key=f"{key}.pretrained_model_name_or_path", revision=cfg.revision)):
            try:
                found.append(find_it())
            except MissingWeightsError as exc:
                problems.append(str(exc))
        if problems:  # both at once: training the weights needs the base model too
            raise MissingWeightsError(" Also: ".join(problems))
        weights, base = found
        return base, weights

    def configure(self) -> None:
        c, key = self.cfg, self._cfg_key
        if c.n_views < 1:
            raise ConfigError(f"{key}.n_views must be >= 1, got {c.n_views}")
        if c.image == "latents":
            raise ConfigError(f"{key}.image: ViewDiff scores VAE-encoded renders; use image: rgb (or normal)")
        if c.intensity is not None and not 0 <= c.intensity <= 1:
            raise ConfigError(f"{key}.intensity must be in [0, 1] (a mean brightness) or null, got {c.intensity}")
        super().configure()

    def build_prior(self) -> ViewDiffPrior:
        from lift3d.priors.viewdiff.model import ViewDiffUNet, load_base
        from lift3d.utils.hub import MissingWeightsError

        c, key = self.cfg, self._cfg_key
        base, weights = self.resolve(c, key)
        dtype = weights_dtype(c.torch_dtype, c.half_precision_weights, on_cuda=False)
        parts = load_base(base, ("unet", "vae", "scheduler"), key=f"{key}.pretrained_model_name_or_path", dtype=dtype)
        try:
            model = ViewDiffUNet.from_weights(parts["unet"], weights)
        except ValueError as exc:
            raise MissingWeightsError(f"config key '{key}.weights' = {c.weights!r}: {exc}") from exc
        sched = parts["scheduler"]
        return ViewDiffPrior(model.to(dtype), parts["vae"], sched.alphas_cumprod, sched.config.prediction_type,
                             sched.config.num_train_timesteps, c.n_views, c.intensity, name=self.name(),
                             scores=c.image)

    def check_views(self, inp: GuidanceInput) -> None:
        """The batch must be whole view groups of ``n_views``, sampled as groups by the data module."""
        check_view_groups(self.name(), self._cfg_key, self.cfg.n_views, inp)

    def forward(self, inp: GuidanceInput, t: Tensor | None = None, noise: Tensor | None = None) -> GuidanceOutput:
        self.check_views(inp)
        s = self.score(inp, t, noise)
        if self.cfg.return_denoised:
            with torch.no_grad():
                s.diagnostics["denoised"] = self.prior.decode(s.denoised())
        return GuidanceOutput(losses={"loss_sds": self.distillation_target(s.x, s.grad)}, diagnostics=s.diagnostics)


__all__ = ["ViewDiffPrior", "ViewDiffGuidance", "DEFAULT_WEIGHTS"]
