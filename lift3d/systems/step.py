"""The training step: sub-steps that render view sets, guidances that score them, weighted terms.

One optimizer step per training step. Within it, each view set that an active guidance scores is
rendered once: the reference view of an image-to-3D batch first (``batch["ref"]``: its camera, RGB
and mask), then the random training views. Every guidance scoring a view set gets one
:class:`~lift3d.guidance.base.GuidanceInput` (the render, the cameras, the prompt, and the
reference image as conditioning when there is one). Regularizers see the random views' render.
All terms are weighted by ``system.loss.lambda_X`` and summed into one backward pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lift3d.config import C, ConfigError
from lift3d.guidance.base import CameraBatch, GuidanceInput
from lift3d.registry import RegistryError, find, registered
from lift3d.systems.regularizers import SUFFIX, registry_name
from lift3d.systems.stages import MAIN_GUIDANCE
from lift3d.utils.checkpoint import LastCheckpoint, NonFiniteLossError, describe_parameter, diverged_parameter
from lift3d.utils.threads import poll_threads


class TrainingStepMixin:
    """``training_step`` and the loss terms of one step; mixed into the system."""

    cfg: Any
    _cfg_key: str
    _weights_now: dict[str, float]
    _diagnostics: dict[str, Any]

    # ------------------------------------------------------------------ losses

    def guidance_input(self, out: dict[str, Any], view_batch: dict[str, Any], ref: dict[str, Any] | None,
                       needs: frozenset[str]) -> GuidanceInput:
        extra: dict[str, Any] = {}
        if ref is not None:
            extra.update(cond_image=ref.get("rgb"), cond_mask=ref.get("mask"), cond_cameras=CameraBatch.from_batch(ref))
        if "points" in needs:
            points, colors = self.geometry.guidance_points()
            extra.update(points=points, point_colors=colors)
        return GuidanceInput.from_render(out, view_batch, prompt=self.prompt_utils, **extra)

    def regularizer(self, term: str) -> Any:
        """The regularizer that produces ``loss_<term>``, or None when none is registered."""
        cache = self.__dict__.setdefault("_regularizers", {})
        if term not in cache:
            try:
                cache[term] = find(registry_name(term), "regularizer")({}, cfg_key=f"{self._cfg_key}.loss.lambda_{term}")
            except RegistryError:
                cache[term] = None
        return cache[term]

    def compute_losses(self, batch: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Every active loss term of this step, unweighted, keyed ``loss_X``; and the random views' render."""
        specs = self.guidance_specs()
        modules = self.guidance_modules()
        ref = batch.get("ref")
        random_batch = {k: v for k, v in batch.items() if k != "ref"}
        view_sets = (["ref"] if any(s.views == "ref" for s in specs.values()) else []) + ["random"]
        if "ref" in view_sets and ref is None:
            names = [n for n, s in specs.items() if s.views == "ref"]
            raise ConfigError(f"guidance(s) {', '.join(names)} score the reference view, but the data module yields none; "
                              "use data_type: single-image-datamodule with image=PATH")
        losses: dict[str, Tensor] = {}
        self._diagnostics = {}
        out: dict[str, Any] = {}
        for views in view_sets:
            vb = ref if views == "ref" else random_batch
            out = self(vb)
            users = [n for n, s in specs.items() if s.views == views]
            needs = frozenset().union(*(type(modules[n]).requires(modules[n].cfg) for n in users)) if users else frozenset()
            inp = self.guidance_input(out, vb, ref, needs) if users else None
            for name in users:
                g_out = modules[name](inp)
                for k, v in g_out.losses.items():
                    losses[specs[name].loss_name(k)] = v
                for k, v in g_out.diagnostics.items():
                    self._diagnostics[k if name == MAIN_GUIDANCE else f"{name}_{k}"] = v
        for key, lam in self._weights_now.items():
            term = key[len("lambda_"):]
            if lam != 0.0 and f"loss_{term}" not in losses:
                reg = self.regularizer(term)
                if reg is not None:
                    value = reg(self, out, random_batch)
                    if value is not None:
                        losses[f"loss_{term}"] = value
        return losses, out

    # ------------------------------------------------------------------ the step

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        poll_threads()  # the automatic thread count follows the machine's load (lift3d.utils.threads)
        step = self.global_step
        idx = self.stage_at(step)
        if idx != self.stage_index:
            # A conversion draws random numbers too (the new geometry's initial weights): from (seed, step)
            # alone, so a run resumed right at the switch converts as the uninterrupted one did.
            self._seed_step(step, salt=1)
            self.enter_stage(idx, convert=True)
        # Noise and any other randomness depend on (seed, step) only: resume replays them exactly.
        self._seed_step(step)
        self.do_update_step(self.current_epoch, step)
        opt = self.optimizers()
        self.apply_lr_schedules(opt.optimizer, step)
        self._weights_now = {k: C(v, step) for k, v in self.loss_weights().items()}

        losses, out = self.compute_losses(batch)
        device = self.device
        total = torch.zeros((), device=device)
        for name, value in losses.items():
            lam_key = "lambda_" + name[len("loss_"):]
            if lam_key not in self._weights_now:
                raise ConfigError(
                    f"the {name!r} loss term has no weight: add {self._cfg_key}.loss.{lam_key} (0 disables it). "
                    f"Weights set: {', '.join(sorted(self._weights_now)) or '(none)'}"
                )
            lam = self._weights_now[lam_key]
            if lam == 0.0:
                continue
            if self.cfg.check_finite and not torch.isfinite(value.detach()).all():
                self._raise_non_finite(step, f"loss term {name!r}", value)
            total = total + lam * value
            self.log(f"train/{name}", value.detach(), prog_bar=False)
        for lam_key, lam in self._weights_now.items():
            if lam != 0.0 and "loss_" + lam_key[len("lambda_"):] not in losses:
                regs = ["loss_" + n[: -len(SUFFIX)].replace("-", "_") for n in registered("regularizer")]
                raise ConfigError(
                    f"{self._cfg_key}.loss.{lam_key} is {lam} in stage '{self.stage.name}' but no loss term "
                    f"'loss_{lam_key[len('lambda_'):]}' is produced; terms available: "
                    f"{', '.join(sorted(losses) + [r for r in regs if r not in losses])}"
                )
        if not total.requires_grad:
            raise ConfigError(f"stage '{self.stage.name}': the total loss does not depend on any trainable parameter")
        opt.zero_grad(set_to_none=True)
        self.manual_backward(total)
        if self.cfg.check_finite:
            for name, p in self._trainable_named_parameters():
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    self._raise_non_finite(step, f"gradient of {name}", p.grad)
        self._call_hook("post_backward", out)
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for _, p in self._trainable_named_parameters()],
                                           self.cfg.grad_clip)
        opt.step()
        self._call_hook("post_optimizer_step", opt.optimizer)
        if self.cfg.check_finite:
            # A learning rate that jumps (a schedule gone wrong) sends parameters to Inf or far beyond any
            # sane value with finite gradients; stop here, before a checkpoint could be taken of them.
            bad = diverged_parameter(self._trainable_named_parameters())
            if bad is not None:
                self._raise_diverged(step, opt.optimizer, *bad)
        self.log("train/loss", total.detach(), prog_bar=True)
        for k, v in self._diagnostics.items():
            if torch.is_tensor(v) and v.numel() == 1:
                self.log(f"train/{k}", v.detach().float())
        return total.detach()

    def _seed_step(self, step: int, salt: int = 0) -> None:
        """Seed every device's global generator from (seed, step, rank, salt)."""
        torch.manual_seed((self.seed * 1_000_003 + step * 7_919 + self.global_rank * 104_729 + 17 + salt * 65_537)
                          % (2**63 - 1))

    def _good_checkpoint(self, before_step: int) -> str:
        """The checkpoint an error should send the user to: saved before global step ``before_step``."""
        trainer = self._trainer
        for cb in (trainer.callbacks if trainer is not None else []):
            if isinstance(cb, LastCheckpoint):
                return cb.describe_good(before_step)
        return self.last_checkpoint or "none saved yet"

    def _raise_non_finite(self, step: int, what: str, value: Tensor) -> None:
        # The parameters this step started from gave the value: a checkpoint of them is no way back.
        raise NonFiniteLossError(
            f"non-finite {what} at step {step} (stage '{self.stage.name}'): {value.detach().flatten()[:4].tolist()}. "
            f"Training stopped before applying it. Last good checkpoint: {self._good_checkpoint(step)}. "
            "Lower the learning rate or check the loss weights, then resume from that checkpoint if there is one."
        )

    def _raise_diverged(self, step: int, optimizer: Any, name: str, p: Tensor) -> None:
        group = next((g for g in optimizer.param_groups if any(q is p for q in g["params"])), None)
        lr = "" if group is None else f" (learning rate of group {group.get('name', '?')!r}: {group['lr']:.3g})"
        raise NonFiniteLossError(
            f"{describe_parameter(name, p)} after the optimizer step of step {step} (stage '{self.stage.name}')"
            f"{lr}. Training stopped; no checkpoint holds these values. Last good checkpoint: "
            f"{self._good_checkpoint(step + 1)}. Lower the learning rate (check its schedule), then resume from "
            "that checkpoint if there is one."
        )


__all__ = ["TrainingStepMixin", "NonFiniteLossError"]
