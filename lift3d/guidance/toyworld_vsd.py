"""Variational score distillation (VSD, ProlificDreamer, Wang et al. 2023) against the toy-world prior.

SDS pulls every render towards the prior's mode; VSD instead compares the prior's score with the
score of a second model, ``eps_phi``, fitted on the renders themselves, so the renders move as a
distribution towards the prior's. For a render ``x`` (in [-1, 1]), timestep ``t`` and noise ``eps``::

    x_t  = sqrt(a_t) x + sqrt(1 - a_t) eps
    grad = w(t) (eps_pre(x_t, t, y, c) - eps_phi(x_t, t, y, c))          # d loss_vsd / d x

``eps_pre`` is the frozen prior with classifier-free guidance at ``guidance_scale`` s, written
``e_c + (s - 1)(e_c - e_u)`` (the usual ``e_u + s (e_c - e_u)``, but exact at s = 1); ``eps_phi``
is the same form for the adapted copy at ``lora_guidance_scale`` (default 1: conditional only).
``c`` is the camera, which the toy prior takes anyway. ``loss_vsd = 0.5 * ||x - sg(x - grad)||^2 / B``
has that gradient; ``w(t)`` is chosen as in ``toyworld-guidance``.

What is trained: ``eps_phi`` is a copy of the prior with LoRA adapters (peft) on the UNet's
ResNet convolutions, time projections and attention projections, and its camera MLP unfrozen. At
initialisation the LoRA's B matrices are zero, so ``eps_phi == eps_pre`` at s = 1 and the gradient
is zero. The guidance owns that model and its AdamW: each forward, after the gradient above is
computed, it takes ``lora_n_steps`` steps of the prior's own training loss (v-prediction MSE at a
fresh uniform timestep, text dropped with the prior's ``p_uncond``) on the detached render, and
reports that loss as the diagnostic ``lora_loss``. Nothing of it reaches the system's optimizer.

What is saved: ``state_dict()`` holds only the trainable tensors (``phi.*lora_A/B*`` and
``phi.camera_mlp.*``) and, as ``_extra_state``, the AdamW state and the count of LoRA steps. The
frozen prior and the frozen base of the copy come from the weights file, so a resumed run
continues exactly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lift3d.config import ConfigError, Scheduled
from lift3d.guidance.toyworld import ToyWorldGuidance
from lift3d.registry import register


@register("toyworld-vsd-guidance")
class ToyWorldVSDGuidance(ToyWorldGuidance):
    """VSD with the toy-world prior and a camera-conditioned LoRA copy; returns ``loss_vsd``."""

    @dataclass
    class Config(ToyWorldGuidance.Config):
        lora_guidance_scale: Scheduled = 1.0
        """Classifier-free guidance scale of the LoRA model (1: its conditional prediction only)."""
        lora_rank: int = 4
        """Rank of each LoRA adapter."""
        lora_alpha: float = 4.0
        """LoRA scaling numerator: adapters are scaled by lora_alpha / lora_rank."""
        lora_lr: float = 3e-4
        """Learning rate of the LoRA's own AdamW (1e-3 and up oscillated on toy-world renders at rank 4)."""
        lora_n_steps: int = 1
        """LoRA optimizer steps per guidance call (0 freezes the LoRA: phi stays the prior)."""
        lora_targets: list[str] = field(default_factory=lambda: [
            "conv1", "conv2", "conv_shortcut", "time_emb_proj", "to_q", "to_k", "to_v", "to_out.0"])
        """Names (suffixes) of the UNet's Linear/Conv2d layers that get adapters."""

    def configure(self) -> None:
        super().configure()
        c, key = self.cfg, getattr(type(self), "registry_name", "toyworld-vsd-guidance")
        if c.lora_rank < 1:
            raise ConfigError(f"{key}: lora_rank must be a positive integer, got {c.lora_rank}")
        if c.lora_n_steps < 0:
            raise ConfigError(f"{key}: lora_n_steps must be >= 0 (0 freezes the LoRA), got {c.lora_n_steps}")
        if c.lora_lr <= 0:
            raise ConfigError(f"{key}: lora_lr must be positive, got {c.lora_lr}")
        from peft import LoraConfig, inject_adapter_in_model

        phi = copy.deepcopy(self.prior)
        phi.requires_grad_(False)
        layers = [n for n, m in phi.unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        for target in c.lora_targets:
            if not any(n == target or n.endswith("." + target) for n in layers):
                raise ConfigError(f"{key}: lora_targets entry {target!r} names no Linear/Conv2d layer of the UNet; "
                                  f"layer names: {', '.join(sorted({n.rsplit('.', 1)[-1] for n in layers}))}")
        lora = LoraConfig(r=c.lora_rank, lora_alpha=c.lora_alpha, target_modules=list(c.lora_targets),
                          lora_dropout=0.0, init_lora_weights=True)
        # B = 0: phi starts equal to the prior. A is random: draw it from a fixed seed so that every
        # build gives the same LoRA and leaves the global RNG (the run's noise) untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            inject_adapter_in_model(lora, phi.unet)
        phi.camera_mlp.requires_grad_(True)
        self.phi = phi
        # The copy's frozen base is rebuilt from the weights file: keep it out of the state dict.
        self._frozen_keys = {f"phi.{n}" for n, p in phi.named_parameters() if not p.requires_grad}
        self._frozen_keys |= {f"phi.{n}" for n, _ in phi.named_buffers()}
        self.register_state_dict_post_hook(_drop_frozen_keys)
        self.register_load_state_dict_post_hook(_ignore_missing_frozen_keys)
        self.lora_optimizer = torch.optim.AdamW(self.lora_parameters(), lr=c.lora_lr, weight_decay=0.0)
        self.lora_steps_taken = 0

    def lora_parameters(self) -> list[nn.Parameter]:
        """What the LoRA optimizer trains: the adapters and the copy's camera MLP."""
        return [p for p in self.phi.parameters() if p.requires_grad]

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "ToyWorldVSDGuidance":
        super()._apply(fn, *args, **kwargs)
        # AdamW keeps its moments beside the parameters: they follow their device and dtype.
        for p, state in self.lora_optimizer.state.items():
            for k, v in state.items():
                if torch.is_tensor(v) and k != "step":
                    state[k] = v.to(device=p.device, dtype=p.dtype if v.is_floating_point() else v.dtype)
        return self

    # ------------------------------------------------------------------ checkpoint state

    def get_extra_state(self) -> dict[str, Any]:
        return {"lora_optimizer": copy.deepcopy(self.lora_optimizer.state_dict()),
                "lora_steps_taken": self.lora_steps_taken}

    def set_extra_state(self, state: Any) -> None:
        # Copy: loading must not share moment tensors with the source (Adam updates them in place).
        self.lora_optimizer.load_state_dict(copy.deepcopy(state["lora_optimizer"]))
        self.lora_steps_taken = int(state.get("lora_steps_taken", 0))

    # ------------------------------------------------------------------ the two scores

    def _eps(self, model: nn.Module, scale: float, x_t: Tensor, t: Tensor, a: Tensor, cond: Tensor,
             uncond: Tensor, cam: Tensor, uncond_drop: Tensor) -> Tensor:
        """Guided epsilon of ``model`` at ``x_t``: ``e_c + (scale - 1)(e_c - e_u)``."""
        from lift3d.priors.toyworld.model import predict_eps_x0

        B = x_t.shape[0]
        if scale == 1.0:  # the unconditional branch would be multiplied by zero: skip it
            out = model(x_t, t, cond, cam, torch.zeros(B, dtype=torch.bool, device=x_t.device))
            return predict_eps_x0(self.prior.cfg, out, x_t, a)[0]
        drop = torch.cat([torch.zeros(B, dtype=torch.bool, device=x_t.device), uncond_drop])
        out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, uncond]), torch.cat([cam, cam]), drop)
        e_c, e_u = predict_eps_x0(self.prior.cfg, out, torch.cat([x_t, x_t]), torch.cat([a, a]))[0].chunk(2)
        return e_c + (scale - 1.0) * (e_c - e_u)

    def eps_phi(self, x_t: Tensor, t: Tensor, tokens: Tensor, camera: Tensor) -> Tensor:
        """The LoRA model's conditional epsilon (no guidance) at ``x_t`` [B,3,res,res]."""
        a = self.alphas_cumprod[t]
        return self._eps(self.phi, 1.0, x_t, t, a, tokens, tokens, camera, torch.zeros_like(t, dtype=torch.bool))

    # ------------------------------------------------------------------ the LoRA's own training

    def lora_loss(self, x0: Tensor, tokens: Tensor, camera: Tensor, t: Tensor, noise: Tensor,
                  drop_text: Tensor | None = None) -> Tensor:
        """The prior's training loss for phi on clean images ``x0`` [B,3,res,res] in [-1, 1]."""
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        out = self.phi(x_t, t, tokens, camera, drop_text)
        if self.prior.cfg.prediction_type == "epsilon":
            target = noise
        else:
            target = a.sqrt() * noise - (1 - a).sqrt() * x0  # v
        return F.mse_loss(out, target)

    def train_lora(self, x0: Tensor, tokens: Tensor, camera: Tensor, n_steps: int | None = None) -> Tensor:
        """``n_steps`` (default ``lora_n_steps``) AdamW steps on ``x0``; returns the mean loss."""
        n = self.cfg.lora_n_steps if n_steps is None else n_steps
        x0 = x0.detach()
        B, dev = x0.shape[0], x0.device
        losses = []
        with torch.enable_grad():
            for _ in range(n):
                t = torch.randint(0, self.num_train_timesteps, (B,), device=dev)
                noise = torch.randn_like(x0)
                drop = torch.rand(B, device=dev) < self.prior.cfg.p_uncond
                loss = self.lora_loss(x0, tokens, camera, t, noise, drop)
                self.lora_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.lora_optimizer.step()
                self.lora_steps_taken += 1
                losses.append(loss.detach())
        return torch.stack(losses).mean() if losses else torch.zeros((), device=dev)

    # ------------------------------------------------------------------ forward

    def forward(self, rgb: Tensor, prompt_utils: Any = None, elevation: Tensor | None = None,
                azimuth: Tensor | None = None, camera_distances: Tensor | None = None, t: Tensor | None = None,
                noise: Tensor | None = None, **batch: Any) -> dict[str, Any]:
        x, t, noise, lo, hi, (cond, uncond, uncond_drop, cam) = self._prepare(
            rgb, prompt_utils, elevation, azimuth, camera_distances, t, noise, batch)
        B = x.shape[0]
        a = self.alphas_cumprod[t]
        with torch.no_grad():
            x_t = a.sqrt().view(-1, 1, 1, 1) * x.detach() + (1 - a).sqrt().view(-1, 1, 1, 1) * noise
            scale, scale_phi = float(self.C(self.cfg.guidance_scale)), float(self.C(self.cfg.lora_guidance_scale))
            eps_pre = self._eps(self.prior, scale, x_t, t, a, cond, uncond, cam, uncond_drop)
            # phi scores unconditionally with the dropped text, as it was trained (never the negative prompt)
            eps_phi = self._eps(self.phi, scale_phi, x_t, t, a, cond, cond, cam, torch.ones_like(uncond_drop))
            grad = self.weight(t).view(-1, 1, 1, 1) * (eps_pre - eps_phi)
            grad = torch.nan_to_num(grad)
            if self.cfg.grad_clip is not None:
                grad = grad.clamp(-self.cfg.grad_clip, self.cfg.grad_clip)
            sa, so = a.sqrt().view(-1, 1, 1, 1), (1 - a).sqrt().view(-1, 1, 1, 1)
            denoised = (x_t - so * eps_pre) / sa
        target = (x - grad).detach()
        loss_vsd = 0.5 * F.mse_loss(x, target, reduction="sum") / B
        # Fit phi to the current renders after scoring them, as ProlificDreamer does.
        lora_loss = self.train_lora(x, cond, cam)
        return {
            "loss_vsd": loss_vsd,
            "lora_loss": lora_loss,
            "grad_norm": grad.norm(),
            "min_step": torch.tensor(lo),
            "max_step": torch.tensor(hi),
            "denoised": ((denoised + 1) / 2).detach(),
            "t": t,
        }


def _drop_frozen_keys(module: ToyWorldVSDGuidance, state_dict: dict[str, Any], prefix: str, _meta: Any) -> None:
    for k in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] in module._frozen_keys]:
        del state_dict[k]


def _ignore_missing_frozen_keys(module: ToyWorldVSDGuidance, incompatible: Any) -> None:
    keep = [k for k in incompatible.missing_keys if not any(k == f or k.endswith("." + f) for f in module._frozen_keys)]
    incompatible.missing_keys[:] = keep
