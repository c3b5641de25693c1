"""Fine-tuning the multi-view toy prior on groups of views: data, loss and a resumable loop.

Training data (MVDream's, in the toy world): a group is ``n_views`` exact renders of one catalogue
object from cameras that share elevation, distance and field of view, at azimuths ``base + k *
360 / n_views`` with a random base; elevation, distance and the base azimuth follow the
single-view data's distribution (:mod:`lift3d.priors.toyworld.data`), so each view on its own is
a sample of the single-view training data. Lights are drawn per view, each in its camera's upper
hemisphere as in the single-view data, which is also how the tiny recipes light their renders
(``light_sample_strategy: upper-hemisphere``, one light per camera); ``shared_light`` gives a
group one light instead (world upper hemisphere).

Loss: the single-view prior's (v-prediction MSE on the same noise schedule), with one timestep
and one text drop (classifier-free guidance, probability ``p_uncond``) per group, drawn from
generators seeded by (seed, step) like the single-view training, so a resumed run ends with the
weights an uninterrupted one gives. Group ``i`` of the data depends only on (seed, i).

The starting point is a single-view file (``init_from``, default the shipped weights): the
multi-view model has no parameters of its own (:mod:`lift3d.priors.toyworld.multiview`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lift3d.config import ConfigError, parse_structured
from lift3d.priors.toyworld.multiview import MULTIVIEW_META_KEY, MultiViewToyPrior

PACKAGED_MV_RECIPE = Path(__file__).with_name("recipe-mv.yaml")
FINAL_MV_NAME = "toyworld-mv.safetensors"
MV_CACHE_VERSION = 1
_GROUP_TAG = 0x6D76
_SHUFFLE_TAG = 0x6D77


@dataclass
class GroupFineTuneConfig:
    """What every fine-tune of the shipped prior on groups of renders shares (the multi-view twins',
    the image-conditioned twin's): the schedule, the data's size and focus, checkpoints, the start."""

    seed: int = 0
    """Seed of the data, the batch order and every step's noise."""
    steps: int = 3000
    """Optimizer steps (the cosine learning-rate decay spans them)."""
    groups_per_batch: int = 8
    """Groups per step."""
    lr: float = 1e-4
    """Peak learning rate (AdamW), after a linear warm-up, cosine-decayed to 10%."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    ema_decay: float = 0.998
    """Decay of the exponential moving average whose weights are saved."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    num_groups: int = 4000
    """Training groups, rendered once (and cached under cache_dir)."""
    cache_dir: Optional[str] = None
    """Where rendered groups are cached (default: ~/.cache/lift3d/toyworld)."""
    out_dir: str = "outputs/toyworld-prior-mv"
    """Checkpoint, logs, sample grids and the final safetensors file."""
    ckpt_every: int = 200
    """Steps between checkpoints."""
    sample_every: int = 0
    """Steps between grids of samples (0: never)."""
    log_every: int = 50
    """Steps between lines of train_log.csv."""
    threads: Optional[int] = None
    """torch threads (default: torch's choice)."""
    stop_after: Optional[int] = None
    """Stop this invocation after so many steps (checkpointing there); run again to continue."""
    init_from: Optional[str] = "shipped"
    """Weights to start from: a single-view toy-world file ("shipped": the packaged one) or a file of the
    twin being trained; the architecture is the file's. null: a random model built from ``model``."""
    model: dict[str, Any] = field(default_factory=dict)
    """ToyPriorConfig of a random start (only with init_from: null)."""
    focus_prompts: list[str] = field(default_factory=list)
    """Prompts that get a larger share of the groups (e.g. the snowman, chair and mug: the objects
    with a front and a back)."""
    focus_fraction: float = 0.0
    """Share of the groups drawn from focus_prompts (the rest: uniform over the catalogue)."""
    feature_weight: float = 0.0
    """Extra loss weight on the pixels where the object or its Janus twin shows its front feature
    (as the single-view training's feature_weight)."""
    autocast: Optional[str] = None
    """"bf16": the network's forward pass under bfloat16 autocast (loss, optimizer and EMA stay
    float32); faster only on CPUs with AMX or AVX512-BF16. null: float32."""


def check_counts(cfg: Any, key: str, names: tuple[str, ...]) -> None:
    """A ConfigError naming ``key.name`` for the first of ``names`` below 1."""
    for name in names:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{key}.{name} must be >= 1, got {getattr(cfg, name)}")


@dataclass
class MultiViewTrainConfig(GroupFineTuneConfig):
    n_views: int = 4
    """Views per group (MVDream: 4, 90 degrees apart); a step sees groups_per_batch * n_views images."""
    min_snr_gamma: Optional[float] = None
    """Min-SNR loss weighting; null (as the shipped prior's last stages) for the plain v-prediction MSE."""
    shared_light: bool = False
    """One light per group instead of one per view."""


# ---------------------------------------------------------------------------------------------
# Data


def _focus_indices(prompts: list[str]) -> list[int]:
    from lift3d.priors.toyworld.shapes import list_prompts

    catalogue = list_prompts()
    unknown = [p for p in prompts if p not in catalogue]
    if unknown:
        raise ConfigError(f"train-mv focus_prompts: {unknown} are not toy-world prompts; valid: {', '.join(catalogue)}")
    return [catalogue.index(p) for p in prompts]


def group_azimuths(base: Tensor, n_views: int) -> Tensor:
    """[G] base azimuths (degrees) -> [G * n_views]: ``base + k * 360 / n_views``, in [0, 360), group-major."""
    offsets = torch.arange(n_views, dtype=base.dtype) * (360.0 / n_views)
    return torch.remainder(base[:, None] + offsets[None], 360.0).reshape(-1)


def draw_prompt(g: torch.Generator, n_prompts: int, focus: list[int] | None, focus_fraction: float) -> int:
    """A group's object: one of ``focus`` with probability ``focus_fraction``, else uniform over the
    catalogue (a coin, then the pick, both from ``g``)."""
    coin = float(torch.rand(1, generator=g))
    if focus and coin < focus_fraction:
        return focus[int(torch.randint(len(focus), (1,), generator=g))]
    return int(torch.randint(n_prompts, (1,), generator=g))


def sample_group_params(seed: int, groups: range | list[int], n_views: int = 4, focus: list[int] | None = None,
                        focus_fraction: float = 0.0, shared_light: bool = False) -> dict[str, Tensor]:
    """The random choices of groups ``groups``, flattened group-major (the views of a group consecutive):
    prompt_index [N] long, elevation, azimuth, distance [N] (degrees), light_dirs [N, 3]; N = len * n_views.

    Group ``i`` depends only on ``(seed, i)`` and the focus and light settings.
    """
    from lift3d.priors.toyworld.data import FOVY, _sample_generator, light_in_upper_hemisphere, sample_cameras
    from lift3d.priors.toyworld.shapes import list_prompts
    from lift3d.utils.cameras import make_cameras

    n_prompts = len(list_prompts())
    rows: dict[str, list[Tensor]] = {k: [] for k in ("prompt_index", "elevation", "azimuth", "distance", "light_dirs")}
    for i in groups:
        g = _sample_generator(seed, i, _GROUP_TAG)
        prompt_index = draw_prompt(g, n_prompts, focus, focus_fraction)
        elev, base, dist = sample_cameras(1, g)
        az = group_azimuths(base, n_views)
        elev, dist = elev.expand(n_views).clone(), dist.expand(n_views).clone()
        if shared_light:
            v = F.normalize(torch.randn(3, generator=g), dim=0)
            light = (-v if v[2] < 0 else v).expand(n_views, 3)  # reflected into the upper half: still uniform
        else:
            cams = make_cameras(elev, az, dist, torch.full((n_views,), FOVY), 1, 1)
            light = light_in_upper_hemisphere(cams, g)
        rows["prompt_index"].append(torch.full((n_views,), prompt_index, dtype=torch.long))
        rows["elevation"].append(elev)
        rows["azimuth"].append(az)
        rows["distance"].append(dist)
        rows["light_dirs"].append(light.clone())
    return {k: torch.cat(v) for k, v in rows.items()}


def group_cache_path(cache_dir: str | os.PathLike, seed: int, num_groups: int, n_views: int, resolution: int,
                     settings: dict[str, Any]) -> Path:
    """Where the rendered groups of these settings are cached."""
    tag = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    name = f"toyworld_mv_v{MV_CACHE_VERSION}_seed{seed}_g{num_groups}_n{n_views}_r{resolution}_{tag}.npz"
    return Path(cache_dir) / name


class MultiViewDataset:
    """Groups of views of toy-world objects, rendered once and kept in memory (and as .npz in ``cache_dir``).

    ``batch(b)`` is batch ``b`` of the current epoch (:meth:`set_epoch`): ``groups_per_batch`` groups
    in an order permuted by (seed, epoch), their views consecutive, as a model batch
    (:func:`lift3d.priors.toyworld.data.collate`; with ``feature_regions`` also ``feature_region``).
    """

    def __init__(self, groups_per_batch: int = 8, seed: int = 0, num_groups: int = 4000, n_views: int = 4,
                 resolution: int = 64, cache_dir: str | os.PathLike | None = None,
                 focus_prompts: list[str] | None = None, focus_fraction: float = 0.0, shared_light: bool = False,
                 feature_regions: bool = False, chunk: int = 64):
        if groups_per_batch < 1 or num_groups < groups_per_batch:
            raise ValueError(f"need 1 <= groups_per_batch ({groups_per_batch}) <= num_groups ({num_groups})")
        if n_views < 1:
            raise ValueError(f"n_views must be >= 1, got {n_views}")
        if not 0.0 <= focus_fraction <= 1.0:
            raise ValueError(f"focus_fraction must be in [0, 1], got {focus_fraction}")
        self.groups_per_batch, self.seed, self.num_groups = groups_per_batch, seed, num_groups
        self.n_views, self.resolution, self.cache_dir = n_views, resolution, cache_dir
        self.focus = _focus_indices(list(focus_prompts or []))
        self.focus_fraction, self.shared_light = focus_fraction, shared_light
        self.feature_regions, self.chunk = feature_regions, chunk
        self.epoch = 0
        self._data: dict[str, Tensor] | None = None

    def __len__(self) -> int:
        return self.num_groups // self.groups_per_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _settings(self) -> dict[str, Any]:
        return {"focus": self.focus, "focus_fraction": self.focus_fraction, "shared_light": self.shared_light}

    def group_params(self, groups: range) -> dict[str, Tensor]:
        """The random choices of groups ``groups`` (:func:`sample_group_params`); a data set of another
        layout (the image-conditioned twin's pairs) overrides this and :meth:`cache_path`."""
        return sample_group_params(self.seed, groups, self.n_views, self.focus, self.focus_fraction, self.shared_light)

    def cache_path(self) -> Path:
        """The .npz file the rendered groups are cached in (under ``cache_dir``)."""
        return group_cache_path(self.cache_dir, self.seed, self.num_groups, self.n_views, self.resolution,
                                self._settings())

    def data(self) -> dict[str, Tensor]:
        """Every view of every group: the params and uint8 image / mask (and feature_region)."""
        if self._data is not None:
            return self._data
        from lift3d.priors.toyworld import data as tw

        path = None
        if self.cache_dir is not None:
            path = self.cache_path()

        def compute() -> dict[str, Tensor]:
            parts = []
            for start in range(0, self.num_groups, self.chunk):
                params = self.group_params(range(start, min(start + self.chunk, self.num_groups)))
                parts.append({**params, **tw.render_params(params, self.resolution)})
            return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

        data = tw.cached_npz(path, compute)
        if self.feature_regions:
            fpath = path.with_name(path.stem + "_features.npz") if path is not None else None
            data["feature_region"] = tw.cached_npz(
                fpath, lambda: {"feature_region": tw.feature_regions(data, self.resolution)})["feature_region"]
        self._data = data
        return data

    def batch(self, b: int) -> dict[str, Tensor]:
        from lift3d.priors.toyworld.data import _sample_generator, collate

        data = self.data()
        order = torch.randperm(self.num_groups, generator=_sample_generator(self.seed, self.epoch, _SHUFFLE_TAG))
        groups = order[b * self.groups_per_batch: (b + 1) * self.groups_per_batch]
        idx = (groups[:, None] * self.n_views + torch.arange(self.n_views)[None]).reshape(-1)
        return collate({k: v[idx] for k, v in data.items()})


# ---------------------------------------------------------------------------------------------
# Loss and loop


def multiview_loss(model: MultiViewToyPrior, sched: Any, batch: dict[str, Tensor], g: torch.Generator,
                   n_views: int, min_snr_gamma: float | None = None, feature_weight: float = 0.0,
                   autocast: str | None = None) -> Tensor:
    """The denoising loss on a batch of whole groups; one timestep and one text drop per group, all
    drawn from ``g``: the single-view prior's loss (its target, its weights) with ``n_views`` set
    (:func:`lift3d.priors.toyworld.train.diffusion_loss`)."""
    from lift3d.priors.toyworld.train import diffusion_loss

    return diffusion_loss(model, sched, batch, g, min_snr_gamma, feature_weight=feature_weight, autocast=autocast,
                          n_views=n_views)


def initial_model(cfg: MultiViewTrainConfig) -> MultiViewToyPrior:
    """The model a run starts from (before any checkpoint is loaded)."""
    from safetensors import safe_open

    from lift3d.priors.toyworld.model import DEFAULT_WEIGHTS
    from lift3d.priors.toyworld.vocab import VOCAB

    if cfg.init_from is None:
        return MultiViewToyPrior({"vocab_size": len(VOCAB), **cfg.model}, {"n_views": cfg.n_views})
    if cfg.model:
        raise ConfigError("train-mv: 'model' sets the architecture of a random start; with init_from "
                          f"({cfg.init_from!r}) the architecture is the file's. Set init_from=null or drop model")
    path = DEFAULT_WEIGHTS if cfg.init_from == "shipped" else Path(cfg.init_from)
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            if MULTIVIEW_META_KEY in (f.metadata() or {}):
                model = MultiViewToyPrior.load(path)
                model.mv_cfg.n_views = cfg.n_views
                return model
    return MultiViewToyPrior.from_single_view(path, cfg.n_views)


def train_multiview(cfg: MultiViewTrainConfig | dict, progress: bool = True) -> Path:
    """Fine-tune (or resume) in ``cfg.out_dir``; returns the final (or, with stop_after, partial) weights.

    The loop is the single-view training's (:func:`lift3d.priors.toyworld.train.fit`); what differs is
    the model, the data (whole groups) and the loss (:func:`multiview_loss`)."""
    cfg = parse_structured(MultiViewTrainConfig, cfg, key="train-mv")
    check_counts(cfg, "train-mv", ("steps", "groups_per_batch", "n_views", "num_groups", "ckpt_every", "log_every"))
    from lift3d.priors.toyworld.train import start_run

    start_run(cfg, progress)
    return fit_groups(cfg, initial_model(cfg), FINAL_MV_NAME, "toyworld multi-view prior",
                      {"init_from": str(cfg.init_from)}, progress)


def fit_groups(cfg: MultiViewTrainConfig, model: MultiViewToyPrior, final_name: str, desc: str,
               extra_metadata: dict[str, str], progress: bool = True) -> Path:
    """A multi-view twin's fine-tune once ``cfg`` is parsed and ``model`` built: the groups of
    :class:`MultiViewDataset`, :func:`multiview_loss`, the single-view training's loop; the weights
    are written as ``final_name`` when every step is done."""
    from lift3d.priors.toyworld.train import _step_generator, epoch_batch, fit

    def batches() -> Callable[[int], dict[str, Tensor]]:
        cache = cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "lift3d", "toyworld")
        ds = MultiViewDataset(cfg.groups_per_batch, cfg.seed, cfg.num_groups, cfg.n_views, model.cfg.resolution,
                              cache, cfg.focus_prompts, cfg.focus_fraction, cfg.shared_light,
                              feature_regions=bool(cfg.feature_weight))
        ds.data()  # render (or read) every group before the first step
        return lambda step: epoch_batch(ds, step)

    def loss_at(model: MultiViewToyPrior, sched: Any, batch: dict[str, Tensor], step: int) -> Tensor:
        return multiview_loss(model, sched, batch, _step_generator(cfg.seed, step, 1), cfg.n_views,
                              cfg.min_snr_gamma, cfg.feature_weight, cfg.autocast)

    return fit(cfg, model, batches, loss_at, save_group_grid, name=final_name.removesuffix(".safetensors"),
               desc=desc, extra_metadata=extra_metadata, progress=progress)


def save_group_grid(model: MultiViewToyPrior, path: Path, seed: int = 0, steps: int = 25,
                    prompts: tuple[str, ...] = ("a snowman", "a chair", "a mug", "a red cube")) -> Path:
    """One row per prompt: a group sampled jointly at elevation 20, azimuths ``k * 360 / n_views``
    (the single-view grid, :func:`lift3d.priors.toyworld.train.save_sample_grid`, one group a row)."""
    from lift3d.priors.toyworld.multiview import sample_groups
    from lift3d.priors.toyworld.train import save_sample_grid

    n = model.mv_cfg.n_views
    return save_sample_grid(model, path, seed, steps, prompts, n, functools.partial(sample_groups, n_views=n))


# ---------------------------------------------------------------------------------------------
# The recipe: a flat YAML of MultiViewTrainConfig keys (plus a description)


def load_mv_recipe(source: str | Path | dict | None = None) -> dict[str, Any]:
    """The fine-tune recipe at ``source`` (a YAML path, a mapping, or None: the packaged recipe-mv.yaml),
    without its description; its keys are checked when the run's config is parsed."""
    from lift3d.priors.toyworld.recipe import read_recipe

    source, _ = read_recipe(source, PACKAGED_MV_RECIPE, "a mapping of train-mv keys")
    return {k: v for k, v in source.items() if k != "description"}


def train_multiview_recipe(recipe: str | Path | dict | None = None, overrides: dict[str, Any] | None = None,
                           progress: bool = True) -> Path:
    """Run (or resume) the recipe with ``overrides`` (the command line's key=value pairs) on top."""
    from lift3d.config import merge_dicts

    cfg = merge_dicts(load_mv_recipe(recipe), dict(overrides or {}))
    return train_multiview(cfg, progress=progress)


__all__ = ["GroupFineTuneConfig", "check_counts", "fit_groups", "MultiViewTrainConfig", "MultiViewDataset", "sample_group_params", "group_azimuths", "multiview_loss",
           "initial_model", "train_multiview", "train_multiview_recipe", "load_mv_recipe", "save_group_grid",
           "FINAL_MV_NAME", "PACKAGED_MV_RECIPE"]
