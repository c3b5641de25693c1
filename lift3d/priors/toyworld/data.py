"""Training data of the toy-world prior: random views of the 33 catalogue objects, rendered exactly.

The embedded prior (a small text-and-camera-conditioned diffusion model, trained later) learns
from these images what DreamFusion-style score distillation (Poole et al. 2022) then lifts to
3D. Distribution (the issue's): the object uniform over ``list_prompts()``; camera elevation
uniform in [-10, 60] degrees, azimuth uniform in [0, 360), distance uniform in [1.8, 2.2],
fovy 40 degrees, 64x64; Lambertian shading, ambient 0.35 plus diffuse 0.65 from a light in the
camera's upper hemisphere (see :func:`light_in_upper_hemisphere`); black background.

Determinism: sample ``i`` of the stream for ``seed`` depends only on ``(seed, i)`` (each sample
draws from its own generator), so batches are the same whatever the batch size, the number of
DataLoader workers or whether a cache is used. Images are quantised to 8 bits like any real
image data set; this is what makes cached and freshly rendered samples bit-identical.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from lift3d.priors.toyworld.render import render
from lift3d.priors.toyworld.shapes import CATALOGUE, list_prompts
from lift3d.priors.toyworld.vocab import MAX_TOKENS, pad_tokens, tokenize
from lift3d.utils.cameras import make_cameras

ELEVATION_RANGE = (-10.0, 60.0)
DISTANCE_RANGE = (1.8, 2.2)
FOVY = 40.0
RESOLUTION = 64
AMBIENT = 0.35
DIFFUSE = 0.65
BACKGROUND = 0.0
#: Normalisation of the camera vector: distance enters as (distance - centre) / half_range.
DISTANCE_CENTRE = 2.0
DISTANCE_HALF_RANGE = 0.2
CACHE_VERSION = 1
_SHUFFLE_TAG = 0x5EED

_PROMPTS = list_prompts()
_OBJECTS = [CATALOGUE[p] for p in _PROMPTS]
#: [33, MAX_TOKENS] token ids of every catalogue prompt, padded with 0.
PROMPT_TOKENS: Tensor = pad_tokens([tokenize(p) for p in _PROMPTS], MAX_TOKENS)


def sample_cameras(n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """n training cameras: (elevation [n], azimuth [n], distance [n]) float32, angles in degrees."""
    u = torch.rand(3, n, generator=generator)
    elevation = ELEVATION_RANGE[0] + (ELEVATION_RANGE[1] - ELEVATION_RANGE[0]) * u[0]
    azimuth = 360.0 * u[1]
    distance = DISTANCE_RANGE[0] + (DISTANCE_RANGE[1] - DISTANCE_RANGE[0]) * u[2]
    return elevation, azimuth, distance


def light_in_upper_hemisphere(cameras: dict, generator: torch.Generator | None = None) -> Tensor:
    """[B, 3] unit light directions (towards the light, world frame), one per camera.

    Definition: uniform on the unit sphere restricted to directions with a positive component
    along the camera's up axis (``c2w[:, :3, 1]``, the image's "up" in world space). So lights
    come from above the image's horizontal mid-plane: from in front, the side or behind the
    object, never from below the camera's horizon.
    """
    up = cameras["c2w"][:, :3, 1]  # [B, 3]
    v = torch.randn(up.shape, generator=generator, dtype=torch.float32).to(up)
    v = torch.nn.functional.normalize(v, dim=-1)
    # Reflecting the lower half onto the upper keeps the distribution uniform.
    return torch.where((v * up).sum(-1, keepdim=True) < 0, -v, v)


def camera_vector(elevation_deg: Tensor, azimuth_deg: Tensor, distance: Tensor) -> Tensor:
    """The model's camera conditioning, [B, 4]: (elevation_deg / 90, sin az, cos az, (d - 2.0) / 0.2).

    Over the training distribution every entry lies in [-1, 1] (elevation in [-1/9, 2/3]).
    """
    az = torch.deg2rad(azimuth_deg)
    return torch.stack(
        [elevation_deg / 90.0, torch.sin(az), torch.cos(az), (distance - DISTANCE_CENTRE) / DISTANCE_HALF_RANGE], dim=-1
    )


def camera_from_vector(camera: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The inverse of :func:`camera_vector`: (elevation, azimuth, distance) [B] from [B, 4]."""
    elevation = camera[:, 0] * 90.0
    azimuth = torch.rad2deg(torch.atan2(camera[:, 1], camera[:, 2]))
    distance = camera[:, 3] * DISTANCE_HALF_RANGE + DISTANCE_CENTRE
    return elevation, azimuth, distance


def ray_map(camera: Tensor, resolution: int = RESOLUTION, fovy_deg: float = FOVY) -> Tensor:
    """Per-pixel Pluecker coordinates of the camera's rays, [B, 6, H, W]: direction d, moment o x d.

    World frame, so a pixel's six numbers say where in the world its ray passes: the front of an
    object (+x) is found by a local rule rather than decoded from a global camera vector.
    """
    # Geometry in float32 even inside a bf16 autocast region (the caller casts the result).
    with torch.autocast(camera.device.type, enabled=False):
        elevation, azimuth, distance = camera_from_vector(camera.float())
        cams = make_cameras(elevation, azimuth, distance, torch.full_like(elevation, fovy_deg), resolution, resolution)
        o, d = cams["rays_o"], cams["rays_d"]
        return torch.cat([d, torch.cross(o, d, dim=-1)], dim=-1).permute(0, 3, 1, 2).contiguous()


def _sample_generator(seed: int, *index: int) -> torch.Generator:
    # SeedSequence mixes (seed, index) so neighbouring seeds do not give shifted streams.
    state = np.random.SeedSequence([int(seed), *map(int, index)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def sample_params(seed: int, indices: list[int] | range) -> dict[str, Tensor]:
    """The random choices of stream samples ``indices``: prompt_index [N] long, elevation,
    azimuth, distance [N] (degrees), light_dirs [N, 3]."""
    rows = []
    for i in indices:
        g = _sample_generator(seed, i)
        prompt_index = int(torch.randint(len(_PROMPTS), (1,), generator=g))
        elev, azim, dist = sample_cameras(1, g)
        cams = make_cameras(elev, azim, dist, torch.full((1,), FOVY), 1, 1)
        rows.append((prompt_index, elev, azim, dist, light_in_upper_hemisphere(cams, g)))
    return {
        "prompt_index": torch.tensor([r[0] for r in rows], dtype=torch.long),
        "elevation": torch.cat([r[1] for r in rows]),
        "azimuth": torch.cat([r[2] for r in rows]),
        "distance": torch.cat([r[3] for r in rows]),
        "light_dirs": torch.cat([r[4] for r in rows]),
    }


def render_params(params: dict[str, Tensor], resolution: int = RESOLUTION, supersample: int = 1) -> dict[str, Tensor]:
    """Render sampled params: image uint8 [N, H, W, 3], mask uint8 [N, H, W] (255 = object)."""
    n = params["prompt_index"].shape[0]
    cams = make_cameras(params["elevation"], params["azimuth"], params["distance"], torch.full((n,), FOVY),
                        resolution, resolution)
    out = render([_OBJECTS[int(k)] for k in params["prompt_index"]], cams, params["light_dirs"], ambient=AMBIENT,
                 diffuse=DIFFUSE, background=BACKGROUND, supersample=supersample)
    to_u8 = lambda x: (x * 255.0).round().clamp(0, 255).to(torch.uint8)  # noqa: E731
    return {"image": to_u8(out["rgb"]), "mask": to_u8(out["mask"][..., 0])}


def feature_regions(params: dict[str, Tensor], resolution: int = RESOLUTION, chunk: int = 256) -> Tensor:
    """uint8 [N, H, W]: 255 where the object, or its Janus twin (turned 180 degrees about z), shows its
    front feature (nose, chair back, handle) at the sample's camera; 0 everywhere for the primitives.

    This is the region that decides front from back in an image (the prior evaluation's front check
    scores the same region), and the place a loss has to look to teach the camera's azimuth.
    """
    turns = [180.0 if _OBJECTS[int(k)].has_feature else 0.0 for k in params["prompt_index"]]
    return _turned_pairs(params, turns, "feature_mask", torch.logical_or, resolution, chunk)


def _turned_pairs(params: dict[str, Tensor], turns: list[float], key: str, combine: Callable[[Tensor, Tensor], Tensor],
                  resolution: int, chunk: int) -> Tensor:
    """uint8 [N, H, W]: ``combine`` of render ``key`` at each sample's camera and at its camera turned by
    ``turns[i]`` degrees about z (the object turned the other way); 0 where the turn is 0."""
    n = params["prompt_index"].shape[0]
    out = torch.zeros(n, resolution, resolution, dtype=torch.uint8)
    turns = torch.tensor(turns, dtype=torch.float32)
    for part in torch.nonzero(turns != 0).flatten().split(chunk):
        objs = [_OBJECTS[int(k)] for k in params["prompt_index"][part]]
        views = []
        for turn in (torch.zeros(len(part)), turns[part]):
            cams = make_cameras(params["elevation"][part], params["azimuth"][part] + turn, params["distance"][part],
                                torch.full((len(part),), FOVY), resolution, resolution)
            # A mask needs no light: a headlight keeps the call cheap and independent of the sample's.
            views.append(render(objs, cams, None)[key][..., 0] > 0.5)
        out[part] = combine(*views).to(torch.uint8) * 255
    return out


#: Shapes whose silhouette repeats under a turn about z, and the turn that maps them to their most
#: different view: a cube looks the same every 90 degrees and most different at 45.
CORNER_TURNS = {"cube": 45.0}


def corner_regions(params: dict[str, Tensor], resolution: int = RESOLUTION, chunk: int = 256) -> Tensor:
    """uint8 [N, H, W]: 255 where the silhouette of a cube at the sample's camera differs from that of
    the cube turned 45 degrees about z (:data:`CORNER_TURNS`); 0 everywhere for the other objects.

    These pixels are all that tells a cube's corners from its faces: the cube's counterpart of
    :func:`feature_regions`, and the region the evaluation's corner check scores.
    """
    turns = [CORNER_TURNS.get(_OBJECTS[int(k)].shape, 0.0) for k in params["prompt_index"]]
    return _turned_pairs(params, turns, "mask", torch.logical_xor, resolution, chunk)


def generate(seed: int, start: int, count: int, resolution: int = RESOLUTION,
             supersample: int = 1) -> dict[str, Tensor]:
    """Stream samples ``start .. start + count - 1``: params plus uint8 image and mask."""
    params = sample_params(seed, range(start, start + count))
    return {**params, **render_params(params, resolution, supersample)}


def cache_path(cache_dir: str | os.PathLike, seed: int, count: int, resolution: int = RESOLUTION,
               supersample: int = 1) -> Path:
    """Where the cache of the first ``count`` samples of ``seed`` lives."""
    name = f"toyworld_v{CACHE_VERSION}_seed{seed}_n{count}_r{resolution}_ss{supersample}.npz"
    return Path(cache_dir) / name


def load_or_generate(seed: int, count: int, cache_dir: str | os.PathLike | None = None, resolution: int = RESOLUTION,
                     supersample: int = 1, chunk: int = 256) -> dict[str, Tensor]:
    """The first ``count`` samples of the stream, read from (or written to) an .npz cache if given."""
    path = cache_path(cache_dir, seed, count, resolution, supersample) if cache_dir is not None else None

    def compute() -> dict[str, Tensor]:
        parts = [generate(seed, s, min(chunk, count - s), resolution, supersample) for s in range(0, count, chunk)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}

    return cached_npz(path, compute)


def cached_npz(path: Path | None, compute: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    """The tensors stored at ``path`` (.npz) if it exists; else ``compute()``, written there atomically.

    ``path=None``: compute, cache nothing.
    """
    if path is not None and path.is_file():
        with np.load(path) as z:
            return {k: torch.from_numpy(z[k]) for k in z.files}
    data = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npz")  # atomic against concurrent writers
        np.savez(tmp, **{k: v.numpy() for k, v in data.items()})
        os.replace(tmp, path)
    return data


def collate(samples: dict[str, Tensor], image_range: str = "minus_one_one") -> dict[str, Tensor]:
    """Turn raw samples into a model batch.

    Keys: image [B, 3, H, W] float32 (in [-1, 1] for ``image_range="minus_one_one"``, the
    diffusion convention, or [0, 1] for ``"zero_one"``), mask [B, 1, H, W] float in {0, 1},
    tokens [B, MAX_TOKENS] long (0 = padding), camera [B, 4] (see :func:`camera_vector`),
    prompt_index [B] long (into ``list_prompts()``), elevation, azimuth, distance [B] (degrees),
    light_dirs [B, 3]; and feature_region / corner_region [B, 1, H, W] in {0, 1} when the samples
    carry them (:func:`feature_regions`, :func:`corner_regions`).
    """
    img = samples["image"].permute(0, 3, 1, 2).float() / 255.0
    if image_range == "minus_one_one":
        img = img * 2.0 - 1.0
    elif image_range != "zero_one":
        raise ValueError(f"image_range must be 'minus_one_one' or 'zero_one', got {image_range!r}")
    return {
        "image": img,
        "mask": (samples["mask"].float() / 255.0)[:, None],
        "tokens": PROMPT_TOKENS[samples["prompt_index"]],
        "camera": camera_vector(samples["elevation"], samples["azimuth"], samples["distance"]),
        "prompt_index": samples["prompt_index"],
        "elevation": samples["elevation"],
        "azimuth": samples["azimuth"],
        "distance": samples["distance"],
        "light_dirs": samples["light_dirs"],
        **{key: (samples[key].float() / 255.0)[:, None]
           for key in ("feature_region", "corner_region") if key in samples},
    }


class ToyWorldDataset(IterableDataset):
    """Batches of toy-world training data (already batched: use ``DataLoader(ds, batch_size=None)``).

    ``num_samples=None``: an endless stream rendered on the fly; batch ``b`` holds stream samples
    ``b*batch_size ..``. With ``num_samples``: the first ``num_samples`` samples (the same ones
    the stream starts with), rendered once and kept in memory (and in ``cache_dir`` as .npz when
    given); one pass per ``iter()``, in stream order, or permuted by ``(seed, epoch)`` with
    ``shuffle=True`` (advance with :meth:`set_epoch`). With DataLoader workers, worker ``k`` of
    ``W`` yields batches ``k, k+W, ...``; the set of batches is the same for any ``W``.
    """

    def __init__(self, batch_size: int = 32, seed: int = 0, resolution: int = RESOLUTION,
                 num_samples: int | None = None, cache_dir: str | os.PathLike | None = None,
                 image_range: str = "minus_one_one", supersample: int = 1, shuffle: bool = False,
                 drop_last: bool = False):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_samples is None and (cache_dir is not None or shuffle):
            raise ValueError("cache_dir and shuffle need a finite num_samples")
        if image_range not in ("minus_one_one", "zero_one"):
            raise ValueError(f"image_range must be 'minus_one_one' or 'zero_one', got {image_range!r}")
        self.batch_size = batch_size
        self.seed = seed
        self.resolution = resolution
        self.num_samples = num_samples
        self.cache_dir = cache_dir
        self.image_range = image_range
        self.supersample = supersample
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self._data: dict[str, Tensor] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError("an endless ToyWorldDataset (num_samples=None) has no length")
        f = math.floor if self.drop_last else math.ceil
        return int(f(self.num_samples / self.batch_size))

    def _finite_data(self) -> dict[str, Tensor]:
        if self._data is None:
            self._data = load_or_generate(self.seed, self.num_samples, self.cache_dir, self.resolution,
                                          self.supersample)
        return self._data

    def batch(self, b: int) -> dict[str, Tensor]:
        """Batch number ``b`` (of the current epoch for a finite data set)."""
        if self.num_samples is None:
            start = b * self.batch_size
            return collate(generate(self.seed, start, self.batch_size, self.resolution, self.supersample),
                           self.image_range)
        data = self._finite_data()
        order = torch.arange(self.num_samples)
        if self.shuffle:
            g = _sample_generator(self.seed, self.epoch, _SHUFFLE_TAG)
            order = torch.randperm(self.num_samples, generator=g)
        idx = order[b * self.batch_size : (b + 1) * self.batch_size]
        return collate({k: v[idx] for k, v in data.items()}, self.image_range)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        b = worker
        while self.num_samples is None or b < len(self):
            yield self.batch(b)
            b += n_workers


__all__ = [
    "ELEVATION_RANGE",
    "DISTANCE_RANGE",
    "FOVY",
    "RESOLUTION",
    "PROMPT_TOKENS",
    "sample_cameras",
    "light_in_upper_hemisphere",
    "camera_vector",
    "sample_params",
    "render_params",
    "feature_regions",
    "CORNER_TURNS",
    "corner_regions",
    "generate",
    "cache_path",
    "load_or_generate",
    "cached_npz",
    "collate",
    "ToyWorldDataset",
]
