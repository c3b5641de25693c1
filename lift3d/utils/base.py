"""Base classes every registered module derives from.

A module nests a ``Config`` dataclass, is built as ``Cls(cfg, **kwargs)`` (``cfg`` a mapping or
``Config``), sets itself up in ``configure(**kwargs)``, and sees the training step through
``update_step(epoch, global_step)``, which the system calls on every module each step.
``self.C(value)`` evaluates a possibly scheduled config value at the current step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from lift3d.config import C, Provenance, parse_structured


class Configurable:
    """Mixin: strict ``Config`` parsing and the step hook, shared by modules and non-modules."""

    category: str = "other"

    @dataclass
    class Config:
        pass

    cfg: Any
    _global_step: int = 0
    _epoch: int = 0

    def _parse_cfg(self, cfg: Any, key: str, prov: Provenance | None) -> None:
        owner = getattr(type(self), "registry_name", type(self).__name__)
        self.cfg = parse_structured(type(self).Config, cfg, key=key, prov=prov, owner=owner)

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        """Called by the system each step (and once after loading a checkpoint)."""
        self._epoch = epoch
        self._global_step = global_step

    @property
    def global_step(self) -> int:
        return self._global_step

    def C(self, value: Any) -> Any:
        return C(value, self._global_step)


class BaseModule(Configurable, nn.Module):
    """An ``nn.Module`` with a strict nested ``Config``."""

    def __init__(self, cfg: Any = None, *, cfg_key: str = "", prov: Provenance | None = None, **kwargs: Any):
        nn.Module.__init__(self)
        self._parse_cfg(cfg, cfg_key, prov)
        self.configure(**kwargs)

    def configure(self, **kwargs: Any) -> None:
        """Build submodules and parameters; ``kwargs`` are what the builder passes (e.g. geometry)."""
        if kwargs:
            raise TypeError(f"{type(self).__name__}.configure() got unexpected arguments: {', '.join(kwargs)}")


class BaseObject(Configurable):
    """A configurable that holds no parameters (prompt processors, data samplers, exporters)."""

    def __init__(self, cfg: Any = None, *, cfg_key: str = "", prov: Provenance | None = None, **kwargs: Any):
        self._parse_cfg(cfg, cfg_key, prov)
        self.configure(**kwargs)

    def configure(self, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"{type(self).__name__}.configure() got unexpected arguments: {', '.join(kwargs)}")
