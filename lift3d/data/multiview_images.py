"""Cameras at the views of a multi-view generator: the data of generate-then-reconstruct recipes.

Zero123++ (Shi et al. 2023) draws six views of an object at fixed cameras; SyncDreamer draws 16;
a recipe that reconstructs such views renders the scene at exactly those cameras and compares
(``multiview-images-guidance``). This data module yields those cameras. Each training batch is
``batch_size`` of the views, chosen without repetition by a generator seeded from (seed, step,
rank), so a resumed run draws what an uninterrupted one would. A batch carries:

* the ``make_cameras`` keys of the chosen views at the training resolution (``height`` x
  ``width``, which may be a schedule), lights at the cameras, and ``shading`` (``views_shading``:
  generated images have their shading baked in, so the views are rendered unlit by default);
* ``view_index`` [B]: which views they are (the guidance picks its target images by it);
* ``views_cache``: ``<trial folder>/views``, where the guidance keeps the views it generates
  (known once a trainer runs this module; absent outside one);
* ``ref``: the input image at its camera, exactly as ``single-image-datamodule`` yields it (a
  recipe may also fit the input view with ``reference-image-guidance``).

The cameras come from a views folder's ``cameras.json`` (``views_dir``: any generator's views,
layout in :mod:`lift3d.priors.zero123pp.views`), or, for views the guidance has yet to generate,
from the generator's pose table (``pose_table``, with ``views_distance`` / ``views_fovy_deg``),
whose azimuths are relative to the input view: they are turned by ``ref_azimuth_deg`` (the batch's
``input_azimuth``, which the guidance adds to the cameras of the views it generates).
Validation and test orbits are random-camera-datamodule's; its random-view settings
(elevation_range, ...) are not used for training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from torch import Tensor

from lift3d.config import C, ConfigError, Provenance
from lift3d.data.single_image import SingleImageConfig, SingleImageDataModule
from lift3d.registry import register
from lift3d.utils.cameras import make_cameras

#: The pose tables this module knows, by name: a generator and its version.
POSE_TABLES = ("zero123pp-v1.1", "zero123pp-v1.2", "syncdreamer")


@dataclass
class MultiviewImagesConfig(SingleImageConfig):
    views_dir: Optional[str] = None
    """A views folder (``cameras.json`` + images) whose cameras the batches use; null: the cameras of
    ``pose_table`` (views the guidance generates). Recipes tie it to the guidance's ``views_dir``."""
    pose_table: Literal["zero123pp-v1.1", "zero123pp-v1.2", "syncdreamer"] = "zero123pp-v1.2"
    """Without ``views_dir``: the generator whose fixed cameras the views have (SyncDreamer: its 16 views,
    elevation 30, azimuths every 22.5 degrees, field of view 49.13; ``views_fovy_deg`` does not apply)."""
    views_distance: Optional[float] = None
    """Camera distance of the pose table's views (null: the table's, 4 for Zero123++)."""
    views_fovy_deg: Optional[float] = None
    """Vertical field of view of the pose table's views in degrees (null: the table's; Zero123++ v1.2
    fixes 30, v1.1 none, so a v1.1 table needs it)."""
    views_shading: Optional[Literal["diffuse", "albedo", "textureless"]] = "albedo"
    """Shading mode the views are rendered with (the material's ``shading``); null lets the material choose."""


@register("multiview-images-datamodule")
class MultiviewImagesDataModule(SingleImageDataModule):
    """Training batches at the views' cameras (with ``view_index``), plus the input image as ``batch["ref"]``."""

    Config = MultiviewImagesConfig
    provides_reference = True

    def __init__(self, cfg: Any = None, *, cfg_key: str = "data", prov: Provenance | None = None, seed: int = 0,
                 stage_plan: list[tuple[int, dict]] | None = None):
        self._tables: dict[tuple, dict[str, Tensor]] = {}
        self._views_cache: Optional[Path] = None
        super().__init__(cfg, cfg_key=cfg_key, prov=prov, seed=seed, stage_plan=stage_plan)

    # -- checks and the camera table ---------------------------------------------------------

    def check_config(self, cfg: MultiviewImagesConfig, key: str) -> None:
        if not cfg.image_path and cfg.views_dir and (Path(cfg.views_dir).expanduser() / "input.png").is_file():
            cfg.image_path = str(Path(cfg.views_dir).expanduser() / "input.png")  # the folder's own input image
        super().check_config(cfg, key)
        n = len(self.view_table(cfg, key)["elevation"])
        if cfg.batch_size > n:
            where = self._prov.describe(f"{key}.batch_size") if self._prov else ""
            raise ConfigError(f"config key '{key}.batch_size'{where} is {cfg.batch_size}, but there are only {n} "
                              f"views; use at most {n} (a batch holds distinct views)")

    def view_table(self, cfg: MultiviewImagesConfig, key: str = "data") -> dict[str, Tensor]:
        """``elevation``, ``azimuth``, ``distance``, ``fovy`` [N] of the views (degrees)."""
        k = (cfg.views_dir, cfg.pose_table, cfg.views_distance, cfg.views_fovy_deg)
        if k not in self._tables:
            if cfg.views_dir:
                from lift3d.priors.zero123pp.views import cameras_of, read_cameras

                entries, _ = read_cameras(cfg.views_dir, f"{key}.views_dir")
                table = cameras_of(entries)
            elif cfg.pose_table == "syncdreamer":
                from lift3d.priors.syncdreamer.cameras import view_table

                table = view_table(cfg.views_distance)
            else:
                from lift3d.priors.zero123pp.poses import view_cameras

                version = cfg.pose_table.split("-", 1)[1]
                try:
                    table = view_cameras(version, cfg.views_distance, cfg.views_fovy_deg)
                except ValueError as exc:
                    raise ConfigError(f"config key '{key}.views_fovy_deg': {exc}") from None
            self._tables[k] = table
        return self._tables[k]

    # -- where generated views are kept ------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        trainer = getattr(self, "trainer", None)
        root = getattr(trainer, "default_root_dir", None) if trainer is not None else None
        if root:
            self._views_cache = Path(root) / "views"

    # -- batches -----------------------------------------------------------------------------

    def training_batch(self, step: int, rank: int = 0) -> dict[str, Any]:
        cfg = self.cfg_at(step)
        table = self.view_table(cfg, self.cfg_key)
        n = len(table["elevation"])
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step * 7_919 + rank * 104_729 + 31) % (2**63 - 1))
        idx = torch.randperm(n, generator=g)[: cfg.batch_size]
        h, w = int(C(cfg.height, step)), int(C(cfg.width, step))
        azimuth = table["azimuth"][idx]
        if not cfg.views_dir:  # a pose table's azimuths are relative to the input view's
            azimuth = torch.remainder(azimuth + float(cfg.ref_azimuth_deg) + 180.0, 360.0) - 180.0
        batch = make_cameras(table["elevation"][idx], azimuth, table["distance"][idx],
                             table["fovy"][idx], h, w)
        batch["light_positions"] = batch["camera_positions"].clone()
        batch["view_index"] = idx
        batch["n_views"] = 1
        if cfg.views_shading is not None:
            batch["shading"] = cfg.views_shading
        if not cfg.views_dir:
            batch["input_azimuth"] = float(cfg.ref_azimuth_deg)  # the guidance turns the generated views by it
            if self._views_cache is not None:
                batch["views_cache"] = str(self._views_cache)
        batch["ref"] = self.ref_batch(step)
        return batch


__all__ = ["MultiviewImagesDataModule", "MultiviewImagesConfig", "POSE_TABLES"]
