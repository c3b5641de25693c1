"""The system's optimizer: one torch optimizer with a parameter group per configured module path.

Groups are named by module path (``geometry.encoding``, ``background``); a parameter joins the
longest path that contains it, and any group's ``lr`` may be a schedule of the global step.
Stages merge their ``optimizer`` settings over the current ones and rebuild the optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from lift3d.config import C, ConfigError, Schedule, merge_dicts, parse_structured


@dataclass
class OptimizerConfig:
    name: str = "Adam"
    """A class in torch.optim (Adam, AdamW, SGD, ...)."""
    args: dict[str, Any] = field(default_factory=lambda: {"lr": 0.01, "betas": [0.9, 0.99], "eps": 1e-15})
    """Keyword arguments of the optimizer; ``lr`` is the default for parameters no group claims."""
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Parameter groups by module path (``geometry.encoding``, ``background``) -> {lr: ..., ...}.
    A parameter joins the longest path that contains it. ``lr`` may be a schedule."""


class OptimizationMixin:
    """Builds the optimizer of the current stage; mixed into the system."""

    cfg: Any
    _cfg_key: str
    _prov: Any
    stage_index: int
    _lr_schedules: list[Any]

    def optimizer_config(self, idx: int | None = None) -> OptimizerConfig:
        idx = self.stage_index if idx is None else idx
        base = {"name": self.cfg.optimizer.name, "args": self.cfg.optimizer.args, "params": self.cfg.optimizer.params}
        for _, st in self._stages_upto(idx):
            if st.optimizer:
                base = merge_dicts(base, st.optimizer)
        return parse_structured(OptimizerConfig, base, key=f"{self._cfg_key}.optimizer", prov=self._prov)

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
        step = self.global_step
        paths = sorted(ocfg.params, key=len, reverse=True)
        groups: dict[str, list[nn.Parameter]] = {p: [] for p in ocfg.params}
        default: list[tuple[str, nn.Parameter]] = []
        for name, p in self._trainable_named_parameters():
            owner = next((k for k in paths if name == k or name.startswith(k + ".")), None)
            if owner is None:
                default.append((name, p))
            else:
                groups[owner].append(p)
        param_groups = []
        self._lr_schedules = []
        for path in ocfg.params:
            if groups[path]:
                g = dict(ocfg.params[path])
                lr = Schedule.parse(g.pop("lr", ocfg.args.get("lr", 1e-3)))
                param_groups.append({"params": groups[path], "name": path, "lr": C(lr, step), **g})
                self._lr_schedules.append(lr)
        if default:
            if "lr" not in ocfg.args:
                names = ", ".join(n for n, _ in default[:8])
                raise ConfigError(
                    f"{self._cfg_key}.optimizer: parameters {names} belong to no group in optimizer.params and "
                    "optimizer.args has no default lr; add a group for them or set optimizer.args.lr"
                )
            lr = Schedule.parse(ocfg.args["lr"])
            param_groups.append({"params": [p for _, p in default], "name": "default", "lr": C(lr, step)})
            self._lr_schedules.append(lr)
        if not param_groups:  # nothing to train (e.g. a frozen stage): keep Lightning's loop valid
            param_groups.append({"params": [nn.Parameter(torch.zeros(1, device=self.device))],
                                 "name": "empty", "lr": 0.0})
            self._lr_schedules.append(0.0)
        if not hasattr(torch.optim, ocfg.name):
            raise ConfigError(f"{self._cfg_key}.optimizer.name: {ocfg.name!r} is not a torch.optim optimizer")
        args = {k: (tuple(v) if isinstance(v, list) else v) for k, v in ocfg.args.items() if k != "lr"}
        return getattr(torch.optim, ocfg.name)(param_groups, **args)

    def apply_lr_schedules(self, opt: Any, step: int) -> None:
        for group, lr in zip(opt.param_groups, self._lr_schedules):
            group["lr"] = C(lr, step)


__all__ = ["OptimizerConfig", "OptimizationMixin"]
