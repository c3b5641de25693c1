"""The toy world's twin of ViewDiff (Höllein et al., CVPR 2024, "ViewDiff: 3D-Consistent Image
Generation with Text-to-Image Models").

ViewDiff turns a text-to-image UNet into a generator of consistent groups of views with two
additions, both starting as the identity: cross-frame attention (every self-attention layer attends
over all views of a group, through a LoRA whose effect is conditioned per view on its pose,
intrinsics and intensity) and projection layers (the features of a group are lifted into a voxel
grid, refined by a 3D CNN and volume-rendered back into every view, added as a zero-initialised
residual). :class:`ViewDiffToyPrior` adds the same two parts to the toy-world prior, using the real
ViewDiff modules (:mod:`lift3d.priors.viewdiff.attention`, :mod:`lift3d.priors.viewdiff.projection`)
rather than copies of them:

* **Where the LoRA is.** The toy UNet (diffusers' ``UNet2DModel``) has self-attention only at its
  lowest resolution (8x8 tokens per view): in the last down block, the mid block and the first up
  block (twice), four ``Attention`` layers in the shipped configuration, the same four that the toy
  MVDream makes joint (:mod:`lift3d.priors.toyworld.multiview`). Each gets a
  :class:`~lift3d.priors.viewdiff.attention.CrossFrameAttnProcessor`: joint attention over the group
  plus the conditioned LoRA on ``to_q``, ``to_k``, ``to_v`` and ``to_out.0``. ``UNet2DModel`` passes
  no ``cross_attention_kwargs`` to its attention layers, so a small callable (:class:`_CrossFrameCall`)
  stands as each layer's processor and hands the LoRA module the group size and view conditions of
  the call under way; the LoRA modules themselves live in ``self.cross_frame`` (their keys stay out
  of the UNet's, so the UNet's keys are the single-view file's).
* **The view condition.** The toy camera is the 4-vector (elevation / 90, sin az, cos az,
  normalised distance) at the toy world's field of view (40 degrees); it is turned into ``c2w`` and
  normalised intrinsics and then into ViewDiff's condition vector
  (:func:`~lift3d.priors.viewdiff.cameras.view_condition`: pose relative to the group's first view,
  distance, intrinsics). The intensity entry is held at 0.5 (neutral): the toy prior is not told
  the light (its model card), and asking the guidance to invent a brightness per view would add a
  condition the toy world has no use for. The absolute camera still enters every view as before
  (the camera MLP and the ray map).
* **Where the projection layer is.** After the mid block by default (``projection_after``): 96
  channels on 8x8 maps, never the first down block nor the last up block (the blocks nearest the
  pixels; :func:`lift3d.priors.viewdiff.model.projection_sites` lists the valid ones). The volume
  covers [-1, 1]^3 (every toy object fits; a view at distance 1.8 to 2.2 and 40 degrees sees about
  +-0.73 around the origin), 16 voxels a side. The layer runs through a forward hook on the block
  (:class:`lift3d.priors.viewdiff.model._ProjectionHook`), as on Stable Diffusion.
* **Start.** The LoRA's ``up`` and the projection's output convolution start at zero, so
  :meth:`ViewDiffToyPrior.from_single_view` starts at the toy MVDream's network exactly (the
  single-view weights with joint attention), and for groups of one view at the shipped prior.

**What trains** (``train_unet`` of the fine-tune, which reuses the toy MVDream's data, loss and
loop from :mod:`lift3d.priors.toyworld.multiview_train`). ViewDiff freezes Stable Diffusion and
trains only what it adds; here the UNet trains too, as in the toy MVDream's fine-tune. Making the
attention joint spreads each view's softmax over the other views' tokens, which the added parts
alone (zero-initialised LoRA and projection) barely win back, while a fine-tuned UNet learns to use
the other views (short runs of both: the model card, "The toy ViewDiff"). ``train_unet: false``
(ViewDiff's own choice, the shipped network kept bit for bit) stays an option.

Files are the multi-view format (safetensors with ``lift3d_toyworld_config`` and
``lift3d_toyworld_multiview`` in the metadata) plus ``lift3d_toyworld_viewdiff``: the
:class:`~lift3d.priors.viewdiff.model.ViewDiffConfig` of the added parts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from torch import Tensor

from lift3d.config import ConfigError, parse_structured
from lift3d.priors.toyworld.model import DEFAULT_WEIGHTS, WEIGHTS_DIR, ToyWorldPrior
from lift3d.priors.toyworld.multiview import MULTIVIEW_META_KEY, MultiViewToyPrior, attention_layers
from lift3d.priors.toyworld.multiview_train import MultiViewTrainConfig
from lift3d.priors.viewdiff.attention import CrossFrameAttnProcessor
from lift3d.priors.viewdiff.model import ViewDiffConfig, _ProjectionHook, _Views, projection_sites
from lift3d.priors.viewdiff.projection import ProjectionLayer

DEFAULT_VIEWDIFF_WEIGHTS = WEIGHTS_DIR / "toyworld-viewdiff.safetensors"
VIEWDIFF_META_KEY = "lift3d_toyworld_viewdiff"
#: How to make the toy ViewDiff weights: the command the messages point to.
VIEWDIFF_TRAIN_COMMAND = "python -m lift3d.priors.toyworld train-viewdiff threads=2 --install"
#: The toy's settings where they differ from ViewDiff's on Stable Diffusion: one projection layer,
#: after the mid block (8x8 maps of 96 channels in the shipped UNet).
TOY_VIEWDIFF_DEFAULTS: dict[str, Any] = {"projection_after": ["mid_block"]}
#: The intensity every view is conditioned on (module docstring: the toy prior is not told the light).
NEUTRAL_INTENSITY = 0.5


class _ToyViews(_Views):
    """The cameras, view conditions and group size of the forward pass under way, read by the
    projection hooks and the cross-frame attention of one model (set only during forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.view_cond: Optional[Tensor] = None


class _CrossFrameCall:
    """The processor of one toy ``Attention`` layer: its :class:`CrossFrameAttnProcessor` called with
    the group size and view conditions of the call under way (``UNet2DModel`` passes its attention
    layers no keyword arguments). An object, not a closure, so a deep copy of the model gets calls
    that point at the copy's modules."""

    def __init__(self, lora: CrossFrameAttnProcessor, views: _ToyViews):
        self.lora, self.views = lora, views

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, temb: Optional[Tensor] = None, *args: Any,
                 **kwargs: Any) -> Tensor:
        v = self.views
        return self.lora(attn, hidden_states, encoder_hidden_states, attention_mask, temb, n_views=v.n_views,
                         view_cond=v.view_cond)


def _key(name: str) -> str:
    return name.replace(".", "_")


class ViewDiffToyPrior(MultiViewToyPrior):
    """``forward(x [B,3,H,W], t [B], tokens [B,L], camera [B,4], drop_text [B], n_views) -> [B,3,H,W]``.

    The multi-view toy prior's call (``B`` whole groups of ``n_views`` consecutive views; default
    ``mv_cfg.n_views``) with ViewDiff's cross-frame LoRA on every attention layer and its
    projection layer after the blocks of ``vd_cfg.projection_after`` (module docstring).
    """

    def __init__(self, cfg: Any = None, mv_cfg: Any = None, vd_cfg: ViewDiffConfig | dict | None = None):
        super().__init__(cfg, mv_cfg)
        given = asdict(vd_cfg) if isinstance(vd_cfg, ViewDiffConfig) else dict(vd_cfg or {})
        vc = parse_structured(ViewDiffConfig, {**TOY_VIEWDIFF_DEFAULTS, **given}, key="toyworld.viewdiff")
        sites = projection_sites(self.unet)
        chosen = list(vc.projection_after if vc.projection_after is not None else sites)
        bad = [n for n in chosen if n not in sites]
        if bad or len(set(chosen)) != len(chosen):
            raise ConfigError(f"toyworld.viewdiff.projection_after: {chosen} must name distinct blocks of "
                              f"{', '.join(sites)} (never the first or last block of the UNet)")
        self.vd_cfg = ViewDiffConfig(**{**asdict(vc), "projection_after": chosen})
        self._views = _ToyViews()
        self.cross_frame = nn.ModuleDict()
        for name, layer in attention_layers(self.unet).items():
            lora = CrossFrameAttnProcessor.for_layer(layer, rank=vc.lora_rank, scale=vc.lora_scale,
                                                     cond_hidden=vc.cond_hidden)
            self.cross_frame[_key(name)] = lora
            layer.set_processor(_CrossFrameCall(lora, self._views))
        self.projections = nn.ModuleDict()
        for name in chosen:
            layer = ProjectionLayer(sites[name], vc.proj_channels, vc.grid_size, vc.bound, vc.n_samples,
                                    vc.proj_hidden)
            self.projections[_key(name)] = layer
            self.unet.get_submodule(name).register_forward_hook(_ProjectionHook(layer, self._views, name))

    @staticmethod
    def is_added(name: str) -> bool:
        """Whether parameter ``name`` belongs to what ViewDiff adds (not to the single-view network)."""
        return name.startswith(("cross_frame.", "projections."))

    def added_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if self.is_added(n)]

    def view_cameras(self, camera: Tensor, n_views: int) -> tuple[Tensor, Tensor, Tensor]:
        """``c2w`` [B, 4, 4], normalised intrinsics [B, 3, 3] and ViewDiff's view condition [B, 9] of toy
        camera vectors ``camera`` [B, 4] (float32, outside any autocast)."""
        from lift3d.priors.toyworld.data import camera_from_vector
        from lift3d.priors.viewdiff.cameras import intrinsics_from_fovy, orbit_c2w, view_condition

        with torch.autocast(camera.device.type, enabled=False):
            el, az, dist = camera_from_vector(camera.detach().float())
            c2w = orbit_c2w(el, az, dist)
            K = intrinsics_from_fovy(torch.full_like(el, self.cfg.ray_fovy))
            cond = view_condition(c2w, K, torch.full_like(el, NEUTRAL_INTENSITY), n_views)
        return c2w, K, cond

    def forward(self, x: Tensor, t: Tensor, tokens: Tensor, camera: Tensor, drop_text: Tensor | None = None,
                n_views: int | None = None) -> Tensor:
        f = self.mv_cfg.n_views if n_views is None else int(n_views)
        if f < 1 or x.shape[0] % f:
            raise ValueError(f"a batch of {x.shape[0]} views cannot be split into groups of n_views={f}")
        c2w, K, cond = self.view_cameras(camera, f)
        dt = self.unet.conv_in.weight.dtype
        v = self._views
        v.c2w, v.intrinsics, v.view_cond, v.n_views = c2w.to(dt), K.to(dt), cond.to(dt), f
        try:
            return super().forward(x, t, tokens, camera, drop_text, n_views=f)
        finally:
            v.c2w = v.intrinsics = v.view_cond = None
            v.n_views = 1

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:
        """Weights and the three configs to a safetensors file (atomically)."""
        return super().save(path, {VIEWDIFF_META_KEY: json.dumps(asdict(self.vd_cfg)), **(extra_metadata or {})})

    @classmethod
    def default_weights(cls) -> Path:
        """``weights/toyworld-viewdiff.safetensors``: what :meth:`load` reads when given no path."""
        return DEFAULT_VIEWDIFF_WEIGHTS

    @classmethod
    def missing_weights_message(cls, path: Path) -> str:
        return (f"toy ViewDiff weights not found at {path}. They are made by fine-tuning the shipped single-view "
                f"prior with ViewDiff's layers added, on groups of views: run `{VIEWDIFF_TRAIN_COMMAND}` (the "
                f"packaged recipe-viewdiff.yaml; --install writes them to {DEFAULT_VIEWDIFF_WEIGHTS}), or pass "
                "the path of a file you trained.")

    @classmethod
    def from_metadata(cls, path: Path, meta: dict[str, str]) -> "ViewDiffToyPrior":
        """The architecture of a file written by :meth:`save`; a file without ViewDiff's layers is refused."""
        if VIEWDIFF_META_KEY not in meta:
            kind = "multi-view (toy MVDream)" if MULTIVIEW_META_KEY in meta else "single-view"
            raise ValueError(f"{path} is a {kind} toy-world prior without ViewDiff's layers (no "
                             f"'{VIEWDIFF_META_KEY}' in its metadata); ViewDiffToyPrior.from_single_view(path) "
                             f"starts a toy ViewDiff from it, and `{VIEWDIFF_TRAIN_COMMAND}` fine-tunes one")
        mv = json.loads(meta[MULTIVIEW_META_KEY]) if MULTIVIEW_META_KEY in meta else {}
        return cls(json.loads(meta["lift3d_toyworld_config"]), mv, json.loads(meta[VIEWDIFF_META_KEY]))

    @classmethod
    def from_single_view(cls, path: str | Path | None = None, n_views: int = 4,  # type: ignore[override]
                         vd_cfg: ViewDiffConfig | dict | None = None, seed: int = 0) -> "ViewDiffToyPrior":
        """A toy ViewDiff whose network is the file's (None or "shipped": the packaged single-view weights;
        a toy MVDream file works too) and whose added parts are new: the LoRA's ``up`` and the
        projection's output at zero, the rest drawn from ``seed``."""
        src = ToyWorldPrior.load(DEFAULT_WEIGHTS if path in (None, "shipped") else path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(asdict(src.cfg), {"n_views": n_views}, vd_cfg)
        missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
        if unexpected or any(not cls.is_added(k) for k in missing):
            raise ValueError(f"{path}: the file's network does not match ({unexpected[:3]} unplaced, "
                             f"{[k for k in missing if not cls.is_added(k)][:3]} missing)")
        return model


# ---------------------------------------------------------------------------------------------
# Fine-tuning: the toy MVDream's data, loss and loop (multiview_train), with this model


PACKAGED_VIEWDIFF_RECIPE = Path(__file__).with_name("recipe-viewdiff.yaml")
FINAL_VIEWDIFF_NAME = "toyworld-viewdiff.safetensors"


@dataclass
class ViewDiffTrainConfig(MultiViewTrainConfig):
    out_dir: str = "outputs/toyworld-prior-viewdiff"
    """Checkpoint, logs, sample grids and the final safetensors file."""
    viewdiff: dict[str, Any] = field(default_factory=dict)
    """ViewDiffConfig of the added parts (LoRA rank, projection_after, grid_size, ...) when they are new
    (init_from a single-view or toy MVDream file); a toy ViewDiff file brings its own, which these
    keys must then match."""
    train_unet: bool = True
    """Train the toy network's own weights with the added parts (as the toy MVDream fine-tune does);
    false: only the cross-frame LoRA and the projection layers (as ViewDiff on Stable Diffusion)."""


def initial_viewdiff_model(cfg: ViewDiffTrainConfig) -> ViewDiffToyPrior:
    """The model a run starts from (before any checkpoint is loaded), with only what trains requiring grad."""
    from safetensors import safe_open

    from lift3d.priors.toyworld.vocab import VOCAB

    if cfg.init_from is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = ViewDiffToyPrior({"vocab_size": len(VOCAB), **cfg.model}, {"n_views": cfg.n_views}, cfg.viewdiff)
    else:
        if cfg.model:
            raise ConfigError("train-viewdiff: 'model' sets the architecture of a random start; with init_from "
                              f"({cfg.init_from!r}) the architecture is the file's. Set init_from=null or drop model")
        path = DEFAULT_WEIGHTS if cfg.init_from == "shipped" else Path(cfg.init_from)
        meta: dict[str, str] = {}
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        if VIEWDIFF_META_KEY in meta:
            model = ViewDiffToyPrior.load(path)
            model.mv_cfg.n_views = cfg.n_views
            differ = {k: v for k, v in cfg.viewdiff.items() if getattr(model.vd_cfg, k, None) != v}
            if differ:
                raise ConfigError(f"train-viewdiff: init_from ({cfg.init_from!r}) is a toy ViewDiff file whose added "
                                  f"parts are {asdict(model.vd_cfg)}; 'viewdiff' asks for {differ}. Drop those keys "
                                  "or start from a single-view file")
        else:
            model = ViewDiffToyPrior.from_single_view(path, cfg.n_views, cfg.viewdiff, seed=cfg.seed)
    if not cfg.train_unet:
        model.requires_grad_(False)
        for _, p in model.added_parameters():
            p.requires_grad_(True)
    return model


def train_viewdiff(cfg: ViewDiffTrainConfig | dict, progress: bool = True) -> Path:
    """Fine-tune (or resume) in ``cfg.out_dir``; returns the final (or, with stop_after, partial) weights.

    The toy MVDream's fine-tune (:func:`lift3d.priors.toyworld.multiview_train.train_multiview`) with
    this model: the same groups of renders, loss (one timestep and text drop per group) and loop."""
    from lift3d.priors.toyworld.multiview_train import check_counts, fit_groups
    from lift3d.priors.toyworld.train import start_run

    cfg = parse_structured(ViewDiffTrainConfig, cfg, key="train-viewdiff")
    check_counts(cfg, "train-viewdiff", ("steps", "groups_per_batch", "n_views", "num_groups", "ckpt_every",
                                         "log_every"))
    start_run(cfg, progress)
    return fit_groups(cfg, initial_viewdiff_model(cfg), FINAL_VIEWDIFF_NAME, "toyworld ViewDiff prior",
                      {"init_from": str(cfg.init_from), "train_unet": str(cfg.train_unet)}, progress)


def load_viewdiff_recipe(source: str | Path | dict | None = None) -> dict[str, Any]:
    """The fine-tune recipe at ``source`` (a YAML path, a mapping, or None: the packaged recipe-viewdiff.yaml),
    without its description; its keys are checked when the run's config is parsed."""
    from lift3d.priors.toyworld.recipe import read_recipe

    source, _ = read_recipe(source, PACKAGED_VIEWDIFF_RECIPE, "a mapping of train-viewdiff keys")
    return {k: v for k, v in source.items() if k != "description"}


def train_viewdiff_recipe(recipe: str | Path | dict | None = None, overrides: dict[str, Any] | None = None,
                          progress: bool = True) -> Path:
    """Run (or resume) the recipe with ``overrides`` (the command line's key=value pairs) on top."""
    from lift3d.config import merge_dicts

    return train_viewdiff(merge_dicts(load_viewdiff_recipe(recipe), dict(overrides or {})), progress=progress)


__all__ = ["DEFAULT_VIEWDIFF_WEIGHTS", "FINAL_VIEWDIFF_NAME", "NEUTRAL_INTENSITY", "PACKAGED_VIEWDIFF_RECIPE",
           "TOY_VIEWDIFF_DEFAULTS", "VIEWDIFF_META_KEY", "VIEWDIFF_TRAIN_COMMAND", "ViewDiffToyPrior",
           "ViewDiffTrainConfig", "initial_viewdiff_model", "load_viewdiff_recipe", "train_viewdiff",
           "train_viewdiff_recipe"]
