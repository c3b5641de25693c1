"""Exporter base class: turns a trained geometry and material into files on disk."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lift3d.utils.base import BaseObject


class BaseExporter(BaseObject):
    """``export(geometry, material, out_dir, name) -> {kind: path}`` for every file written.

    Kinds are short names such as ``obj``, ``mtl``, ``texture_kd``, ``glb``, ``ply``; callers
    (the system's ``--export``) print them and tests look files up by kind.
    """

    category = "exporter"

    @dataclass
    class Config:
        pass

    def export(self, geometry: Any, material: Any, out_dir: Path, name: str = "model") -> dict[str, Path]:
        raise NotImplementedError
