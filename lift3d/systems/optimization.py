"""The system's optimizer: one torch optimizer with a parameter group per configured module path.

Groups are named by module path (``geometry.encoding``, ``background``); a parameter joins the
longest path that contains it, and any group's ``lr`` may be a schedule of the global step.
Stages merge their ``optimizer`` settings over the current ones and rebuild the optimizer.

Nothing in the optimizer config may be a silent no-op: a group must name a module or parameter
that exists in the stage that declares it (the top level declares for stage 0), and every key of
a group or of ``args`` must be one the optimizer class accepts. :meth:`check_optimizer_config`
checks every stage at start-up; :meth:`configure_optimizers` checks the stage it builds for.
"""

from __future__ import annotations

import difflib
import inspect
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

from lift3d.config import C, ConfigError, Schedule, merge_dicts, parse_structured

#: The slots whose parameters the system's optimizer trains (in this order).
OPTIMIZED_SLOTS = ("geometry", "material", "background", "renderer")


@dataclass
class OptimizerConfig:
    name: str = "Adam"
    """A class in torch.optim (Adam, AdamW, SGD, ...)."""
    args: dict[str, Any] = field(default_factory=lambda: {"lr": 0.01, "betas": [0.9, 0.99], "eps": 1e-15})
    """Keyword arguments of the optimizer; ``lr`` is the default for parameters no group claims."""
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Parameter groups by module path (``geometry.encoding``, ``background``) -> {lr: ..., ...}.
    A parameter joins the longest path that contains it. ``lr`` may be a schedule. A group must
    name a module or parameter of the stage that declares it; its keys are the optimizer's
    keyword arguments (``lr``, ``betas``, ``eps``, ``weight_decay``, ... for Adam)."""


def optimizer_keys(cls: type) -> list[str] | None:
    """The keyword arguments ``cls(params, ...)`` accepts, which are also what a parameter group
    may set; None when the constructor takes ``**kwargs`` (anything goes)."""
    keys = []
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if name in ("self", "params") or p.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        keys.append(name)
    return keys


def _owns(group: str, param_name: str) -> bool:
    return param_name == group or param_name.startswith(group + ".")


def group_paths(param_names: list[str]) -> list[str]:
    """Every valid group name for these parameter names: each parameter and every module above it."""
    out: set[str] = set()
    for n in param_names:
        parts = n.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return sorted(out)


@contextmanager
def _rng_untouched() -> Iterator[None]:
    """Building a module only to read its parameter names must not move any random stream."""
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)


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
        for slot in OPTIMIZED_SLOTS:
            if slot in frozen:
                continue
            for n, p in getattr(self, slot).named_parameters():
                if p.requires_grad:
                    out.append((f"{slot}.{n}", p))
        return out

    # ------------------------------------------------------------------ checks

    def _optimizer_layers(self, idx: int) -> list[tuple[int, str, dict]]:
        """(stage that declares, key path, raw optimizer mapping) for each layer that applies in stage ``idx``:
        the top level (declaring for stage 0), then each stage up to ``idx`` that has an ``optimizer``."""
        top = {"name": self.cfg.optimizer.name, "args": self.cfg.optimizer.args, "params": self.cfg.optimizer.params}
        layers = [(0, f"{self._cfg_key}.optimizer", top)]
        for i, st in self._stages_upto(idx):
            if st.optimizer:
                layers.append((i, f"{self._cfg_key}.stages[{i}].optimizer", st.optimizer))
        return layers

    def _where(self, layers: list[tuple[int, str, dict]], *path: str) -> str:
        """Key path of the last layer that sets ``path`` (e.g. ``params``, group, key), with its file."""
        found, value = None, None
        for _, key, raw in layers:
            node: Any = raw
            for part in path:
                node = node.get(part) if isinstance(node, dict) else None
                if node is None:
                    break
            if node is not None:
                found, value = key, node
        key = ".".join([found or layers[0][1], *path])
        return key + self._describe(key, value)

    def _describe(self, key: str, value: Any) -> str:
        """`` (set in FILE)`` for ``key``. Provenance is looked up at a leaf below it: command-line
        overrides are recorded at their leaves only, and a group name may itself contain dots."""
        if self._prov is None:
            return ""
        while isinstance(value, dict) and value:
            k = next(iter(value))
            key, value = f"{key}.{k}", value[k]
        return self._prov.describe(key)

    def optimizer_class(self, idx: int | None = None) -> type[torch.optim.Optimizer]:
        """The torch.optim class stage ``idx`` names; ConfigError naming the key if it is not one."""
        idx = self.stage_index if idx is None else idx
        name = self.optimizer_config(idx).name
        cls = getattr(torch.optim, name, None)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            valid = sorted(n for n, c in vars(torch.optim).items() if isinstance(c, type)
                           and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer)
            close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{self._where(self._optimizer_layers(idx), 'name')}: {name!r} is not a torch.optim "
                              f"optimizer.{hint} Valid: {', '.join(valid)}")
        return cls

    def _check_optimizer_settings(self, idx: int) -> None:
        """Stage ``idx``'s optimizer class, the keys of ``args`` and of every group, and every ``lr``."""
        ocfg = self.optimizer_config(idx)
        cls = self.optimizer_class(idx)
        layers = self._optimizer_layers(idx)
        keys = optimizer_keys(cls)
        if keys is not None:
            valid = ", ".join(keys)
            for k in ocfg.args:
                if k not in keys:
                    default = ("; these are the default args, made for Adam: set optimizer.args for "
                               f"{ocfg.name}" if ocfg.args == OptimizerConfig().args else "")
                    raise ConfigError(f"{self._where(layers, 'args', k)}: {k!r} is not an argument of torch.optim."
                                      f"{ocfg.name}; valid: {valid}{default}")
            for group, settings in ocfg.params.items():
                for k in settings:
                    if k in keys:
                        continue
                    msg = (f"{self._where(layers, 'params', group, k)}: {k!r} is not a setting of a parameter group "
                           f"of torch.optim.{ocfg.name}; valid: {valid}")
                    if isinstance(settings[k], dict):
                        # `params.geometry.xyz.lr=...` on the command line splits at every dot, so it sets a
                        # key 'xyz' in group 'geometry' rather than the group 'geometry.xyz'.
                        msg += (f". To configure the group {group + '.' + k!r}, write its name as one key: "
                                f"{self._cfg_key}.optimizer.params={{{group}.{k}: {{lr: ...}}}} on the command "
                                f"line, or `{group}.{k}: {{lr: ...}}` under params in YAML")
                    raise ConfigError(msg)
        lrs = [(("args", "lr"), ocfg.args["lr"])] if "lr" in ocfg.args else []
        lrs += [(("params", g, "lr"), s["lr"]) for g, s in ocfg.params.items() if "lr" in s]
        for path, value in lrs:
            try:
                Schedule.parse(value)
            except (ValueError, ConfigError) as exc:
                raise ConfigError(f"{self._where(layers, *path)}: {exc}; got {value!r}") from None

    def _declared_groups(self, idx: int) -> dict[str, str]:
        """Group names that stage ``idx`` itself declares (the top level declares for stage 0) -> key path."""
        out = {}
        for stage, key, raw in self._optimizer_layers(idx):
            if stage == idx:
                for g, settings in (raw.get("params") or {}).items():
                    path = f"{key}.params.{g}"
                    out[g] = path + self._describe(path, settings)
        return out

    def _check_group_names(self, idx: int, names_of: Callable[[str], list[str] | None]) -> None:
        """Every group stage ``idx`` declares must own a parameter. ``names_of(slot)`` gives the stage's
        parameter names of a slot (``slot.sub.name``), or None when they cannot be known before the
        stage starts (its groups are then checked when it does)."""
        for group, where in self._declared_groups(idx).items():
            slot = group.split(".", 1)[0]
            names = names_of(slot) if slot in OPTIMIZED_SLOTS else []
            if names is None or any(_owns(group, n) for n in names):
                continue
            paths = group_paths([n for s in OPTIMIZED_SLOTS for n in (names_of(s) or [])])
            close = difflib.get_close_matches(group, paths, n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            shallow = [p for p in paths if p.count(".") <= 1]
            stage = f" in stage {idx} ('{self.stages[idx].name}')" if self.cfg.stages else ""
            raise ConfigError(
                f"{where}: parameter group {group!r} matches no parameter of the system{stage}, so it would "
                f"configure nothing.{hint} Valid group names are module or parameter paths: "
                f"{', '.join(shallow) or '(none: nothing has parameters)'}, or deeper paths below them. "
                "A group for a module that only exists in a later stage belongs in that stage's optimizer")

    def _live_names(self, slot: str) -> list[str]:
        return [f"{slot}.{n}" for n, _ in getattr(self, slot).named_parameters()]

    def _stage_names_fn(self, idx: int, cache: dict[tuple, Any]) -> Callable[[str], list[str] | None]:
        """``names_of(slot)`` for stage ``idx``. A slot configured as in the current stage is read from
        the built module; another is built on the CPU with every random stream left as it was, and
        kept in ``cache`` only for the rest of the check. A slot that cannot be built on its own (it
        exists only through a stage switch) gives None."""
        from lift3d.registry import find

        def module(slot: str) -> Any:
            typ, conf, key = self.slot_spec(idx, slot)
            if (typ, conf) == tuple(self.slot_spec(self.stage_index, slot)[:2]):
                return getattr(self, slot)
            ck = (slot, typ, repr(conf))
            if ck not in cache:
                kwargs = {}
                if slot == "renderer":
                    kwargs = {s: module(s) for s in ("geometry", "material", "background")}
                cache[ck] = None
                if all(v is not None for v in kwargs.values()):
                    try:
                        with _rng_untouched():
                            cache[ck] = find(typ, slot)(conf, cfg_key=key, prov=self._prov, **kwargs)
                    except Exception:  # noqa: BLE001  (a start-up convenience: the stage start checks again)
                        cache[ck] = None
            return cache[ck]

        def names_of(slot: str) -> list[str] | None:
            m = module(slot)
            return None if m is None else [f"{slot}.{n}" for n, _ in m.named_parameters()]

        return names_of

    def check_optimizer_config(self) -> None:
        """Check the optimizer settings of every stage, before training: the optimizer class, the keys
        of ``args`` and of each group, each ``lr``, and that each group names something to train.
        Raises ConfigError naming the key. Call it once the system is built."""
        cache: dict[tuple, Any] = {}
        for idx in range(len(self.stages)):
            self._check_optimizer_settings(idx)
            if self._declared_groups(idx):
                self._check_group_names(idx, self._stage_names_fn(idx, cache))

    # ------------------------------------------------------------------ building

    def configure_optimizers(self) -> torch.optim.Optimizer:
        ocfg = self.optimizer_config()
        self._check_optimizer_settings(self.stage_index)
        self._check_group_names(self.stage_index, self._live_names)
        step = self.global_step
        paths = sorted(ocfg.params, key=len, reverse=True)
        groups: dict[str, list[nn.Parameter]] = {p: [] for p in ocfg.params}
        default: list[tuple[str, nn.Parameter]] = []
        for name, p in self._trainable_named_parameters():
            owner = next((k for k in paths if _owns(k, name)), None)
            if owner is None:
                default.append((name, p))
            else:
                groups[owner].append(p)
        param_groups = []
        self._lr_schedules = []
        for path in ocfg.params:
            # A group may be empty here: its module is frozen, or it was declared for an earlier stage
            # whose modules this stage replaced (its name was checked in the stage that declared it).
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
        args = {k: (tuple(v) if isinstance(v, list) else v) for k, v in ocfg.args.items() if k != "lr"}
        return self.optimizer_class()(param_groups, **args)

    def apply_lr_schedules(self, opt: Any, step: int) -> None:
        for group, lr in zip(opt.param_groups, self._lr_schedules):
            group["lr"] = C(lr, step)


__all__ = ["OptimizerConfig", "OptimizationMixin", "optimizer_keys", "group_paths", "OPTIMIZED_SLOTS"]
