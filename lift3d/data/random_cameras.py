"""Random orbit cameras for per-prompt optimization (DreamFusion-style), plus fixed eval orbits.

Training batches are a pure function of (seed, global step, rank): resuming at step N draws the
same cameras an uninterrupted run would have drawn, which is what makes resume exact. Recipes
with stages may override data settings per stage (a higher resolution after a switch); the stage
plan is passed in by launch so the sampler knows, from the step alone, which settings apply.

Multi-view priors (MVDream, Shi et al. 2023) score sets of views of one object taken at the same
elevation and distance, evenly spaced in azimuth; ``n_views`` makes each batch whole such groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lift3d.config import C, ConfigError, Provenance, ScheduledInt, merge_dicts, parse_structured
from lift3d.registry import register
from lift3d.utils.base import Configurable
from lift3d.utils.cameras import make_cameras, orbit


@dataclass
class RandomCameraConfig:
    height: ScheduledInt = 64
    """Training render height in pixels (may be a schedule, e.g. a resolution ramp)."""
    width: ScheduledInt = 64
    """Training render width in pixels."""
    batch_size: int = 1
    """Cameras per training step (a multiple of ``n_views``)."""
    n_views: int = 1
    """Cameras per view group. Each consecutive group of ``n_views`` cameras shares elevation,
    distance and field of view, with azimuths ``base + k * 360 / n_views`` (k = 0..n_views-1,
    wrapped into [-180, 180)): the view sets multi-view priors are trained on (MVDream: 4 views
    at 0/90/180/270). 1 gives independent cameras."""
    elevation_range: tuple[float, float] = (-10.0, 60.0)
    """Elevation in degrees, sampled uniformly."""
    azimuth_range: tuple[float, float] = (-180.0, 180.0)
    """Azimuth in degrees; 0 is the front (+x)."""
    camera_distance_range: tuple[float, float] = (1.8, 2.2)
    """Distance from the origin."""
    fovy_range: tuple[float, float] = (40.0, 40.0)
    """Vertical field of view in degrees."""
    batch_uniform_azimuth: bool = True
    """Stratify azimuths within a batch (one per equal slice) so each batch sees all sides; with
    view groups, the groups' base azimuths are stratified."""
    light_sample_strategy: str = "dreamfusion"
    """'dreamfusion': a light near the camera direction, perturbed; 'camera': at the camera;
    'upper-hemisphere': a random direction with a positive component along the camera's up axis."""
    light_position_perturb: float = 1.0
    """Std of the perturbation of the light direction ('dreamfusion')."""
    light_distance_range: tuple[float, float] = (0.8, 1.5)
    """Light distance as a multiple of the camera distance ('dreamfusion')."""
    eval_height: int = 64
    """Height of validation and test renders."""
    eval_width: int = 64
    """Width of validation and test renders."""
    eval_elevation_deg: float = 15.0
    """Elevation of the validation and test orbits."""
    eval_camera_distance: float = 2.0
    """Distance of the validation and test orbits."""
    eval_fovy_deg: float = 40.0
    """Field of view of the validation and test orbits."""
    n_val_views: int = 4
    """Views rendered at each validation."""
    n_test_views: int = 120
    """Turntable frames written by --test."""


def _uniform(lo_hi: tuple[float, float], n: int, g: torch.Generator) -> torch.Tensor:
    lo, hi = lo_hi
    return lo + (hi - lo) * torch.rand(n, generator=g)


def sample_light_positions(cfg: RandomCameraConfig, cams: dict, g: torch.Generator) -> torch.Tensor:
    pos = cams["camera_positions"]
    B = pos.shape[0]
    if cfg.light_sample_strategy == "camera":
        return pos.clone()
    if cfg.light_sample_strategy == "dreamfusion":
        direction = torch.nn.functional.normalize(
            pos + cfg.light_position_perturb * torch.randn(B, 3, generator=g), dim=-1
        )
        dist = _uniform(cfg.light_distance_range, B, g)[:, None] * cams["camera_distances"][:, None]
        return direction * dist
    if cfg.light_sample_strategy == "upper-hemisphere":
        up = cams["c2w"][:, :3, 1]
        d = torch.nn.functional.normalize(torch.randn(B, 3, generator=g), dim=-1)
        d = torch.where((d * up).sum(-1, keepdim=True) < 0, d - 2 * (d * up).sum(-1, keepdim=True) * up, d)
        return d * 10.0 * cams["camera_distances"][:, None]
    raise ValueError(
        f"data.light_sample_strategy {cfg.light_sample_strategy!r} is not one of dreamfusion, camera, upper-hemisphere"
    )


def check_view_groups(cfg: RandomCameraConfig, key: str = "data", where: Any = "") -> None:
    """Raise ConfigError unless ``cfg.batch_size`` is a positive multiple of ``cfg.n_views``.

    ``key`` is the config path of ``cfg`` (``data``, ``system.stages[1].data``); ``where`` a
    provenance note, or a function of the full key path giving one, for the message.
    """
    note = where if callable(where) else (lambda _k: where)
    if cfg.n_views < 1:
        raise ConfigError(f"config key '{key}.n_views'{note(f'{key}.n_views')}: must be >= 1 (1: independent cameras, "
                          f"4: MVDream's view sets), got {cfg.n_views}")
    if cfg.batch_size < 1 or cfg.batch_size % cfg.n_views != 0:
        raise ConfigError(
            f"config key '{key}.batch_size'{note(f'{key}.batch_size')} is {cfg.batch_size}, which is not a positive multiple of "
            f"'{key}.n_views' = {cfg.n_views}: a batch is made of whole view groups; use batch_size "
            f"{cfg.n_views}, {2 * cfg.n_views}, ... or change n_views"
        )


def sample_cameras(cfg: RandomCameraConfig, step: int, seed: int, rank: int = 0) -> dict[str, Any]:
    """The training batch for ``step``: deterministic in (seed, step, rank).

    With ``n_views == 1`` the draws (and so the batches) are exactly those of the sampler before
    view groups existed; keep that path's order of random draws unchanged, resume and published
    scores depend on it.
    """
    g = torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1))
    n = cfg.n_views
    if n < 1 or cfg.batch_size % n != 0:
        check_view_groups(cfg)
    B = cfg.batch_size // n  # one draw per group; with n == 1, per camera
    elevation = _uniform(cfg.elevation_range, B, g)
    if cfg.batch_uniform_azimuth:
        lo, hi = cfg.azimuth_range
        azimuth = lo + (hi - lo) * (torch.arange(B) + torch.rand(B, generator=g)) / B
    else:
        azimuth = _uniform(cfg.azimuth_range, B, g)
    distance = _uniform(cfg.camera_distance_range, B, g)
    fovy = _uniform(cfg.fovy_range, B, g)
    if n > 1:
        elevation, distance, fovy = (x.repeat_interleave(n) for x in (elevation, distance, fovy))
        offsets = torch.arange(n, dtype=azimuth.dtype) * (360.0 / n)
        azimuth = (azimuth[:, None] + offsets[None, :]).reshape(-1)
        azimuth = torch.remainder(azimuth + 180.0, 360.0) - 180.0
        # remainder can round to exactly 360 for inputs just below -180: keep the range half-open.
        azimuth = torch.where(azimuth >= 180.0, azimuth - 360.0, azimuth)
    h, w = int(C(cfg.height, step)), int(C(cfg.width, step))
    cams = make_cameras(elevation, azimuth, distance, fovy, h, w)
    # Lights are drawn per camera: every strategy places them relative to the camera.
    cams["light_positions"] = sample_light_positions(cfg, cams, g)
    cams["n_views"] = n
    return cams


class _TrainCameras(IterableDataset):
    """The endless training stream: ``batch_at(step, rank)`` from the trainer's step onwards."""

    def __init__(self, batch_at: Callable[[int, int], dict[str, Any]], start_step: Callable[[], int],
                 rank: Callable[[], int]):
        self.batch_at, self.start_step, self.rank = batch_at, start_step, rank

    def __iter__(self) -> Iterator[dict[str, Any]]:
        step = self.start_step()
        while True:
            yield self.batch_at(step, self.rank())
            step += 1


class _OrbitCameras(Dataset):
    def __init__(self, cfg: RandomCameraConfig, n: int):
        self.cams = orbit(n, cfg.eval_elevation_deg, cfg.eval_camera_distance, cfg.eval_fovy_deg,
                          cfg.eval_height, cfg.eval_width)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        out = {k: (v[i : i + 1] if torch.is_tensor(v) else v) for k, v in self.cams.items()}
        out["index"] = i
        return out


def _collate_single(items: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(items) == 1
    return items[0]


@register("random-camera-datamodule")
class RandomCameraDataModule(Configurable, pl.LightningDataModule):
    """Random orbit cameras for training; a fixed orbit for validation and the test turntable."""

    category = "data"
    Config = RandomCameraConfig

    def __init__(self, cfg: Any = None, *, cfg_key: str = "data", prov: Provenance | None = None, seed: int = 0,
                 stage_plan: list[tuple[int, dict]] | None = None):
        pl.LightningDataModule.__init__(self)
        self._raw = dict(cfg or {})
        self._prov = prov
        self._parse_cfg(self._raw, cfg_key, prov)
        self.cfg_key = cfg_key
        self.seed = seed
        self.check_config(self.cfg, cfg_key)
        # [(first step of the stage, data overrides)], ascending; the base config applies before.
        self.stage_plan = sorted(stage_plan or [], key=lambda t: t[0])
        self._stage_cfgs: dict[int, RandomCameraConfig] = {}
        owner = getattr(type(self), "registry_name", type(self).__name__)
        for i, (_, over) in enumerate(self.stage_plan):
            if over:
                key = f"system.stages[{i}].data"
                self._stage_cfgs[i] = parse_structured(
                    type(self).Config, merge_dicts(self._raw, over), key=key, prov=prov, owner=owner
                )
                self.check_config(self._stage_cfgs[i], key)

    def check_config(self, cfg: RandomCameraConfig, key: str) -> None:
        """Checks across fields, run at construction on the base config and every stage's."""
        check_view_groups(cfg, key, self._prov.describe if self._prov else "")

    def cfg_at(self, step: int) -> RandomCameraConfig:
        cfg = self.cfg
        for i, (start, _) in enumerate(self.stage_plan):
            if step >= start and i in self._stage_cfgs:
                cfg = self._stage_cfgs[i]
        return cfg

    def _start_step(self) -> int:
        return int(self.trainer.global_step) if self.trainer is not None else 0

    def _rank(self) -> int:
        return int(self.trainer.global_rank) if self.trainer is not None else 0

    def training_batch(self, step: int, rank: int = 0) -> dict[str, Any]:
        """The training batch for ``step``: a pure function of (seed, step, rank) and the stage plan."""
        return sample_cameras(self.cfg_at(step), step, self.seed, rank)

    def train_dataloader(self) -> DataLoader:
        ds = _TrainCameras(self.training_batch, self._start_step, self._rank)
        return DataLoader(ds, batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_OrbitCameras(self.cfg, self.cfg.n_val_views), batch_size=1, collate_fn=_collate_single)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(_OrbitCameras(self.cfg, self.cfg.n_test_views), batch_size=1, collate_fn=_collate_single)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


__all__ = ["RandomCameraDataModule", "RandomCameraConfig", "sample_cameras", "check_view_groups"]
