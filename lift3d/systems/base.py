"""The base system: a LightningModule that builds a recipe's parts by name and runs its stages.

A system config pairs ``<slot>_type`` with ``<slot>`` for geometry, material, background, renderer,
guidance, prompt processor and exporter, plus any number of named guidances (``guidances``).
Every stage's slots, the exporter and the prompt processor are parsed strictly when the system is
built, so a typo anywhere in a recipe fails before training. What is parsed is built only when
needed: the scene and renderer at once; the guidances and the prompt processor (which load big
priors and text encoders) when training starts, never for ``--export`` or ``--test``.

The concerns live in their own files: :mod:`.stages` (stage plans and per-stage specs),
:mod:`.optimization` (the optimizer and learning-rate schedules), :mod:`.regularizers` (registered
loss terms computed from renders), :mod:`.step` (the training step and its sub-steps). Swapping the
geometry runs ``NewGeometry.create_from(old_geometry)`` inside the run; the stage index is saved in
checkpoints, so resuming mid-stage or across a switch rebuilds the right modules before weights
load. Optimization is manual, so stage switches, densification and the NaN guard stay in our hands.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn as nn

from lift3d.config import ConfigError, Provenance, parse_structured
from lift3d.registry import find, registered
from lift3d.systems.optimization import OptimizationMixin, OptimizerConfig
from lift3d.systems.stages import MAIN_GUIDANCE, MODULE_SLOTS, SCENE_SLOTS, GuidanceSpec, StageConfig, StagesMixin
from lift3d.systems.step import NonFiniteLossError, TrainingStepMixin
from lift3d.utils.base import Configurable


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
    guidance_type: str = ""
    """The main guidance (its terms are ``loss_X``); every recipe names one."""
    guidance: dict[str, Any] = field(default_factory=dict)
    guidances: dict[str, Any] = field(default_factory=dict)
    """Named guidances beside the main one: ``{name: {guidance_type, guidance, views}}``; their terms
    are ``loss_<name>_X`` (e.g. a 3D prior next to a 2D one, or image-to-3D's reference view)."""
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


class BaseSystem(StagesMixin, OptimizationMixin, TrainingStepMixin, pl.LightningModule, Configurable):
    """Builds the parts, runs training steps with stages; subclasses add recipe-specific losses."""

    category = "system"
    Config = SystemConfig

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
        self.validate_config()
        self._build_scene(0)
        # Built on first use: guidances load big frozen priors that must not enter checkpoints.
        self.__dict__["_guidances"] = {}
        self.__dict__["_guidance_signatures"] = {}
        self.__dict__["_pending_guidance_states"] = {}
        self.__dict__["_prompt_processor"] = None
        self.__dict__["_prompt_signature"] = None
        self.__dict__["_prompt_stage"] = None
        self.__dict__["_prompt_utils"] = None
        self._test_frames: list[Any] = []

    # ------------------------------------------------------------------ start-up checks

    def _parse_slot(self, category: str, typ: str, conf: dict, key: str) -> tuple[type, Any]:
        if not typ:
            raise ConfigError(f"{key}_type is not set; registered {category} modules: {', '.join(registered(category))}")
        cls = find(typ, category)
        return cls, parse_structured(cls.Config, conf, key=key, prov=self._prov, owner=typ)

    def validate_config(self) -> None:
        """Parse every stage's slots, the prompt processor and the exporter strictly, and check that
        each guidance gets what it requires; raises ConfigError naming the key."""
        self._parse_slot("exporter", self.cfg.exporter_type, self.cfg.exporter, f"{self._cfg_key}.exporter")
        for idx in range(len(self.stages)):
            self._parse_slot("prompt-processor", *self.slot_spec(idx, "prompt_processor"))
            parsed = {slot: self._parse_slot(slot, *self.slot_spec(idx, slot)) for slot in SCENE_SLOTS + ("renderer",)}
            if idx == 0:  # later stages' geometries come from conversions or checkpoints, never from a sample
                self._check_init_guidance(idx, *parsed["geometry"])
            for spec in self.guidance_specs(idx).values():
                cls, gcfg = self._parse_slot("guidance", spec.type, spec.config, spec.key)
                needs = cls.requires(gcfg)
                r_cls, r_cfg = parsed["renderer"]
                if "normals" in needs and not r_cls.provides_normals(r_cfg, parsed["material"][0]):
                    raise ConfigError(
                        f"{spec.key}: guidance {spec.type!r} scores normal maps, but renderer {r_cls.registry_name!r} "
                        f"in stage '{self.stages[idx].name}' returns none (comp_normal); use a renderer that does "
                        "(mesh-rasterizer, neus-volume-renderer, or nerf-volume-renderer with return_comp_normal: true)")
                if "points" in needs and not hasattr(parsed["geometry"][0], "guidance_points"):
                    raise ConfigError(
                        f"{spec.key}: guidance {spec.type!r} scores the geometry's points, but geometry "
                        f"{parsed['geometry'][0].registry_name!r} in stage '{self.stages[idx].name}' has none "
                        "(use gaussian-splatting)")

    def _check_init_guidance(self, idx: int, geo_cls: type, geo_cfg: Any) -> None:
        """``init: guidance:NAME`` must name a guidance of the stage that can sample a point cloud."""
        name = geo_cls.init_guidance(geo_cfg) if hasattr(geo_cls, "init_guidance") else None
        if name is None:
            return
        key = self.slot_spec(idx, "geometry")[2]
        specs = self.guidance_specs(idx)
        if name not in specs:
            raise ConfigError(f"{key}.init: 'guidance:{name}' names no guidance of stage '{self.stages[idx].name}'; "
                              f"its guidances: {', '.join(specs)} ('{MAIN_GUIDANCE}' is the main one)")
        cls = find(specs[name].type, "guidance")
        if not callable(getattr(cls, "sample_init_points", None)):
            raise ConfigError(f"{key}.init: guidance '{name}' ({specs[name].type}) cannot sample an initial point "
                              "cloud (it has no sample_init_points); use one that can, such as point-e-guidance")

    def init_geometry_from_guidance(self) -> None:
        """``init: guidance:NAME``: give a geometry that waits for its initial cloud the one guidance NAME samples
        for the prompt, then rebuild the optimizers around the new parameters. Called when training starts;
        a resumed run's geometry has its checkpoint's Gaussians and waits for nothing. The sample depends on
        the seed alone (the global generators are forked and seeded around it)."""
        name = getattr(self.geometry, "pending_init", None)
        if not name:
            return
        guidance = self.guidance_modules()[name]
        prompt = getattr(self.prompt_processor.cfg, "prompt", None)
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self.seed)
            xyz, rgb = guidance.sample_init_points(prompt)
        self.geometry.init_from_points(xyz, rgb)
        self.geometry.to(self.device)
        msg = f"[lift3d] {self.geometry.num_points} initial Gaussians from guidance '{name}'"
        if self._trainer is not None:
            self.print(msg)
            self.trainer.strategy.setup_optimizers(self.trainer)
        else:
            print(msg)

    def check_training(self, datamodule: Any) -> None:
        """Everything a training run needs beyond the config's shape, checked before any folder is made:
        the data yields what the guidances read, and the prompt processor accepts the prompt (building
        it is cheap: encoders load when embeddings are first asked for). The launcher checks the weights
        before it builds the data module (:meth:`check_weights`)."""
        self.check_data(datamodule)
        self.check_optimizer_config()
        check = getattr(self.prompt_processor, "check_prompt", None)
        if callable(check):
            check()

    def check_weights(self) -> None:
        """Every guidance (each stage's) and the prompt processor find their pretrained weights on this
        machine; a MissingWeightsError naming the key, the id and the download command otherwise."""
        from lift3d.utils.hub import MissingWeightsError

        slots = []
        for idx in range(len(self.stages)):
            slots.append(("prompt-processor", *self.slot_spec(idx, "prompt_processor")))
            slots += [("guidance", spec.type, spec.config, spec.key) for spec in self.guidance_specs(idx).values()]
        for category, typ, conf, key in slots:
            cls, cfg = self._parse_slot(category, typ, conf, key)
            check = getattr(cls, "missing_weights", None)
            msg = check(cfg) if callable(check) else None
            if msg:
                via = self._prov._via if self._prov is not None else {}
                tops = sorted({v for k, v in via.items() if k.startswith(key + ".") and "." not in v
                               and repr(getattr(cfg, k[len(key) + 1:], None)) in msg})
                if tops:  # ``pretrained_model_name_or_path: ${if_model}``: say which key to change
                    msg += (f" The recipe takes it from the top-level key {', '.join(tops)}: "
                            f"{tops[0]}=/path/to/folder on the command line redirects every module that reads it.")
                raise MissingWeightsError(msg)

    def check_checkpoint(self, checkpoint: dict[str, Any], source: str) -> None:
        """Load ``checkpoint`` into this system, or raise a ConfigError naming what does not fit.

        Run before a resumed run writes anything, so a checkpoint of another recipe (another system,
        stage layout, geometry or parameter shape) cannot leave a trial folder half rewritten.
        """
        info = checkpoint.get("lift3d")
        if not isinstance(info, dict):
            raise ConfigError(f"{source}: a Lightning checkpoint without lift3d's record (stage, guidance states); "
                              "only checkpoints written by a lift3d run can be resumed or exported")
        mine = getattr(type(self), "registry_name", type(self).__name__)
        if info.get("system_type") not in (None, mine):
            raise ConfigError(f"{source} was written by system {info['system_type']!r}, but the config builds "
                              f"{mine!r}: pass the recipe it was trained with (its trial's configs/parsed.yaml)")
        names = [s.name for s in self.stages]
        if info.get("stage_names") is not None and list(info["stage_names"]) != names:
            raise ConfigError(f"{source} has stages {list(info['stage_names'])} but the config has {names}: pass the "
                              "recipe it was trained with (its trial's configs/parsed.yaml)")
        step = int(checkpoint.get("global_step", 0))
        idx = int(info.get("stage_index", 0))
        if self.cfg.stages and idx < len(names):
            # A save at a stage's last step is still in that stage: the switch happens at the next step.
            expected = self.stage_at(step)
            if idx not in (expected, self.stage_at(max(step - 1, 0))):
                raise ConfigError(
                    f"{source} is at step {step} in stage '{names[idx]}', but with this config's stage lengths "
                    f"({', '.join(f'{s.name}: {s.steps}' for s in self.stages)}) step {step} falls in stage "
                    f"'{names[expected]}'; keep the earlier stages' steps as they were trained")
        try:
            self.on_load_checkpoint(checkpoint)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        ours = self.state_dict()
        theirs = checkpoint["state_dict"]
        missing = [k for k in ours if k not in theirs]
        unexpected = [k for k in theirs if k not in ours]
        if missing or unexpected:
            def few(keys: list[str]) -> str:
                return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
            parts = ([f"parameters the config has but the checkpoint lacks: {few(missing)}"] if missing else []) + \
                    ([f"parameters in the checkpoint the config does not have: {few(unexpected)}"] if unexpected else [])
            raise ConfigError(f"{source} does not fit this config ({'; '.join(parts)}): was it trained with "
                              "another recipe? Pass that recipe (its trial's configs/parsed.yaml)")
        try:
            self.load_state_dict(theirs, strict=True)
        except RuntimeError as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
            detail = "; ".join(lines[:4]) or str(exc).splitlines()[0]
            raise ConfigError(f"{source} does not fit this config: {detail}; was it trained with other settings "
                              "(resolution, grid size, network width)? Pass that recipe") from None

    @property
    def output_step(self) -> int:
        """The step that names output folders (``it<step>-test``): the training step, or the loaded
        checkpoint's step when rendering or exporting one outside training."""
        return max(int(self.global_step), int(self.__dict__.get("_loaded_step", 0)))

    def check_data(self, datamodule: Any) -> None:
        """Check at start-up that the data module yields what the guidances read."""
        provides_ref = bool(getattr(datamodule, "provides_reference", False))
        data_views = getattr(getattr(datamodule, "cfg", None), "n_views", None)
        for idx in range(len(self.stages)):
            for spec in self.guidance_specs(idx).values():
                cls = find(spec.type, "guidance")
                gcfg = parse_structured(cls.Config, spec.config, key=spec.key, prov=self._prov)
                needs = cls.requires(gcfg)
                group = getattr(gcfg, "n_views", None)
                if spec.views != "ref" and isinstance(group, int) and data_views is not None and group != data_views:
                    raise ConfigError(
                        f"{spec.key}.n_views: guidance {spec.type!r} scores views in groups of {group}, but the data "
                        f"module samples groups of data.n_views = {data_views}; set data.n_views: {group} and "
                        f"data.batch_size to a multiple of it")
                if (spec.views == "ref" or "cond_image" in needs) and not provides_ref:
                    raise ConfigError(
                        f"{spec.key}: guidance {spec.type!r} needs a reference image, but data_type "
                        f"{getattr(type(datamodule), 'registry_name', type(datamodule).__name__)!r} yields none; "
                        "use data_type: single-image-datamodule and image=PATH")

    # ------------------------------------------------------------------ building

    def _build(self, slot: str, idx: int) -> nn.Module:
        typ, conf, key = self.slot_spec(idx, slot)
        cls = find(typ, slot)
        kwargs: dict[str, Any] = {}
        if slot == "renderer":
            kwargs = {"geometry": self.geometry, "material": self.material, "background": self.background}
        return cls(conf, cfg_key=key, prov=self._prov, **kwargs)

    def _build_scene(self, idx: int) -> None:
        for slot in SCENE_SLOTS:
            setattr(self, slot, self._build(slot, idx))
        self.renderer = self._build("renderer", idx)

    def _build_guidance(self, spec: GuidanceSpec) -> nn.Module:
        g = find(spec.type, "guidance")(spec.config, cfg_key=spec.key, prov=self._prov).to(self.device)
        state = self._pending_guidance_states.pop(spec.name, None)
        if state:
            g.load_state_dict(state, strict=False)
        g.update_step(self.current_epoch if self._trainer is not None else 0, self.global_step)
        return g

    def guidance_modules(self) -> dict[str, nn.Module]:
        """The current stage's guidances by name, built on first use (in spec order)."""
        specs = self.guidance_specs()
        for name in [n for n in self._guidances if n not in specs]:
            del self._guidances[name]
        for name, spec in specs.items():
            if name not in self._guidances or self._guidance_signatures.get(name) != spec.signature:
                self._guidances[name] = self._build_guidance(spec)
                self._guidance_signatures[name] = spec.signature
        return {n: self._guidances[n] for n in specs}

    @property
    def guidance(self) -> nn.Module:
        """The main guidance (built on first use)."""
        return self.guidance_modules()[MAIN_GUIDANCE]

    @property
    def prompt_processor(self) -> Any:
        """The current stage's prompt processor, built on first use and again when a stage changes it
        (its type or settings); the last one is kept while the stages agree."""
        if self._prompt_processor is not None and self._prompt_stage == self.stage_index:
            return self._prompt_processor  # every step asks: the stage's spec is compared once per stage
        typ, conf, key = self.slot_spec(self.stage_index, "prompt_processor")
        sig = (typ, repr(conf))
        if self._prompt_processor is None or self._prompt_signature != sig:
            self.__dict__["_prompt_processor"] = find(typ, "prompt-processor")(conf, cfg_key=key, prov=self._prov)
            self.__dict__["_prompt_signature"] = sig
            self.__dict__["_prompt_utils"] = None
        self.__dict__["_prompt_stage"] = self.stage_index
        return self._prompt_processor

    @property
    def prompt_utils(self) -> Any:
        """The current prompt processor's output, computed once per processor (at fit start, at a
        stage switch that changes the processor, or when a guidance first asks)."""
        processor = self.prompt_processor
        if self._prompt_utils is None:
            out = processor()
            self.__dict__["_prompt_utils"] = out.to(self.device) if hasattr(out, "to") else out
        return self._prompt_utils

    def enter_stage(self, idx: int, convert: bool = True) -> None:
        """Switch to stage ``idx``: rebuild changed slots, converting the geometry if ``convert``."""
        old = self.stage_index
        if idx == old:
            return
        changed = {slot for slot in MODULE_SLOTS + ("prompt_processor",) if slot != "guidance"
                   and self.slot_spec(idx, slot)[:2] != self.slot_spec(old, slot)[:2]}
        old_g, new_g = self.guidance_specs(old), self.guidance_specs(idx)
        changed |= {f"guidance:{n}" if n != MAIN_GUIDANCE else "guidance" for n in set(old_g) | set(new_g)
                    if n not in old_g or n not in new_g or old_g[n].signature != new_g[n].signature}
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
        training = self._trainer is not None and self.trainer.training
        if training:
            if "prompt_processor" in changed:
                self.prompt_utils  # noqa: B018  (the new stage's embeddings, before its first step)
            self.guidance_modules()  # the new stage's guidances, before its first step's update hooks
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

    # ------------------------------------------------------------------ hooks

    def _hooked_modules(self) -> list[Any]:
        return [self.geometry, self.material, self.background, self.renderer, *self._guidances.values()]

    def modules_to_update(self) -> list[Any]:
        out, seen = [], set()
        for m in self._hooked_modules():
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
        for m in self._hooked_modules():
            fn = getattr(m, name, None)
            if callable(fn):
                fn(*args)

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.renderer(**batch)

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
        save_image_grid(self._save_path(f"it{self.output_step}-val", f"{batch['index']}.png"), [self._panels(out)])

    def on_test_epoch_start(self) -> None:
        self._test_frames = []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        from lift3d.utils.io import image_grid, save_image

        out = self(batch)
        frame = image_grid([self._panels(out)])
        save_image(self._save_path(f"it{self.output_step}-test", f"{batch['index']:03d}.png"), frame)
        self._test_frames.append(frame)

    def on_test_epoch_end(self) -> None:
        from lift3d.utils.io import write_video

        if self._test_frames:
            path = self._save_path(f"it{self.output_step}-test.mp4")
            write_video(path, self._test_frames, fps=30)
            self.print(f"[lift3d] turntable video: {path}")
        self._test_frames = []

    def export(self, out_dir: str | Path) -> dict[str, Path]:
        exporter = find(self.cfg.exporter_type, "exporter")(
            self.cfg.exporter, cfg_key=f"{self._cfg_key}.exporter", prov=self._prov
        )
        with torch.no_grad():
            return exporter.export_checked(self.geometry, self.material, Path(out_dir), renderer=self.renderer)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Every parameter a checkpoint holds: the system's and the trainable guidances' (VSD's LoRA),
        which the checkpoint callback checks for divergence before it writes."""
        out = list(self.named_parameters())
        for name, g in self._guidances.items():
            out += [(f"guidance:{name}.{n}", p) for n, p in g.named_parameters() if p.requires_grad]
        return out

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Only guidances with trainable state (VSD's LoRA) are saved; frozen priors never are.
        states = dict(self._pending_guidance_states)
        for name, g in self._guidances.items():
            if any(p.requires_grad for p in g.parameters()):
                states[name] = dict(g.state_dict())
        checkpoint["lift3d"] = {
            "system_type": getattr(type(self), "registry_name", type(self).__name__),
            "stage_names": [s.name for s in self.stages],
            "stage_index": self.stage_index,
            "stage_name": self.stage.name,
            "guidance_states": states,
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
        states = dict(info.get("guidance_states") or {})
        if info.get("guidance_state"):  # checkpoints written before named guidances
            states[MAIN_GUIDANCE] = info["guidance_state"]
        for name, state in states.items():
            if name in self._guidances:
                self._guidances[name].load_state_dict(state, strict=False)
            else:  # applied when the guidance is built (only training builds it)
                self._pending_guidance_states[name] = state
        step = int(checkpoint.get("global_step", 0))
        self.__dict__["_loaded_step"] = step
        self.do_update_step(int(checkpoint.get("epoch", 0)), step, on_load_weights=True)

    def on_fit_start(self) -> None:
        self.prompt_utils  # noqa: B018  (computed once, before the first step)
        self.guidance_modules()
        for g in self._guidances.values():
            g.to(self.device)
        self.init_geometry_from_guidance()

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        Configurable.update_step(self, epoch, global_step, on_load_weights)


__all__ = ["BaseSystem", "SystemConfig", "StageConfig", "OptimizerConfig", "NonFiniteLossError"]
