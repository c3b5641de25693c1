"""Exporter base class: turns a trained geometry and material into files on disk.

Two guards sit around every exporter (:meth:`BaseExporter.export_checked`, what the system's
``export`` calls):

* A model that renders nothing is refused before anything is written (:class:`EmptyModelError`).
  Marching cubes on a collapsed field (zero density everywhere) still finds a few hundred faces of
  noise at some level; writing them with exit status 0 would pass a junk mesh off as the result.
  The measure is the model's own renders: the mean opacity of a few views around the object, the
  fraction of the image it covers. An object of a tenth of the bounding box's size covers about a
  percent; an empty model covers nothing.
* The files go into a hidden temporary folder beside the destination, which is renamed into place
  only once the exporter has returned and every file it reports exists (:func:`staged_folder`).
  An export that fails partway leaves neither the destination nor the temporary folder behind.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from lift3d.config import ConfigError
from lift3d.geometry.base import IsosurfaceError
from lift3d.utils.base import BaseObject
from lift3d.utils.cameras import make_cameras


class EmptyModelError(IsosurfaceError):
    """The model renders (almost) nothing, so there is no object to export.

    An :class:`IsosurfaceError`: like an empty isosurface, it means the trained field holds no
    surface, and launch reports it the same way (one line, exit status 1).
    """


class IncompleteExportError(RuntimeError):
    """An exporter returned a path it did not write; the export is not moved into place."""


@contextmanager
def staged_folder(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``final``; rename it to ``final`` when the block succeeds.

    On any exception (Ctrl-C included) the temporary folder is deleted and ``final`` is left as it
    was: absent, or the complete folder of an earlier export. A successful block replaces an
    existing ``final``; the old folder is renamed aside first and deleted only after the new one is
    in place, so at no moment does ``final`` hold a mix of both.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.rmdir(old)  # only its unique name is wanted: rename needs a free target
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            if old is not None:
                os.rename(old, final)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _view_cameras(radius: float, n_views: int, size: int) -> dict[str, Any]:
    """``n_views`` cameras around the origin at elevation 20 degrees, framing the bounding box."""
    return make_cameras(torch.full((n_views,), 20.0), torch.arange(n_views) * (360.0 / n_views),
                        torch.full((n_views,), 2.5 * radius), torch.full((n_views,), 40.0), size, size)


@torch.no_grad()
def render_coverage(renderer: Any, radius: float = 1.0, n_views: int = 4, size: int = 16) -> float:
    """Mean rendered opacity of ``n_views`` views around the scene (in eval mode, on the scene's
    device): the fraction of the images the model covers, 0 for an empty model."""
    parts = [renderer] + [renderer.__dict__.get(k) for k in ("geometry", "material", "background")]
    modules = [m for m in parts if isinstance(m, torch.nn.Module)]
    flags = [(sub, sub.training) for m in modules for sub in m.modules()]
    tensors = itertools.chain.from_iterable(itertools.chain(m.parameters(), m.buffers()) for m in modules)
    dev = next(tensors, torch.empty(0)).device
    cams = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in _view_cameras(radius, n_views, size).items()}
    try:
        for m in modules:
            m.eval()
        out = renderer(**cams, bg_color=torch.zeros(3, device=dev))
    finally:
        for sub, was in flags:
            sub.training = was
    return float(out["opacity"].float().mean())


class BaseExporter(BaseObject):
    """``export(geometry, material, out_dir, name) -> {kind: path}`` for every file written.

    Kinds are short names such as ``obj``, ``mtl``, ``texture_kd``, ``glb``, ``ply``; callers
    (the system's ``--export``) print them and tests look files up by kind. Subclasses implement
    ``export``; callers use :meth:`export_checked`, which adds the empty-model check and the
    all-or-nothing folder.
    """

    category = "exporter"

    @dataclass
    class Config:
        min_coverage: float = 0.001
        """Refuse to export a model whose renders are empty: the mean opacity of 4 views around it
        (the fraction of the image it covers) must reach this. 0 turns the check off."""

    def __init__(self, cfg: Any = None, *, cfg_key: str = "", prov: Any = None, **kwargs: Any):
        self._cfg_key = cfg_key or "exporter"
        super().__init__(cfg, cfg_key=cfg_key, prov=prov, **kwargs)

    def configure(self, **kwargs: Any) -> None:
        super().configure(**kwargs)
        if not 0.0 <= self.cfg.min_coverage < 1.0:
            raise ConfigError(f"{self._cfg_key}.min_coverage must be in [0, 1) (0 turns the empty-model check "
                              f"off), got {self.cfg.min_coverage}")

    def export(self, geometry: Any, material: Any, out_dir: Path, name: str = "model") -> dict[str, Path]:
        raise NotImplementedError

    def check_not_empty(self, renderer: Any, geometry: Any) -> float:
        """Raise :class:`EmptyModelError` if the model covers less than ``min_coverage`` of its renders;
        returns the coverage (1.0 without rendering when the check is off)."""
        if self.cfg.min_coverage <= 0:
            return 1.0
        radius = float(getattr(getattr(geometry, "cfg", None), "radius", 1.0))
        coverage = render_coverage(renderer, radius)
        if not coverage >= self.cfg.min_coverage:  # NaN fails too
            raise EmptyModelError(
                f"nothing to export: the model renders empty (mean opacity {coverage:.2g} over 4 views around "
                f"it, below {self._cfg_key}.min_coverage={self.cfg.min_coverage:g}), so any mesh extracted from "
                "it would be noise. The field has collapsed or never formed: check the run's validation images "
                f"and losses, train longer or lower the learning rate; set {self._cfg_key}.min_coverage=0 to "
                "export anyway"
            )
        return coverage

    def export_checked(self, geometry: Any, material: Any, out_dir: str | os.PathLike, renderer: Any = None,
                       name: str = "model") -> dict[str, Path]:
        """``export`` into ``out_dir`` all or nothing, after checking (with ``renderer``, when given)
        that the model is not empty. Returns kind -> path, the paths inside ``out_dir``."""
        out_dir = Path(out_dir)
        if renderer is not None:
            self.check_not_empty(renderer, geometry)
        out: dict[str, Path] = {}
        with staged_folder(out_dir) as tmp:
            written = self.export(geometry, material, tmp, name)
            missing = [f"{kind}: {path}" for kind, path in written.items() if not Path(path).is_file()]
            if missing:
                raise IncompleteExportError(
                    f"{type(self).__name__} reported files it did not write ({'; '.join(missing)}); "
                    f"nothing was written to {out_dir}")
            here = tmp.resolve()
            for kind, path in written.items():  # where each file will be once the folder is renamed
                full = Path(path).resolve()
                out[kind] = out_dir / full.relative_to(here) if full.is_relative_to(here) else Path(path)
        return out


__all__ = ["BaseExporter", "EmptyModelError", "IncompleteExportError", "render_coverage", "staged_folder"]
