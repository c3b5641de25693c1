"""Score distillation, written once against a diffusion-prior adapter.

Three ways of pulling renders towards a frozen diffusion prior live here; each prior family
(the toy world, Stable Diffusion, DeepFloyd IF, MVDream, Zero123) only supplies a
:class:`DiffusionPrior` adapter and a registered subclass that builds it.

* **SDS** (DreamFusion, Poole et al. 2022). For a render ``x`` in the prior's space, timestep ``t``
  and noise ``eps``, ``x_t = sqrt(a_t) x + sqrt(1 - a_t) eps`` and the gradient is
  ``w(t) (eps_cfg(x_t, t) - eps)``; ``loss_sds = 0.5 ||x - sg(x - grad)||^2 / B`` has exactly that
  gradient. It vanishes where the render equals the prior's guided denoised estimate.
* **VSD** (ProlificDreamer, Wang et al. 2023): the gradient is ``w(t) (eps_pre - eps_phi)``, where
  ``eps_phi`` is a LoRA copy of the prior fitted to the current renders (the guidance owns it and
  its optimizer), so the renders move as a distribution rather than to one mode.
* **Refine** (DreamGaussian, Tang et al. 2024): each render is noised to a small timestep and
  denoised back in a few DDIM steps; ``loss_refine`` is the MSE to that cleaner image.

Shared pieces: timestep sampling (uniform in a scheduled [min, max), or annealed from max to min
linearly or by HiFA's square root; per view, per view group, or one for the batch), the weighting
``w(t)`` (``sds``: 1 - a_t; ``uniform``: 1; ``fantasia3d``: sqrt(a_t)(1 - a_t)), classifier-free
guidance with the Perp-Neg combination (Armandpour et al. 2023) when the prompt asks for it, and
element-wise clipping or per-view normalisation of the gradient.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lift3d.config import ConfigError, Scheduled
from lift3d.guidance.base import BaseGuidance, GuidanceInput, GuidanceOutput

Cond = dict[str, Tensor]
"""One branch of conditioning for a batch: adapter-specific tensors, batch first."""


@dataclass
class Conditioning:
    """The branches classifier-free guidance combines, each a :data:`Cond` of batch size B."""

    cond: Cond
    uncond: Cond
    negatives: list[Cond] = field(default_factory=list)
    """Perp-Neg's negative branches (empty without Perp-Neg)."""
    neg_weights: Optional[Tensor] = None
    """[B, K] weight of each negative branch (negative numbers push away)."""


def cat_conds(conds: list[Cond]) -> Cond:
    """Concatenate branches along the batch, so one network call evaluates them all."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


class DiffusionPrior(nn.Module):
    """Adapter between a frozen diffusion model and the score-distillation core.

    Subclasses set ``prediction_type`` ("epsilon", "v_prediction" or "sample"), ``num_train_timesteps``
    and the buffer ``alphas_cumprod`` [T], and implement:

    * ``encode(images [B,H,W,3] in [0,1]) -> x [B,C,h,w]``: into the space the model denoises
      (pixels in [-1, 1] at its resolution, or VAE latents); differentiable;
    * ``decode(x) -> [B,H,W,3]`` in [0, 1];
    * ``condition(inp, view_dependent_prompting) -> Conditioning`` for the batch;
    * ``predict(x_t, t, cond) -> model output`` in the native parameterisation;
    * ``drop_text(cond, mask)``: the branch with the text of rows ``mask`` replaced by the model's
      "no text" conditioning (what it was trained on with probability ``p_uncond``);
    * for VSD, ``lora_copy(rank, alpha, targets)``: a trainable copy (see :class:`VSDGuidance`).
    """

    prediction_type: str = "epsilon"
    num_train_timesteps: int = 1000
    p_uncond: float = 0.1
    alphas_cumprod: Tensor

    def encode(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def condition(self, inp: GuidanceInput, view_dependent_prompting: bool = True) -> Conditioning:
        raise NotImplementedError

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        raise NotImplementedError

    def drop_text(self, cond: Cond, mask: Tensor) -> Cond:
        raise NotImplementedError

    def lora_copy(self, rank: int, alpha: float, targets: list[str]) -> "DiffusionPrior":
        raise NotImplementedError(f"{type(self).__name__} does not support VSD (no lora_copy)")

    def predict_branches(self, x_t: Tensor, t: Tensor, branches: list[Cond]) -> Tensor:
        """The model output for each branch at the same ``x_t``, in one call: [len(branches) * B, ...]."""
        n = len(branches)
        return self.predict(torch.cat([x_t] * n), torch.cat([t] * n), cat_conds(branches))

    def eps_x0(self, out: Tensor, x_t: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """(epsilon, x0) from the model output at ``x_t``; ``a`` the alphas_cumprod [B]."""
        return eps_x0(self.prediction_type, out, x_t, a)


def eps_x0(prediction_type: str, out: Tensor, x_t: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """(epsilon, x0) of a model output in ``prediction_type`` at ``x_t``; ``a`` is [B]."""
    a = a.to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
    sa, so = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "epsilon":
        return out, (x_t - so * out) / sa
    if prediction_type == "v_prediction":  # v = sa * eps - so * x0
        return so * x_t + sa * out, sa * x_t - so * out
    if prediction_type == "sample":
        return (x_t - sa * out) / so, out
    raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: epsilon, v_prediction, sample")


def perpendicular(x: Tensor, y: Tensor) -> Tensor:
    """The component of ``x`` perpendicular to ``y``, per sample (batch first)."""
    dims = tuple(range(1, x.dim()))
    coef = (x * y).sum(dims, keepdim=True) / (y * y).sum(dims, keepdim=True).clamp_min(1e-12)
    return x - coef * y


def guided_eps(e_cond: Tensor, e_uncond: Tensor, scale: float, negatives: list[Tensor] | None = None,
               neg_weights: Tensor | None = None) -> Tensor:
    """Classifier-free guidance ``e_u + s (e_c - e_u)``; with Perp-Neg, each negative direction
    ``e_n - e_u`` adds ``weight`` times its component perpendicular to ``e_c - e_u``."""
    pos = e_cond - e_uncond
    if negatives:
        acc = torch.zeros_like(pos)
        for k, e_n in enumerate(negatives):
            w = neg_weights[:, k].to(pos.dtype).view(-1, *([1] * (pos.dim() - 1)))
            acc = acc + w * perpendicular(e_n - e_uncond, pos)
        pos = pos + acc
    return e_uncond + scale * pos


# ---------------------------------------------------------------------------------------------
# The SDS guidance


class DiffusionGuidance(BaseGuidance):
    """A guidance that scores renders with a frozen diffusion prior (the adapter :meth:`build_prior`
    returns); holds the prior outside the module tree so it never reaches an optimizer or checkpoint."""

    @dataclass
    class Config(BaseGuidance.Config):
        guidance_scale: Scheduled = 7.5
        """Classifier-free guidance scale."""
        image: Literal["rgb", "normal", "latents"] = "rgb"
        """What the prior scores: the render, its normal map (Fantasia3D's geometry stage), or the
        renderer's latents (a latent-space field)."""
        view_dependent_prompting: bool = True
        """Condition each view on its view-dependent prompt when the prompt processor makes them."""

    cfg: Config
    #: The prior family (toyworld, stable-diffusion, ...): tests pick a tiny model of it by this name.
    prior_family: str = ""
    #: What the prior reads besides the scored image ("prompt_embeddings", "cond_image"); see :meth:`requires`.
    prior_inputs: frozenset[str] = frozenset()
    #: Where this guidance's config sits ("system.guidance" unless built under another key), for messages.
    _cfg_key: str

    def __init__(self, cfg: Any = None, *, cfg_key: str = "", prov: Any = None, **kwargs: Any):
        # Known before the base class parses the config and configure() builds the prior, whose errors name it.
        object.__setattr__(self, "_cfg_key", cfg_key or "system.guidance")
        super().__init__(cfg, cfg_key=cfg_key, prov=prov, **kwargs)

    @classmethod
    def requires(cls, cfg: Any) -> frozenset[str]:
        return frozenset({"normals"} if cfg.image == "normal" else set()) | cls.prior_inputs

    @classmethod
    def missing_weights(cls, cfg: Any) -> str | None:
        """Why the weights ``cfg`` names cannot be loaded here (None when they can), without loading them.

        A guidance with a ``resolve(cfg)`` classmethod (the folder of its weights, or a
        MissingWeightsError) gets this from it."""
        resolve = getattr(cls, "resolve", None)
        if resolve is None:
            return None
        from lift3d.utils.hub import MissingWeightsError

        try:
            resolve(cfg)
        except MissingWeightsError as exc:
            return str(exc)
        return None

    def build_prior(self) -> DiffusionPrior:
        """The frozen adapter this guidance scores with (subclasses load their weights here)."""
        raise NotImplementedError

    def configure(self) -> None:
        prior = self.build_prior()
        prior.requires_grad_(False).eval()
        # Frozen and not a submodule: it stays out of the system's optimizer and of checkpoints.
        self.__dict__["prior"] = prior

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "DiffusionGuidance":
        self.prior._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    @property
    def alphas_cumprod(self) -> Tensor:
        return self.prior.alphas_cumprod

    @property
    def num_train_timesteps(self) -> int:
        return self.prior.num_train_timesteps

    def scored_image(self, inp: GuidanceInput) -> Tensor:
        """The renders in the prior's space [B, C, h, w] (differentiable)."""
        what = self.cfg.image
        if what == "latents":
            if inp.latents is None:
                raise ValueError(f"{self.name()} image: latents needs a renderer that returns comp_latents")
            return inp.latents.permute(0, 3, 1, 2)
        img = inp.normal if what == "normal" else inp.rgb
        if img is None:
            raise ValueError(f"{self.name()} image: {what} got no {'normal map (comp_normal)' if what == 'normal' else 'render'}")
        return self.prior.encode(img)


def timestep_weight(alpha_bar: Tensor, weighting: str) -> Tensor:
    """SDS's w(t) from the cumulative alphas of the drawn timesteps: ``sds`` 1 - a_t (DreamFusion),
    ``fantasia3d`` sqrt(a_t) (1 - a_t), anything else 1."""
    if weighting == "sds":
        return 1 - alpha_bar
    if weighting == "fantasia3d":
        return alpha_bar.sqrt() * (1 - alpha_bar)
    return torch.ones_like(alpha_bar)


def step_bounds(n: int, min_percent: float, max_percent: float) -> tuple[int, int]:
    """(lo, hi) timesteps of an ``n``-step schedule from the fractions ``min_percent`` and ``max_percent``,
    clamped so that hi >= 1 and both lie in the schedule."""
    lo, hi = int(min_percent * n), int(max_percent * n)
    return max(0, min(lo, n - 1)), max(1, min(hi, n - 1))


class SDSGuidance(DiffusionGuidance):
    """Score distillation sampling against the adapter :meth:`build_prior` returns; ``loss_sds``."""

    loss_name = "sds"

    @dataclass
    class Config(DiffusionGuidance.Config):
        min_step_percent: Scheduled = 0.02
        """Lowest timestep sampled, as a fraction of the training timesteps."""
        max_step_percent: Scheduled = 0.98
        """Highest timestep sampled (a schedule anneals it down for detail late in training)."""
        timestep_schedule: Literal["uniform", "linear", "sqrt"] = "uniform"
        """``uniform``: t drawn in [min, max); ``linear`` / ``sqrt``: t moves from max to min over
        ``anneal_steps`` steps, linearly or as HiFA's square root (fast early, slow late)."""
        anneal_steps: int = 1000
        """Length of the ``linear`` / ``sqrt`` timestep annealing, in training steps."""
        timestep_sharing: Literal["view", "group", "batch"] = "view"
        """One t per view, per group of ``n_views`` (multi-view priors), or one for the batch."""
        weighting: Literal["sds", "uniform", "fantasia3d"] = "sds"
        """w(t) in the gradient."""
        grad_clip: Optional[Scheduled] = None
        """Clamp each gradient element to [-grad_clip, grad_clip]."""
        grad_normalize: bool = False
        """Scale each view's gradient to unit root-mean-square (after clipping)."""

    cfg: Config

    def configure(self) -> None:
        if self.cfg.anneal_steps < 1:
            raise ConfigError(f"{self.name()}: anneal_steps must be positive, got {self.cfg.anneal_steps}")
        super().configure()

    # -- pieces -----------------------------------------------------------------------------------

    def weight(self, t: Tensor) -> Tensor:
        return timestep_weight(self.alphas_cumprod[t], self.cfg.weighting)

    def step_range(self) -> tuple[int, int]:
        """(lo, hi) timesteps from the (scheduled) min/max step percentages, clamped to the schedule."""
        return step_bounds(self.num_train_timesteps, self.C(self.cfg.min_step_percent), self.C(self.cfg.max_step_percent))

    def sample_t(self, inp: GuidanceInput, device: torch.device) -> Tensor:
        """[B] timesteps for this step (see ``timestep_schedule`` and ``timestep_sharing``)."""
        B, lo, hi = inp.batch_size, *self.step_range()
        n = {"view": B, "group": inp.cameras.n_groups, "batch": 1}[self.cfg.timestep_sharing]
        if self.cfg.timestep_schedule == "uniform":
            t = torch.randint(lo, max(hi, lo + 1), (n,), device=device)
        else:
            p = min(max(self.global_step / self.cfg.anneal_steps, 0.0), 1.0)
            p = math.sqrt(p) if self.cfg.timestep_schedule == "sqrt" else p
            t = torch.full((n,), int(round(hi - (hi - lo) * p)), device=device, dtype=torch.long)
        return t.repeat_interleave(B // n)

    def process_grad(self, grad: Tensor) -> Tensor:
        grad = torch.nan_to_num(grad)
        clip = self.C(self.cfg.grad_clip) if self.cfg.grad_clip is not None else None
        if clip is not None:
            grad = grad.clamp(-clip, clip)
        if self.cfg.grad_normalize:
            rms = grad.flatten(1).pow(2).mean(1).sqrt().view(-1, *([1] * (grad.dim() - 1)))
            grad = grad / rms.clamp_min(1e-8)
        return grad

    def branch_eps(self, x_t: Tensor, t: Tensor, conds: Conditioning) -> tuple[Tensor, ...]:
        """Epsilon at ``x_t`` of each branch, in the order cond, uncond, negatives (one network call)."""
        branches = [conds.cond, conds.uncond, *conds.negatives]
        B = x_t.shape[0]
        n = len(branches)
        out = self.prior.predict_branches(x_t, t, branches)
        eps, _ = self.prior.eps_x0(out, torch.cat([x_t] * n), torch.cat([self.alphas_cumprod[t]] * n))
        return eps.split(B)

    def guided(self, x_t: Tensor, t: Tensor, conds: Conditioning, scale: float) -> Tensor:
        """The guided epsilon at ``x_t`` (one network call for all branches)."""
        parts = self.branch_eps(x_t, t, conds)
        return guided_eps(parts[0], parts[1], scale, list(parts[2:]), conds.neg_weights)

    def step_diagnostics(self, grad: Tensor, t: Tensor) -> dict[str, Any]:
        """What every SDS-like step reports: the gradient's norm, the timestep range and the timesteps."""
        lo, hi = self.step_range()
        return {"grad_norm": grad.norm(), "min_step": torch.tensor(lo), "max_step": torch.tensor(hi), "t": t}

    def distillation_target(self, x: Tensor, grad: Tensor) -> Tensor:
        """``0.5 ||x - sg(x - grad)||^2 / B``: its gradient with respect to x is ``grad / B``."""
        return 0.5 * F.mse_loss(x, (x - grad).detach(), reduction="sum") / x.shape[0]

    # -- forward ------------------------------------------------------------------------------------

    def noised(self, inp: GuidanceInput, t: Tensor | None, noise: Tensor | None) -> tuple:
        """(x, t, noise, a, x_t, conditioning): the scored renders, the timesteps (drawn unless given,
        before the noise), the noise (drawn unless given), alphas_cumprod at t and the noised renders."""
        x = self.scored_image(inp)
        if t is None:
            t = self.sample_t(inp, x.device)
        if noise is None:
            noise = torch.randn_like(x)
        a = self.alphas_cumprod[t].view(-1, *([1] * (x.dim() - 1)))
        x_t = a.sqrt() * x.detach() + (1 - a).sqrt() * noise
        return x, t, noise, a, x_t, self.prior.condition(inp, self.cfg.view_dependent_prompting)

    def score(self, inp: GuidanceInput, t: Tensor | None = None, noise: Tensor | None = None) -> "SDSScore":
        """One SDS evaluation of the batch: the renders noised (see :meth:`noised`), the guided epsilon
        at ``guidance_scale`` and the processed gradient ``w(t) (eps_cfg - eps)``, with the basic
        diagnostics (``grad_norm``, ``min_step``, ``max_step``, ``t``)."""
        x, t, noise, a, x_t, conds = self.noised(inp, t, noise)
        with torch.no_grad():
            eps_cfg = self.guided(x_t, t, conds, self.C(self.cfg.guidance_scale))
            w = self.weight(t).view_as(a)
            grad = self.process_grad(w * (eps_cfg - noise))
        return SDSScore(x=x, t=t, noise=noise, a=a, x_t=x_t, conds=conds, eps_cfg=eps_cfg, w=w, grad=grad,
                        diagnostics=self.step_diagnostics(grad, t))

    def forward(self, inp: GuidanceInput, t: Tensor | None = None, noise: Tensor | None = None) -> GuidanceOutput:
        s = self.score(inp, t, noise)
        with torch.no_grad():
            s.diagnostics["denoised"] = self.prior.decode(s.denoised())
        return GuidanceOutput(losses={f"loss_{self.loss_name}": self.distillation_target(s.x, s.grad)},
                              diagnostics=s.diagnostics)


@dataclass
class SDSScore:
    """What :meth:`SDSGuidance.score` computed for one batch (all but ``x`` without gradients)."""

    x: Tensor
    """The renders in the prior's space [B, C, h, w] (differentiable)."""
    t: Tensor
    noise: Tensor
    a: Tensor
    """alphas_cumprod at ``t``, shaped to broadcast against ``x``."""
    x_t: Tensor
    conds: Conditioning
    eps_cfg: Tensor
    """The guided epsilon at ``x_t``."""
    w: Tensor
    """The weighting ``w(t)``, shaped as ``a``."""
    grad: Tensor
    """``w(t) (eps_cfg - noise)``, clipped / normalised as the config says."""
    diagnostics: dict[str, Any]

    def denoised(self) -> Tensor:
        """The one-step clean estimate ``(x_t - sqrt(1 - a) eps_cfg) / sqrt(a)``."""
        return (self.x_t - (1 - self.a).sqrt() * self.eps_cfg) / self.a.sqrt()


# ---------------------------------------------------------------------------------------------
# VSD


class VSDGuidance(SDSGuidance):
    """Variational score distillation: ``loss_vsd`` against a LoRA copy fitted to the renders.

    ``eps_pre`` is the frozen prior under CFG at ``guidance_scale`` s, written
    ``e_c + (s - 1)(e_c - e_u)`` (exact at s = 1); ``eps_phi`` the copy at ``lora_guidance_scale``
    with the dropped text as its unconditional branch, as it is trained. The copy starts equal to
    the prior (LoRA B = 0), so the first gradient is zero at s = 1. Each forward, after scoring,
    the guidance takes ``lora_n_steps`` AdamW steps of the prior's own training loss on the detached
    renders (fresh uniform t, text dropped with the prior's ``p_uncond``), reported as ``lora_loss``.

    Saved: only the copy's trainable tensors, the AdamW state and the LoRA step count; the frozen
    base is rebuilt from the weights, so a resumed run continues exactly.
    """

    loss_name = "vsd"

    @dataclass
    class Config(SDSGuidance.Config):
        lora_guidance_scale: Scheduled = 1.0
        """CFG scale of the LoRA model (1: its conditional prediction only)."""
        lora_rank: int = 4
        """Rank of each LoRA adapter."""
        lora_alpha: float = 4.0
        """LoRA scaling numerator: adapters are scaled by lora_alpha / lora_rank."""
        lora_lr: float = 3e-4
        """Learning rate of the LoRA's own AdamW."""
        lora_n_steps: int = 1
        """LoRA optimizer steps per guidance call (0 freezes the LoRA: phi stays the prior)."""
        lora_targets: list[str] = field(default_factory=list)
        """Names (suffixes) of the layers that get adapters; empty: the adapter's default set."""
        return_denoised: bool = True
        """Decode the pretrained pass's one-step clean estimate into the diagnostics as ``denoised``
        (one decoder pass per step: costly for a latent prior at full size)."""

    cfg: Config

    def configure(self) -> None:
        super().configure()
        c, key = self.cfg, self.name()
        if c.lora_rank < 1:
            raise ConfigError(f"{key}: lora_rank must be a positive integer, got {c.lora_rank}")
        if c.lora_n_steps < 0:
            raise ConfigError(f"{key}: lora_n_steps must be >= 0 (0 freezes the LoRA), got {c.lora_n_steps}")
        if c.lora_lr <= 0:
            raise ConfigError(f"{key}: lora_lr must be positive, got {c.lora_lr}")
        # A fixed seed for the LoRA's random A matrices: every build gives the same LoRA and the
        # global RNG (the run's noise) is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.phi = self.prior.lora_copy(c.lora_rank, c.lora_alpha, list(c.lora_targets))
        self._frozen_keys = {f"phi.{n}" for n, p in self.phi.named_parameters() if not p.requires_grad}
        self._frozen_keys |= {f"phi.{n}" for n, _ in self.phi.named_buffers()}
        self.register_state_dict_post_hook(_drop_frozen_keys)
        self.register_load_state_dict_post_hook(_ignore_missing_frozen_keys)
        self.lora_optimizer = torch.optim.AdamW(self.lora_parameters(), lr=c.lora_lr, weight_decay=0.0)
        self.lora_steps_taken = 0

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.phi.parameters() if p.requires_grad]

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "VSDGuidance":
        super()._apply(fn, *args, **kwargs)
        # AdamW keeps its moments beside the parameters: they follow their device and dtype.
        for p, state in self.lora_optimizer.state.items():
            for k, v in state.items():
                if torch.is_tensor(v) and k != "step":
                    state[k] = v.to(device=p.device, dtype=p.dtype if v.is_floating_point() else v.dtype)
        return self

    def get_extra_state(self) -> dict[str, Any]:
        return {"lora_optimizer": copy.deepcopy(self.lora_optimizer.state_dict()),
                "lora_steps_taken": self.lora_steps_taken}

    def set_extra_state(self, state: Any) -> None:
        # A copy: Adam updates its moments in place, and the source must not change with them.
        self.lora_optimizer.load_state_dict(copy.deepcopy(state["lora_optimizer"]))
        self.lora_steps_taken = int(state.get("lora_steps_taken", 0))

    def _eps(self, model: DiffusionPrior, scale: float, x_t: Tensor, t: Tensor, cond: Cond, uncond: Cond) -> Tensor:
        """Guided epsilon ``e_c + (scale - 1)(e_c - e_u)`` of ``model`` at ``x_t``."""
        a = self.alphas_cumprod[t]
        if scale == 1.0:  # the unconditional branch would be multiplied by zero: skip it
            return model.eps_x0(model.predict(x_t, t, cond), x_t, a)[0]
        out = model.predict_branches(x_t, t, [cond, uncond])
        e_c, e_u = model.eps_x0(out, torch.cat([x_t, x_t]), torch.cat([a, a]))[0].chunk(2)
        return e_c + (scale - 1.0) * (e_c - e_u)

    def lora_loss(self, x0: Tensor, cond: Cond, t: Tensor, noise: Tensor, drop: Tensor | None = None) -> Tensor:
        """The prior's training loss for phi on clean ``x0`` (in the prior's space)."""
        a = self.alphas_cumprod[t].view(-1, *([1] * (x0.dim() - 1)))
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        out = self.phi.predict(x_t, t, cond if drop is None else self.phi.drop_text(cond, drop))
        ptype = self.prior.prediction_type
        target = {"epsilon": noise, "sample": x0}.get(ptype)
        if target is None:  # v
            target = a.sqrt() * noise - (1 - a).sqrt() * x0
        return F.mse_loss(out, target)

    def train_lora(self, x0: Tensor, cond: Cond, n_steps: int | None = None) -> Tensor:
        """``n_steps`` (default ``lora_n_steps``) AdamW steps on ``x0``; returns the mean loss."""
        n = self.cfg.lora_n_steps if n_steps is None else n_steps
        x0 = x0.detach()
        B, dev = x0.shape[0], x0.device
        losses = []
        with torch.enable_grad():
            for _ in range(n):
                t = torch.randint(0, self.num_train_timesteps, (B,), device=dev)
                noise = torch.randn_like(x0)
                drop = torch.rand(B, device=dev) < self.prior.p_uncond
                loss = self.lora_loss(x0, cond, t, noise, drop)
                self.lora_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.lora_optimizer.step()
                self.lora_steps_taken += 1
                losses.append(loss.detach())
        return torch.stack(losses).mean() if losses else torch.zeros((), device=dev)

    def forward(self, inp: GuidanceInput, t: Tensor | None = None, noise: Tensor | None = None) -> GuidanceOutput:
        lo, hi = self.step_range()
        x, t, noise, a, x_t, conds = self.noised(inp, t, noise)
        B, dev = x.shape[0], x.device
        with torch.no_grad():
            scale, scale_phi = float(self.C(self.cfg.guidance_scale)), float(self.C(self.cfg.lora_guidance_scale))
            eps_pre = self._eps(self.prior, scale, x_t, t, conds.cond, conds.uncond)
            null = self.phi.drop_text(conds.cond, torch.ones(B, dtype=torch.bool, device=dev))
            eps_phi = self._eps(self.phi, scale_phi, x_t, t, conds.cond, null)
            grad = self.process_grad(self.weight(t).view_as(a) * (eps_pre - eps_phi))
            denoised = (x_t - (1 - a).sqrt() * eps_pre) / a.sqrt()
        loss = self.distillation_target(x, grad)
        # Fit phi to the current renders after scoring them, as ProlificDreamer does.
        lora_loss = self.train_lora(x, conds.cond)
        diagnostics = {"lora_loss": lora_loss, "grad_norm": grad.norm(), "min_step": torch.tensor(lo),
                       "max_step": torch.tensor(hi), "t": t}
        if self.cfg.return_denoised:
            with torch.no_grad():
                diagnostics["denoised"] = self.prior.decode(denoised).detach()
        return GuidanceOutput(losses={"loss_vsd": loss}, diagnostics=diagnostics)


def _drop_frozen_keys(module: VSDGuidance, state_dict: dict[str, Any], prefix: str, _meta: Any) -> None:
    for k in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] in module._frozen_keys]:
        del state_dict[k]


def _ignore_missing_frozen_keys(module: VSDGuidance, incompatible: Any) -> None:
    keep = [k for k in incompatible.missing_keys if not any(k == f or k.endswith("." + f) for f in module._frozen_keys)]
    incompatible.missing_keys[:] = keep


# ---------------------------------------------------------------------------------------------
# Multi-step refinement targets


class RefineGuidance(DiffusionGuidance):
    """MSE to the multi-step denoised render (DreamGaussian's texture stage); ``loss_refine``.

    The render is noised to ``t_s = strength * (T - 1)``, then denoised in ``n_steps`` DDIM steps
    (eta 0) at ``t_k = round(t_s (n - k) / n)`` down to the clean image, under CFG on the model's
    native output. The clean estimate is clipped to [-1, 1] at every step and the noise re-derived
    from the clipped estimate, as the prior's sampler does. A small strength keeps the render's layout
    and colours and only sharpens them.
    """

    loss_name = "refine"

    @dataclass
    class Config(DiffusionGuidance.Config):
        strength: Scheduled = 0.3
        """How far the render is noised, as a fraction of the timesteps (0: the target is the render)."""
        n_steps: int = 4
        """DDIM steps from the noised render back to a clean image (capped at the starting timestep)."""

    cfg: Config

    def configure(self) -> None:
        if self.cfg.n_steps < 1:
            raise ConfigError(f"{self.name()}: n_steps must be >= 1, got {self.cfg.n_steps}")
        super().configure()

    def timesteps(self, strength: float) -> list[int]:
        """The DDIM timesteps visited for ``strength`` (descending; empty when strength is 0)."""
        t_start = int(round(min(max(float(strength), 0.0), 1.0) * (self.num_train_timesteps - 1)))
        n = min(self.cfg.n_steps, t_start)
        return [int(round(t_start * (n - k) / n)) for k in range(n)]

    def forward(self, inp: GuidanceInput, t: Tensor | None = None, noise: Tensor | None = None) -> GuidanceOutput:
        rgb = inp.normal if self.cfg.image == "normal" else inp.rgb
        B, H, W, _ = rgb.shape
        dev = rgb.device
        ts = self.timesteps(self.C(self.cfg.strength))
        if not ts:
            target = rgb.detach()
        else:
            with torch.no_grad():
                x = self.prior.encode(rgb.detach())
                if noise is None:
                    noise = torch.randn_like(x)
                a0 = self.alphas_cumprod[ts[0]]
                x = a0.sqrt() * x + (1 - a0).sqrt() * noise.to(x)
                conds = self.prior.condition(inp, self.cfg.view_dependent_prompting)
                scale = self.C(self.cfg.guidance_scale)
                for k, tk in enumerate(ts):
                    tt = torch.full((B,), tk, device=dev, dtype=torch.long)
                    out_c, out_u = self.prior.predict_branches(x, tt, [conds.cond, conds.uncond]).chunk(2)
                    a = self.alphas_cumprod[tk]
                    _, x0 = self.prior.eps_x0(out_u + scale * (out_c - out_u), x, a.expand(B))
                    # Clip the clean estimate and re-derive the noise from it: the unclipped noise
                    # would carry a guided overshoot into the next step's input.
                    x0 = x0.clamp(-1, 1)
                    eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
                    a_prev = self.alphas_cumprod[ts[k + 1]] if k + 1 < len(ts) else torch.ones_like(a)
                    x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
                target = self.prior.decode(x)
                if target.shape[1:3] != (H, W):
                    target = F.interpolate(target.permute(0, 3, 1, 2), (H, W), mode="bilinear",
                                           align_corners=False).permute(0, 2, 3, 1)
                target = target.to(rgb.dtype).contiguous()
        return GuidanceOutput(losses={"loss_refine": F.mse_loss(rgb, target)},
                              diagnostics={"denoised": target, "t_start": torch.tensor(ts[0] if ts else 0)})


__all__ = ["DiffusionPrior", "Conditioning", "DiffusionGuidance", "SDSGuidance", "SDSScore", "VSDGuidance",
           "RefineGuidance", "guided_eps", "perpendicular", "eps_x0", "cat_conds"]
