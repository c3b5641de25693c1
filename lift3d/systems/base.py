"""The base system: a LightningModule that builds a recipe's parts by name and runs its stages.

A system config pairs ``<slot>_type`` with ``<slot>`` for geometry, material, background, renderer,
guidance, prompt processor and exporter. ``stages`` splits one run into phases (coarse NeRF, then
DMTet refinement, ...); each stage may swap any slot, change loss weights, the optimizer, frozen
slots and (read by the datamodule) data settings. Swapping the geometry runs
``NewGeometry.create_from(old_geometry)`` inside the run; the stage index is saved in checkpoints,
so resuming mid-stage or across a switch rebuilds the right modules before weights load.

Optimization is manual (one optimizer with a parameter group per configured module path) so that
stage switches, densification and the NaN guard are in our hands, not hidden in a loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
import torch.nn as nn
from torch import Tensor

from lift3d.config import C, ConfigError, Provenance, Schedule, merge_dicts, parse_structured
from lift3d.registry import find
from lift3d.utils.base import Configurable

SCENE_SLOTS = ("geometry", "material", "background")
MODULE_SLOTS = ("geometry", "material", "background", "renderer", "guidance")


class NonFiniteLossError(RuntimeError):
    """A loss term or gradient became NaN or Inf; training stops instead of learning garbage."""


@dataclass
class OptimizerConfig:
    name: str = "Adam"
    """A class in torch.optim (Adam, AdamW, SGD, ...)."""
    args: dict[str, Any] = field(default_factory=lambda: {"lr": 0.01, "betas": [0.9, 0.99], "eps": 1e-15})
    """Keyword arguments of the optimizer; ``lr`` is the default for parameters no group claims."""
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Parameter groups by module path (``geometry.encoding``, ``background``) -> {lr: ..., ...}.
    A parameter joins the longest path that contains it. ``lr`` may be a schedule."""


@dataclass
class StageConfig:
    name: str = "main"
    """Stage name, shown in the progress bar and logs."""
    steps: int = 1000
    """Number of optimizer steps in this stage."""
    geometry_type: Optional[str] = None
    """Swap the geometry (converted from the previous one with ``create_from``)."""
    geometry: Optional[dict[str, Any]] = None
    """Geometry config: merged over the current one if the type is unchanged, else used alone."""
    material_type: Optional[str] = None
    material: Optional[dict[str, Any]] = None
    background_type: Optional[str] = None
    background: Optional[dict[str, Any]] = None
    renderer_type: Optional[str] = None
    renderer: Optional[dict[str, Any]] = None
    guidance_type: Optional[str] = None
    guidance: Optional[dict[str, Any]] = None
    loss: dict[str, Any] = field(default_factory=dict)
    """Loss weights merged over the system's (and earlier stages')."""
    optimizer: Optional[dict[str, Any]] = None
    """Optimizer settings merged over the current ones."""
    freeze: list[str] = field(default_factory=list)
    """Slots whose parameters are not optimized in this stage (e.g. [geometry])."""
    data: dict[str, Any] = field(default_factory=dict)
    """Data settings for this stage (resolution, batch size, ...), read by the datamodule."""


@dataclass
class SystemConfig:
    geometry_type: str = "implicit-volume"
    geometry: dict[str, Any] = field(default_factory=dict)
    material_type: str = "diffuse-with-point-light-material"
    material: dict[str, Any] = field(default_factory=dict)
    background_type: str = "solid-color-background"
    background: dict[str, Any] = field(default_factory=dict)
    renderer_type: str = "nerf-volume-renderer"
    renderer: dict[str, Any] = field(default_factory=dict)
    guidance_type: str = "toyworld-reference-guidance"
    guidance: dict[str, Any] = field(default_factory=dict)
    prompt_processor_type: str = "plain-prompt-processor"
    prompt_processor: dict[str, Any] = field(default_factory=dict)
    exporter_type: str = "mesh-exporter"
    exporter: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, Any] = field(default_factory=dict)
    """Weights ``lambda_X`` for each loss term ``loss_X`` (numbers or schedules; 0 disables)."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    stages: list[StageConfig] = field(default_factory=list)
    """Phases of the run; empty means one stage lasting ``trainer.max_steps``."""
    grad_clip: Optional[float] = None
    """Clip the global gradient norm to this value."""
    opaque_split: float = 0.5
    """The rendered opacity that the opacity term (``lambda_opaque``) treats as the boundary between
    empty and solid: above it a pixel is pushed to 1, below it to 0. On a black background a faint
    surface renders like a dim solid one, so a split below 0.5 keeps a fading surface instead of
    erasing it (0 < split < 1)."""
    check_finite: bool = True
    """Stop with a clear error on a NaN/Inf loss term or gradient."""


def _norm_key(k: str) -> str:
    return k if k.startswith("lambda_") else f"lambda_{k}"


class BaseSystem(pl.LightningModule, Configurable):
    """Builds the parts, runs training steps with stages; subclasses add recipe-specific losses."""

    category = "system"
    Config = SystemConfig

    #: Regularizer name -> function(system, render_out, batch) -> scalar Tensor or None.
    regularizers: dict[str, Callable[["BaseSystem", dict, dict], Tensor | None]] = {}

    def __init__(self, cfg: Any = None, *, cfg_key: str = "system", prov: Provenance | None = None,
                 resumed: bool = False, seed: int = 0, save_dir: str | Path | None = None):
        pl.LightningModule.__init__(self)
        self._parse_cfg(cfg, cfg_key, prov)
        self._prov = prov
        self._cfg_key = cfg_key
        self.seed = seed
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.automatic_optimization = False
        self.last_checkpoint: str | None = None
        self._check_stages()
        self.stage_index = 0
        self._build_all(0)
        self.prompt_processor = find(self.cfg.prompt_processor_type, "prompt-processor")(
            self.cfg.prompt_processor, cfg_key=f"{cfg_key}.prompt_processor", prov=prov
        )
        self.prompt_utils = self.prompt_processor()
        self._test_frames: list[Any] = []

    # ------------------------------------------------------------------ stages

    def _check_stages(self) -> None:
        names = [s.name for s in self.cfg.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"{self._cfg_key}.stages: stage names must be unique, got {names}")
        for i, s in enumerate(self.cfg.stages):
            if s.steps <= 0:
                raise ConfigError(f"{self._cfg_key}.stages[{i}] ('{s.name}'): steps must be positive, got {s.steps}")
            for slot in s.freeze:
                if slot not in MODULE_SLOTS:
                    raise ConfigError(
                        f"{self._cfg_key}.stages[{i}].freeze: unknown slot {slot!r}; valid: {', '.join(MODULE_SLOTS)}"
                    )

    @property
    def stages(self) -> list[StageConfig]:
        return self.cfg.stages or [StageConfig(name="main", steps=10**12)]

    @property
    def total_steps(self) -> int | None:
        return sum(s.steps for s in self.cfg.stages) if self.cfg.stages else None

    def stage_starts(self) -> list[int]:
        starts, acc = [], 0
        for s in self.stages:
            starts.append(acc)
            acc += s.steps
        return starts

    def stage_at(self, step: int) -> int:
        idx = 0
        for i, start in enumerate(self.stage_starts()):
            if step >= start:
                idx = i
        return idx

    @property
    def stage(self) -> StageConfig:
        return self.stages[self.stage_index]

    def slot_spec(self, idx: int, slot: str) -> tuple[str, dict, str]:
        """(type, config, config key) of ``slot`` in stage ``idx``: stages apply cumulatively."""
        typ = getattr(self.cfg, f"{slot}_type")
        conf = dict(getattr(self.cfg, slot))
        key = f"{self._cfg_key}.{slot}"
        for i in range(idx + 1 if self.cfg.stages else 0):
            st = self.cfg.stages[i]
            new_type, new_conf = getattr(st, f"{slot}_type"), getattr(st, slot)
            if new_type is not None and new_type != typ:
                typ, conf, key = new_type, dict(new_conf or {}), f"{self._cfg_key}.stages[{i}].{slot}"
            elif new_conf:
                conf, key = merge_dicts(conf, new_conf), f"{self._cfg_key}.stages[{i}].{slot}"
        return typ, conf, key

    def loss_weights(self, idx: int | None = None) -> dict[str, Any]:
        idx = self.stage_index if idx is None else idx
        raw = {_norm_key(k): v for k, v in self.cfg.loss.items()}
        for i in range(idx + 1 if self.cfg.stages else 0):
            raw.update({_norm_key(k): v for k, v in self.cfg.stages[i].loss.items()})
        out = {}
        for k, v in raw.items():
            try:
                out[k] = Schedule.parse(v)
            except ValueError as exc:
                raise ConfigError(f"{self._cfg_key}.loss.{k}: {exc}") from None
        return out

    def optimizer_config(self, idx: int | None = None) -> OptimizerConfig:
        idx = self.stage_index if idx is None else idx
        base = {"name": self.cfg.optimizer.name, "args": self.cfg.optimizer.args, "params": self.cfg.optimizer.params}
        for i in range(idx + 1 if self.cfg.stages else 0):
            if self.cfg.stages[i].optimizer:
                base = merge_dicts(base, self.cfg.stages[i].optimizer)
        return parse_structured(OptimizerConfig, base, key=f"{self._cfg_key}.optimizer", prov=self._prov)

    def _build(self, slot: str, idx: int) -> nn.Module:
        typ, conf, key = self.slot_spec(idx, slot)
        cls = find(typ, slot)
        kwargs: dict[str, Any] = {}
        if slot == "renderer":
            kwargs = {"geometry": self.geometry, "material": self.material, "background": self.background}
        return cls(conf, cfg_key=key, prov=self._prov, **kwargs)

    def _build_all(self, idx: int) -> None:
        for slot in SCENE_SLOTS:
            setattr(self, slot, self._build(slot, idx))
        self.renderer = self._build("renderer", idx)
        # The guidance is kept outside the module tree: big frozen priors must not enter
        # checkpoints; its trainable state (e.g. a LoRA) is saved explicitly.
        self.__dict__["guidance"] = self._build("guidance", idx)

    def enter_stage(self, idx: int, convert: bool = True) -> None:
        """Switch to stage ``idx``: rebuild changed slots, converting the geometry if ``convert``."""
        old = self.stage_index
        if idx == old:
            return
        changed = set()
        for slot in MODULE_SLOTS:
            if self.slot_spec(idx, slot)[:2] != self.slot_spec(old, slot)[:2]:
                changed.add(slot)
        if "geometry" in changed:
            typ, conf, key = self.slot_spec(idx, "geometry")
            cls = find(typ, "geometry")
            if convert:
                new_geo = cls.create_from(self.geometry, conf, cfg_key=key, prov=self._prov)
            else:
                new_geo = cls(conf, cfg_key=key, prov=self._prov)
            self.geometry = new_geo.to(self.device)
        for slot in ("material", "background"):
            if slot in changed:
                setattr(self, slot, self._build(slot, idx).to(self.device))
        self.stage_index = idx
        if "renderer" in changed:
            self.renderer = self._build("renderer", idx).to(self.device)
        else:
            self.renderer.set_scene(self.geometry, self.material, self.background)
        if "guidance" in changed:
            self.__dict__["guidance"] = self._build("guidance", idx).to(self.device)
        if self._trainer is not None and self.trainer.training:
            self.trainer.strategy.setup_optimizers(self.trainer)
            # Lightning attaches its step counting to the optimizers when the loop starts: attach it
            # to the new ones now, or the first step of the stage would not advance global_step.
            self.trainer.fit_loop.epoch_loop.manual_optimization.on_run_start()
        msg = f"[lift3d] stage {old} '{self.stages[old].name}' -> {idx} '{self.stage.name}'" + (
            f" (rebuilt: {', '.join(sorted(changed))})" if changed else "")
        if self._trainer is not None:
            self.print(msg)
        else:  # loading a checkpoint for --export, outside any Trainer
            print(msg)

    # ------------------------------------------------------------------ optimizer

    def _trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        frozen = set(self.stage.freeze) if self.cfg.stages else set()
        out = []
        for slot in ("geometry", "material", "background", "renderer"):
            if slot in frozen:
                continue
            for n, p in getattr(self, slot).named_parameters():
                if p.requires_grad:
                    out.append((f"{slot}.{n}", p))
        return out

    def configure_optimizers(self) -> torch.optim.Optimizer:
        ocfg = self.optimizer_config()
        params = self._trainable_named_parameters()
        paths = sorted(ocfg.params, key=len, reverse=True)
        groups: dict[str, list[nn.Parameter]] = {p: [] for p in ocfg.params}
        default: list[tuple[str, nn.Parameter]] = []
        for name, p in params:
            owner = next((k for k in paths if name == k or name.startswith(k + ".")), None)
            if owner is None:
                default.append((name, p))
            else:
                groups[owner].append(p)
        param_groups = []
        self._lr_schedules: list[Any] = []
        for path in ocfg.params:
            if groups[path]:
                g = dict(ocfg.params[path])
                lr = Schedule.parse(g.pop("lr", ocfg.args.get("lr", 1e-3)))
                param_groups.append({"params": groups[path], "name": path, "lr": C(lr, self.global_step), **g})
                self._lr_schedules.append(lr)
        if default:
            if "lr" not in ocfg.args:
                names = ", ".join(n for n, _ in default[:8])
                raise ConfigError(
                    f"{self._cfg_key}.optimizer: parameters {names} belong to no group in optimizer.params and "
                    "optimizer.args has no default lr; add a group for them or set optimizer.args.lr"
                )
            lr = Schedule.parse(ocfg.args["lr"])
            param_groups.append({"params": [p for _, p in default], "name": "default", "lr": C(lr, self.global_step)})
            self._lr_schedules.append(lr)
        if not param_groups:  # nothing to train (e.g. a frozen stage): keep Lightning's loop valid
            param_groups.append({"params": [nn.Parameter(torch.zeros(1, device=self.device))], "name": "empty", "lr": 0.0})
            self._lr_schedules.append(0.0)
        if not hasattr(torch.optim, ocfg.name):
            raise ConfigError(f"{self._cfg_key}.optimizer.name: {ocfg.name!r} is not a torch.optim optimizer")
        args = {k: (tuple(v) if isinstance(v, list) else v) for k, v in ocfg.args.items() if k != "lr"}
        return getattr(torch.optim, ocfg.name)(param_groups, **args)

    # ------------------------------------------------------------------ steps

    def modules_to_update(self) -> list[Any]:
        mods = [self.geometry, self.material, self.background, self.renderer, self.guidance]
        out, seen = [], set()
        for m in mods:
            for sub in (m.modules() if isinstance(m, nn.Module) else [m]):
                if isinstance(sub, Configurable) and id(sub) not in seen:
                    seen.add(id(sub))
                    out.append(sub)
        return out

    def do_update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        for m in self.modules_to_update():
            m.update_step(epoch, global_step, on_load_weights=on_load_weights)
        self.update_step(epoch, global_step, on_load_weights)

    def _call_hook(self, name: str, *args: Any) -> None:
        for m in (self.geometry, self.material, self.background, self.renderer, self.guidance):
            fn = getattr(m, name, None)
            if callable(fn):
                fn(*args)

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.renderer(**batch)

    def compute_losses(self, out: dict, batch: dict) -> dict[str, Tensor]:
        """Guidance loss terms plus active regularizers, unweighted, keyed ``loss_X``."""
        weights = self._weights_now
        g_out = self.guidance(out["comp_rgb"], self.prompt_utils, **batch, opacity=out.get("opacity"),
                              comp_normal=out.get("comp_normal"))
        losses = {k: v for k, v in g_out.items() if k.startswith("loss_")}
        self._diagnostics = {k: v for k, v in g_out.items() if not k.startswith("loss_")}
        for name, fn in self.regularizers.items():
            if weights.get(f"lambda_{name}", 0.0) != 0.0 and f"loss_{name}" not in losses:
                value = fn(self, out, batch)
                if value is not None:
                    losses[f"loss_{name}"] = value
        return losses

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        step = self.global_step
        idx = self.stage_at(step)
        if idx != self.stage_index:
            self.enter_stage(idx, convert=True)
        # Noise and any other randomness depend on (seed, step) only: resume replays them exactly.
        torch.manual_seed((self.seed * 1_000_003 + step * 7_919 + self.global_rank * 104_729 + 17) % (2**63 - 1))
        self.do_update_step(self.current_epoch, step)
        opt = self.optimizers()
        for group, lr in zip(opt.optimizer.param_groups, self._lr_schedules):
            group["lr"] = C(lr, step)
        self._weights_now = {k: C(v, step) for k, v in self.loss_weights().items()}

        out = self(batch)
        losses = self.compute_losses(out, batch)
        total = torch.zeros((), device=self.device)
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
                raise ConfigError(
                    f"{self._cfg_key}.loss.{lam_key} is {lam} in stage '{self.stage.name}' but no loss term "
                    f"'loss_{lam_key[len('lambda_'):]}' is produced; terms available: "
                    f"{', '.join(sorted(losses) + ['loss_' + r for r in self.regularizers if 'loss_' + r not in losses])}"
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
            torch.nn.utils.clip_grad_norm_([p for _, p in self._trainable_named_parameters()], self.cfg.grad_clip)
        opt.step()
        self._call_hook("post_optimizer_step", opt.optimizer)
        self.log("train/loss", total.detach(), prog_bar=True)
        for k, v in getattr(self, "_diagnostics", {}).items():
            if torch.is_tensor(v) and v.numel() == 1:
                self.log(f"train/{k}", v.detach().float())
        return total.detach()

    def _raise_non_finite(self, step: int, what: str, value: Tensor) -> None:
        last = self.last_checkpoint or "none saved yet"
        raise NonFiniteLossError(
            f"non-finite {what} at step {step} (stage '{self.stage.name}'): {value.detach().flatten()[:4].tolist()}. "
            f"Training stopped before applying it. Last good checkpoint: {last}. Lower the learning rate, "
            "check the loss weights, or resume from that checkpoint."
        )

    # ------------------------------------------------------------------ validation / test

    def _save_path(self, *parts: str) -> Path:
        base = self.save_dir or Path(self.trainer.default_root_dir) / "save"
        p = base.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def _panels(self, out: dict) -> list[Any]:
        panels = [out["comp_rgb"][0]]
        if out.get("comp_normal") is not None:
            panels.append(out["comp_normal"][0])
        panels.append(out["opacity"][0].expand(-1, -1, 3))
        return [p.detach().float().clamp(0, 1).cpu().numpy() for p in panels]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        from lift3d.utils.io import save_image_grid

        out = self(batch)
        save_image_grid(self._save_path(f"it{self.global_step}-val", f"{batch['index']}.png"), [self._panels(out)])

    def on_test_epoch_start(self) -> None:
        self._test_frames = []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        from lift3d.utils.io import image_grid, save_image

        out = self(batch)
        frame = image_grid([self._panels(out)])
        save_image(self._save_path(f"it{self.global_step}-test", f"{batch['index']:03d}.png"), frame)
        self._test_frames.append(frame)

    def on_test_epoch_end(self) -> None:
        from lift3d.utils.io import write_video

        if self._test_frames:
            path = self._save_path(f"it{self.global_step}-test.mp4")
            write_video(path, self._test_frames, fps=30)
            self.print(f"[lift3d] turntable video: {path}")
        self._test_frames = []

    def export(self, out_dir: str | Path) -> dict[str, Path]:
        exporter = find(self.cfg.exporter_type, "exporter")(
            self.cfg.exporter, cfg_key=f"{self._cfg_key}.exporter", prov=self._prov
        )
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            return exporter.export(self.geometry, self.material, out_dir)

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        g = self.guidance
        trainable = {k: v for k, v in g.state_dict().items()} if any(p.requires_grad for p in g.parameters()) else {}
        checkpoint["lift3d"] = {
            "stage_index": self.stage_index,
            "stage_name": self.stage.name,
            "guidance_state": trainable,
            "rng_cpu": torch.get_rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get("lift3d", {})
        idx = int(info.get("stage_index", 0))
        if idx >= len(self.stages):
            raise ConfigError(
                f"checkpoint is in stage {idx} ('{info.get('stage_name')}') but the config has only "
                f"{len(self.stages)} stage(s)"
            )
        if idx != self.stage_index:
            # Build the checkpoint's stage modules; their weights come from the state dict next.
            self.enter_stage(idx, convert=False)
        if info.get("guidance_state"):
            self.guidance.load_state_dict(info["guidance_state"], strict=False)
        step = int(checkpoint.get("global_step", 0))
        self.do_update_step(int(checkpoint.get("epoch", 0)), step, on_load_weights=True)

    def setup(self, stage: str) -> None:
        self.guidance.to(self.device)

    def on_fit_start(self) -> None:
        self.guidance.to(self.device)

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        Configurable.update_step(self, epoch, global_step, on_load_weights)


# ---------------------------------------------------------------------------------------------
# Regularizers every recipe may weight (0 or absent disables).


def _reg_sparsity(system: BaseSystem, out: dict, batch: dict) -> Tensor:
    # A soft L1 on opacity keeps empty space empty (Magic3D/threestudio style).
    return torch.sqrt(out["opacity"] ** 2 + 0.01).mean()


def _reg_opaque(system: BaseSystem, out: dict, batch: dict) -> Tensor:
    # Binary entropy of the opacity, its maximum moved from 0.5 to ``opaque_split`` by o -> o^k.
    split = float(system.cfg.opaque_split)
    if not 0.0 < split < 1.0:
        raise ConfigError(f"system.opaque_split must be strictly between 0 and 1, got {split}")
    o = out["opacity"].clamp(1e-4, 1 - 1e-4)
    if split != 0.5:
        o = (o ** (math.log(0.5) / math.log(split))).clamp(1e-4, 1 - 1e-4)
    return -(o * torch.log(o) + (1 - o) * torch.log(1 - o)).mean()


def _reg_orient(system: BaseSystem, out: dict, batch: dict) -> Tensor | None:
    # DreamFusion's orientation loss: normals facing away from the camera are penalized by weight.
    if "weights" not in out or "normal" not in out or "t_dirs" not in out:
        raise ConfigError(
            f"loss.lambda_orient needs per-sample 'weights', 'normal' and 't_dirs' from the renderer; "
            f"'{getattr(type(system.renderer), 'registry_name', '?')}' does not return them (set lambda_orient to 0)"
        )
    w, n, d = out["weights"].detach(), out["normal"], out["t_dirs"]
    return (w * torch.relu((n * d).sum(-1, keepdim=True)) ** 2).sum() / max(out["opacity"].numel(), 1)


def _reg_eikonal(system: BaseSystem, out: dict, batch: dict) -> Tensor:
    # SDF gradients have unit norm (Gropp et al. 2020); NeuS renders return them per sample.
    if "sdf_grad" not in out:
        raise ConfigError(
            "loss.lambda_eikonal needs per-sample 'sdf_grad' from an SDF renderer (neus-volume-renderer with an "
            "implicit-sdf geometry whose normal_type is not 'pred'); set it to 0 otherwise"
        )
    return ((out["sdf_grad"].norm(dim=-1) - 1.0) ** 2).mean()


def _mesh_of(system: BaseSystem, out: dict, what: str) -> Any:
    mesh = out.get("mesh")
    if mesh is None:
        raise ConfigError(f"loss.lambda_{what} needs a mesh render (out['mesh']); set it to 0 for this stage")
    return mesh


def _reg_normal_consistency(system: BaseSystem, out: dict, batch: dict) -> Tensor:
    from lift3d.utils.mesh_losses import normal_consistency

    return normal_consistency(_mesh_of(system, out, "normal_consistency"))


def _reg_laplacian_smoothness(system: BaseSystem, out: dict, batch: dict) -> Tensor:
    from lift3d.utils.mesh_losses import laplacian_smoothness

    return laplacian_smoothness(_mesh_of(system, out, "laplacian_smoothness"))


BaseSystem.regularizers = {
    "sparsity": _reg_sparsity,
    "opaque": _reg_opaque,
    "orient": _reg_orient,
    "eikonal": _reg_eikonal,
    "normal_consistency": _reg_normal_consistency,
    "laplacian_smoothness": _reg_laplacian_smoothness,
}

__all__ = ["BaseSystem", "SystemConfig", "StageConfig", "OptimizerConfig", "NonFiniteLossError"]
