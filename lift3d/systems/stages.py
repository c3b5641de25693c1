"""Stages: one run split into phases, each able to swap any slot, loss weights, optimizer and data.

A stage's settings apply on top of the system's and of every earlier stage's (cumulatively), so
``slot_spec(i, slot)`` is the (type, config, config key) the slot has in stage ``i``. Guidances
are slots too: the main one (``guidance_type`` / ``guidance``, loss terms ``loss_X``) and any
number of named ones under ``guidances`` (loss terms ``loss_<name>_X``), each scoring either the
random training views or the reference view of an image-to-3D batch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from lift3d.config import ConfigError, Schedule, merge_dicts, parse_structured

SCENE_SLOTS = ("geometry", "material", "background")
MODULE_SLOTS = ("geometry", "material", "background", "renderer", "guidance")
MAIN_GUIDANCE = "guidance"
_GUIDANCE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass
class GuidanceSlotConfig:
    """A named guidance beside the main one (``system.guidances.<name>``)."""

    guidance_type: str = ""
    """Registered name of the guidance."""
    guidance: dict[str, Any] = field(default_factory=dict)
    """Its config."""
    views: Literal["random", "ref"] = "random"
    """What it scores: the random training views, or the reference view (image-to-3D data)."""


@dataclass
class GuidanceSpec:
    """What one guidance is in one stage."""

    name: str
    type: str
    config: dict[str, Any]
    key: str
    views: str = "random"

    @property
    def signature(self) -> tuple:
        return (self.type, repr(self.config), self.views)

    def loss_name(self, term: str) -> str:
        """``loss_X`` of the main guidance; ``loss_<name>_X`` of a named one."""
        return term if self.name == MAIN_GUIDANCE else f"loss_{self.name}_{term[len('loss_'):]}"


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
    guidances: dict[str, Optional[dict[str, Any]]] = field(default_factory=dict)
    """Named guidances: merged over the current ones by name; ``null`` removes one."""
    prompt_processor_type: Optional[str] = None
    """Swap the prompt processor (e.g. T5 states for DeepFloyd IF, then CLIP states for Stable Diffusion)."""
    prompt_processor: Optional[dict[str, Any]] = None
    """Prompt processor config: merged over the current one if the type is unchanged, else used alone."""
    loss: dict[str, Any] = field(default_factory=dict)
    """Loss weights merged over the system's (and earlier stages')."""
    optimizer: Optional[dict[str, Any]] = None
    """Optimizer settings merged over the current ones."""
    freeze: list[str] = field(default_factory=list)
    """Slots whose parameters are not optimized in this stage (e.g. [geometry])."""
    data: dict[str, Any] = field(default_factory=dict)
    """Data settings for this stage (resolution, batch size, ...), read by the datamodule."""


def norm_loss_key(k: str) -> str:
    return k if k.startswith("lambda_") else f"lambda_{k}"


class StagesMixin:
    """Stage arithmetic and per-stage specs; mixed into the system (needs ``cfg``, ``_cfg_key``, ``_prov``)."""

    cfg: Any
    _cfg_key: str
    stage_index: int

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

    def _stages_upto(self, idx: int) -> list[tuple[int, StageConfig]]:
        return list(enumerate(self.cfg.stages[: idx + 1])) if self.cfg.stages else []

    def slot_spec(self, idx: int, slot: str) -> tuple[str, dict, str]:
        """(type, config, config key) of ``slot`` in stage ``idx``: stages apply cumulatively."""
        typ = getattr(self.cfg, f"{slot}_type")
        conf = dict(getattr(self.cfg, slot))
        key = f"{self._cfg_key}.{slot}"
        for i, st in self._stages_upto(idx):
            new_type, new_conf = getattr(st, f"{slot}_type"), getattr(st, slot)
            if new_type is not None and new_type != typ:
                typ, conf, key = new_type, dict(new_conf or {}), f"{self._cfg_key}.stages[{i}].{slot}"
            elif new_conf:
                conf, key = merge_dicts(conf, new_conf), f"{self._cfg_key}.stages[{i}].{slot}"
        return typ, conf, key

    def guidance_specs(self, idx: int | None = None) -> dict[str, GuidanceSpec]:
        """Every guidance of stage ``idx`` by name: the main one first, then the named ones."""
        idx = self.stage_index if idx is None else idx
        typ, conf, key = self.slot_spec(idx, "guidance")
        specs = {MAIN_GUIDANCE: GuidanceSpec(MAIN_GUIDANCE, typ, conf, key)}
        raw: dict[str, tuple[dict, str]] = {n: (dict(v or {}), f"{self._cfg_key}.guidances.{n}")
                                            for n, v in self.cfg.guidances.items()}
        for i, st in self._stages_upto(idx):
            for n, over in st.guidances.items():
                where = f"{self._cfg_key}.stages[{i}].guidances.{n}"
                if over is None:
                    raw.pop(n, None)
                elif n in raw and over.get("guidance_type", raw[n][0].get("guidance_type")) == raw[n][0].get("guidance_type"):
                    raw[n] = (merge_dicts(raw[n][0], over), where)
                else:
                    raw[n] = (dict(over), where)
        for n, (d, where) in raw.items():
            if not _GUIDANCE_NAME.match(n) or n == MAIN_GUIDANCE:
                raise ConfigError(f"{where}: guidance name {n!r} must be lowercase letters, digits and '_' "
                                  f"(not '{MAIN_GUIDANCE}', the main guidance's)")
            slot = parse_structured(GuidanceSlotConfig, d, key=where, prov=getattr(self, "_prov", None))
            if not slot.guidance_type:
                raise ConfigError(f"{where}.guidance_type is not set; name a registered guidance")
            specs[n] = GuidanceSpec(n, slot.guidance_type, dict(slot.guidance), f"{where}.guidance", slot.views)
        return specs

    def loss_weights(self, idx: int | None = None) -> dict[str, Any]:
        idx = self.stage_index if idx is None else idx
        raw = {norm_loss_key(k): v for k, v in self.cfg.loss.items()}
        for _, st in self._stages_upto(idx):
            raw.update({norm_loss_key(k): v for k, v in st.loss.items()})
        out = {}
        for k, v in raw.items():
            try:
                out[k] = Schedule.parse(v)
            except ValueError as exc:
                raise ConfigError(f"{self._cfg_key}.loss.{k}: {exc}") from None
        return out


__all__ = ["StageConfig", "GuidanceSlotConfig", "GuidanceSpec", "StagesMixin", "SCENE_SLOTS", "MODULE_SLOTS",
           "MAIN_GUIDANCE"]
