"""The toy world's twin of Zero-1-to-3 (Liu et al., ICCV 2023): novel views from one input view.

Zero123 fine-tunes Stable Diffusion to draw an object from a new viewpoint given one image of it
and the camera change. :class:`ToyZero123` makes the same change to the toy-world prior
(:class:`lift3d.priors.toyworld.model.ToyWorldPrior`), in the toy world's pixel space:

* The input view enters twice, as in Zero123: its pixels as extra input channels beside the noisy
  image (Zero123 concatenates the input's VAE latent), and a global embedding of it (Zero123's
  CLIP image embedding) added to the conditioning vector. The embedding is a small convolutional
  encoder, mean-pooled, followed by an MLP that also reads the input view's elevation and distance.
* The camera is relative in azimuth: the target's camera vector is the toy prior's
  (:func:`lift3d.priors.toyworld.data.camera_vector`) with the azimuth measured from the input
  view's, and absolute elevation and distance (the input's own are given to the embedding, as
  Stable Zero123 gives its input's polar angle). The model is not told where the object's front
  is; it reads that from the input view. With ``ray_conditioning`` the rays are drawn in the same
  frame, the input camera at azimuth 0.
* No text: the prompt's branch is the prior's learned null embedding. Classifier-free guidance
  drops the input view (zeros for its pixels and its embedding), as Zero123 does; the target
  camera is always given.
* Starting point: the shipped single-view prior (:meth:`ToyZero123.from_single_view`). The new
  input channels and the embedding's last layer start at zero, so before fine-tuning the model is
  the shipped prior with its text dropped, at the relative camera.

Training data are groups of ``1 + n_targets`` exact renders of one catalogue object: the input
view (a camera of the single-view data's distribution, lit from the camera with probability
``input_headlight``, else as the training data), then ``n_targets`` targets at independent
cameras and lights of that distribution. Files: the single-view format plus the metadata key
``lift3d_toyworld_zero123`` (this module's config).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lift3d.config import ConfigError, parse_structured
from lift3d.priors.toyworld.model import DEFAULT_WEIGHTS, WEIGHTS_DIR, ToyPriorConfig, ToyWorldPrior, make_scheduler
from lift3d.priors.toyworld.multiview_train import (GroupFineTuneConfig, MultiViewDataset, _focus_indices, check_counts,
                                                  draw_prompt)

DEFAULT_Z123_WEIGHTS = WEIGHTS_DIR / "toyworld-zero123.safetensors"
Z123_META_KEY = "lift3d_toyworld_zero123"
PACKAGED_Z123_RECIPE = Path(__file__).with_name("recipe-zero123.yaml")
FINAL_Z123_NAME = "toyworld-zero123.safetensors"
#: How to make the weights: the command the messages point to.
Z123_TRAIN_COMMAND = "python -m lift3d.priors.toyworld train-zero123 threads=2 --install"
Z123_CACHE_VERSION = 1
_PAIR_TAG = 0x7A31
_POSE_TAG = 0x9053


@dataclass
class Zero123TwinConfig:
    encoder_channels: list[int] = field(default_factory=lambda: [32, 64, 96])
    """Widths of the input view's encoder (one stride-2 3x3 convolution each)."""
    encoder_pool: Literal["mean", "flatten"] = "mean"
    """How the encoder's last feature map becomes a vector: its mean (position lost) or all of it
    flattened (where each feature is stays known: which side a nose or a handle is on)."""
    pose_head: bool = False
    """Estimate, from the encoder's features, the input view's azimuth in the object's own frame (as
    its sine and cosine) and give the UNet the target camera in that frame: the camera vector and rays
    the single-view prior was trained on. Supervised by the rendered azimuth during fine-tuning
    (``pose_weight``); the model is still told only the camera change from the input."""


# ---------------------------------------------------------------------------------------------
# Cameras


def relative_camera(elevation: Tensor, azimuth: Tensor, distance: Tensor, input_azimuth: Tensor) -> Tensor:
    """[B, 4] camera vector of target views with the azimuth measured from the input view's (degrees)."""
    from lift3d.priors.toyworld.data import camera_vector

    return camera_vector(elevation, azimuth - input_azimuth, distance)


def input_camera(elevation: Tensor, distance: Tensor) -> Tensor:
    """[B, 2] what the embedding reads of the input view's camera: elevation / 90, normalised distance."""
    from lift3d.priors.toyworld.data import DISTANCE_CENTRE, DISTANCE_HALF_RANGE

    return torch.stack([elevation / 90.0, (distance - DISTANCE_CENTRE) / DISTANCE_HALF_RANGE], dim=-1)


def object_frame_camera(camera: Tensor, pose: Tensor) -> Tensor:
    """[B, 4] relative camera vectors turned by the input's estimated azimuth ``pose`` [B, 2] (sin,
    cos; normalised here): the target's camera in the object's frame."""
    sc = F.normalize(pose.float(), dim=-1, eps=1e-6).to(camera.dtype)
    s_in, c_in = sc[:, 0], sc[:, 1]
    s_rel, c_rel = camera[:, 1], camera[:, 2]
    return torch.stack([camera[:, 0], s_rel * c_in + c_rel * s_in, c_rel * c_in - s_rel * s_in, camera[:, 3]], dim=-1)


# ---------------------------------------------------------------------------------------------
# The model


class ToyZero123(ToyWorldPrior):
    """``forward(x [B,3,H,W], t [B], image [B,3,H,W] in [-1,1], camera [B,4], input_cam [B,2], drop_image [B])``.

    ``camera``: :func:`relative_camera` of the targets; ``input_cam``: :func:`input_camera` of the
    input views; rows with ``drop_image`` see neither the input's pixels nor its embedding.
    """

    def __init__(self, cfg: ToyPriorConfig | dict | None = None, z_cfg: Zero123TwinConfig | dict | None = None):
        super().__init__(cfg)
        self.z_cfg = parse_structured(Zero123TwinConfig, z_cfg or {}, key="toyworld.zero123")
        s = self.cfg.space_to_depth
        # the input view's pixels come after the noisy image (and the rays), through a convolution of
        # their own that starts at zero (a layer apart, so that it can learn at its own rate)
        self.unet.conv_in = _ConvInWithView(self.unet.conv_in, 3 * s * s)
        layers: list[nn.Module] = []
        c_in = 3
        for c in self.z_cfg.encoder_channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.SiLU()]
            c_in = c
        self.image_encoder = nn.Sequential(*layers)
        emb_dim = self.null_text.shape[0]
        if self.z_cfg.encoder_pool == "flatten":
            side = self.cfg.resolution // 2 ** len(self.z_cfg.encoder_channels)
            c_in *= side * side
        self.image_proj = nn.Sequential(nn.Linear(c_in + 2, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        nn.init.zeros_(self.image_proj[-1].weight)
        nn.init.zeros_(self.image_proj[-1].bias)
        self.pose_head = None
        if self.z_cfg.pose_head:
            # its last layer starts at (sin, cos) = (0, 1): the input taken as the object's front view
            self.pose_head = nn.Sequential(nn.Linear(c_in + 2, emb_dim), nn.SiLU(), nn.Linear(emb_dim, 2))
            nn.init.zeros_(self.pose_head[-1].weight)
            with torch.no_grad():
                self.pose_head[-1].bias.copy_(torch.tensor([0.0, 1.0]))

    def new_parameters(self) -> list[nn.Parameter]:
        """The parameters the single-view prior does not have (they start at zero or random)."""
        head = [] if self.pose_head is None else list(self.pose_head.parameters())
        return [self.unet.conv_in.view.weight, *self.image_encoder.parameters(), *self.image_proj.parameters(), *head]

    def lr_groups(self, cfg: Any) -> list[dict[str, Any]]:
        """Optimizer groups for :func:`lift3d.priors.toyworld.train.fit`: the new layers learn
        ``cfg.new_lr_scale`` times faster than the layers the shipped prior already trained."""
        new = {id(p) for p in self.new_parameters()}
        return [{"params": [p for p in self.parameters() if id(p) not in new]},
                {"params": self.new_parameters(), "lr_scale": float(getattr(cfg, "new_lr_scale", 1.0))}]

    def image_features(self, image: Tensor, input_cam: Tensor) -> Tensor:
        """[B, 3, H, W], [B, 2] -> [B, F]: the encoder's pooled features and the input's camera."""
        feats = self.image_encoder(image)
        feats = feats.mean(dim=(2, 3)) if self.z_cfg.encoder_pool == "mean" else feats.flatten(1)
        return torch.cat([feats, input_cam.to(feats.dtype)], dim=-1)

    def image_embedding(self, image: Tensor, input_cam: Tensor) -> Tensor:
        """[B, 3, H, W], [B, 2] -> [B, D]: the input view's contribution to the conditioning vector."""
        return self.image_proj(self.image_features(image, input_cam))

    def input_pose(self, image: Tensor, input_cam: Tensor) -> Tensor:
        """[B, 2]: the pose head's raw (sin, cos) of the input view's azimuth in the object's frame."""
        if self.pose_head is None:
            raise ValueError("this toy Zero123 has no pose head (toyworld.zero123.pose_head: false)")
        return self.pose_head(self.image_features(image, input_cam))

    def forward(self, x: Tensor, t: Tensor, image: Tensor, camera: Tensor, input_cam: Tensor,  # type: ignore[override]
                drop_image: Tensor | None = None) -> Tensor:
        image = image.to(x.dtype)
        feats = self.image_features(image, input_cam)
        emb = self.image_proj(feats)
        if drop_image is not None:
            keep = (~drop_image).to(x.dtype)
            image = image * keep.view(-1, 1, 1, 1)
            emb = emb * keep[:, None]
        if self.pose_head is not None:
            # the dropped rows too: classifier-free guidance then contrasts the input's identity alone,
            # both branches drawn at the same camera, as the single-view prior's guidance is. Detached:
            # the head learns from the rendered azimuths alone; the denoising loss's gradient through a
            # near-zero (sin, cos), amplified by its normalisation, kept it from learning (model card)
            camera = object_frame_camera(camera, self.pose_head(feats).detach())
        null = self.text_proj(self.null_text)[None]
        cond = null + emb + self.camera_mlp(self.camera_features(camera.to(x.dtype)))
        return self.denoise(x, t, cond, camera, extra=image)

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:
        meta = {Z123_META_KEY: json.dumps(asdict(self.z_cfg)), **(extra_metadata or {})}
        return super().save(path, meta)

    @classmethod
    def default_weights(cls) -> Path:
        return DEFAULT_Z123_WEIGHTS

    @classmethod
    def missing_weights_message(cls, path: Path) -> str:
        return (f"toy Zero123 weights not found at {path}. They are made by fine-tuning the shipped single-view "
                f"prior on pairs of views: run `{Z123_TRAIN_COMMAND}` (the packaged recipe-zero123.yaml; --install "
                f"writes them to {DEFAULT_Z123_WEIGHTS}), or pass the path of a file you trained.")

    @classmethod
    def from_metadata(cls, path: Path, meta: dict[str, str]) -> "ToyZero123":
        if Z123_META_KEY not in meta:
            raise ValueError(f"{path} is not a toy Zero123 file (no '{Z123_META_KEY}' in its metadata); "
                             f"ToyZero123.from_single_view(path) starts one from a single-view prior, and "
                             f"`{Z123_TRAIN_COMMAND}` fine-tunes it")
        return cls(json.loads(meta["lift3d_toyworld_config"]), json.loads(meta[Z123_META_KEY]))

    @classmethod
    def from_single_view(cls, path: str | Path | None = None, z_cfg: dict | None = None) -> "ToyZero123":
        """A model initialised from a single-view file (None or "shipped": the packaged weights): every
        parameter of the file, the widened input convolution's new channels and the embedding's last
        layer at zero, the encoder at its random start."""
        src = ToyWorldPrior.load(DEFAULT_WEIGHTS if path in (None, "shipped") else path)
        model = cls(asdict(src.cfg), z_cfg)
        own = model.state_dict()
        for key, value in src.state_dict().items():
            own[key.replace("unet.conv_in.", "unet.conv_in.base.")] = value
        model.load_state_dict(own)
        return model


class _ConvInWithView(nn.Module):
    """The UNet's input convolution over [noisy image (+ rays) | input view] channels: the shipped
    layer on the first, a new bias-free layer (zero at the start) on the input view's, summed."""

    def __init__(self, base: nn.Conv2d, view_channels: int):
        super().__init__()
        self.base, self.n = base, base.in_channels
        self.view = nn.Conv2d(view_channels, base.out_channels, base.kernel_size, base.stride, base.padding, bias=False)
        nn.init.zeros_(self.view.weight)
        self.view.to(memory_format=torch.channels_last)

    def forward(self, h: Tensor) -> Tensor:
        return self.base(h[:, : self.n]) + self.view(h[:, self.n:])


@torch.no_grad()
def sample_novel_views(model: ToyZero123, image: Tensor, input_elevation: Tensor, input_azimuth: Tensor,
                       input_distance: Tensor, elevation: Tensor, azimuth: Tensor, distance: Tensor,
                       steps: int = 50, guidance_scale: float = 3.0, generator: torch.Generator | None = None,
                       eta: float = 0.0) -> Tensor:
    """DDIM samples of the targets (angles in degrees, [B]) given input views ``image`` [B, 3, H, W] in
    [0, 1] seen from the ``input_*`` cameras; classifier-free guidance drops the input view. Returns
    [B, 3, H, W] in [0, 1]. The clipped clean estimate re-derives the noise, as the text prior's sampler."""
    cfg = model.cfg
    sched = make_scheduler(cfg, "ddim")
    sched.set_timesteps(steps)
    B = image.shape[0]
    dev = next(model.parameters()).device
    x = torch.randn(B, 3, cfg.resolution, cfg.resolution, generator=generator).to(dev)
    cond_img = (image.to(dev) * 2 - 1)
    cam = relative_camera(elevation, azimuth, distance, input_azimuth).to(dev)
    icam = input_camera(input_elevation, input_distance).to(dev)
    drop = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)]).to(dev)
    for t in sched.timesteps:
        tt = torch.full((2 * B,), int(t), device=dev, dtype=torch.long)
        out = model(torch.cat([x, x]), tt, torch.cat([cond_img, cond_img]), torch.cat([cam, cam]),
                    torch.cat([icam, icam]), drop)
        cond, uncond = out.chunk(2)
        guided = uncond + guidance_scale * (cond - uncond)
        x = sched.step(guided, t, x, eta=eta, generator=generator, use_clipped_model_output=True).prev_sample
    return ((x + 1) / 2).clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# Data


def sample_pair_params(seed: int, groups: range | list[int], n_targets: int = 4, focus: list[int] | None = None,
                       focus_fraction: float = 0.0, input_headlight: float = 0.5) -> dict[str, Tensor]:
    """The random choices of groups ``groups`` flattened group-major: per group the input view, then
    ``n_targets`` targets (prompt_index, elevation, azimuth, distance [N], light_dirs [N, 3]).

    Group ``i`` depends only on ``(seed, i)`` and the focus and light settings."""
    from lift3d.priors.toyworld.data import FOVY, _sample_generator, light_in_upper_hemisphere, sample_cameras
    from lift3d.priors.toyworld.shapes import list_prompts
    from lift3d.utils.cameras import make_cameras

    n_prompts, n = len(list_prompts()), 1 + n_targets
    rows: dict[str, list[Tensor]] = {k: [] for k in ("prompt_index", "elevation", "azimuth", "distance", "light_dirs")}
    for i in groups:
        g = _sample_generator(seed, i, _PAIR_TAG)
        prompt_index = draw_prompt(g, n_prompts, focus, focus_fraction)
        elev, az, dist = sample_cameras(n, g)
        cams = make_cameras(elev, az, dist, torch.full((n,), FOVY), 1, 1)
        light = light_in_upper_hemisphere(cams, g)
        if float(torch.rand(1, generator=g)) < input_headlight:
            light[0] = F.normalize(cams["camera_positions"][0], dim=0)
        rows["prompt_index"].append(torch.full((n,), prompt_index, dtype=torch.long))
        rows["elevation"].append(elev)
        rows["azimuth"].append(az)
        rows["distance"].append(dist)
        rows["light_dirs"].append(light)
    return {k: torch.cat(v) for k, v in rows.items()}


class PairDataset(MultiViewDataset):
    """Groups of an input view and ``n_targets`` targets of one object (:func:`sample_pair_params`),
    rendered once and cached; batches as :class:`MultiViewDataset`'s (a group's views consecutive)."""

    def __init__(self, groups_per_batch: int = 8, seed: int = 0, num_groups: int = 4000, n_targets: int = 4,
                 resolution: int = 64, cache_dir: str | os.PathLike | None = None,
                 focus_prompts: list[str] | None = None, focus_fraction: float = 0.0, input_headlight: float = 0.5,
                 feature_regions: bool = False):
        if not 0.0 <= input_headlight <= 1.0:
            raise ValueError(f"input_headlight must be in [0, 1], got {input_headlight}")
        self.input_headlight = input_headlight
        super().__init__(groups_per_batch, seed, num_groups, 1 + n_targets, resolution, cache_dir, focus_prompts,
                         focus_fraction, feature_regions=feature_regions)

    def _settings(self) -> dict[str, Any]:
        return {"focus": self.focus, "focus_fraction": self.focus_fraction, "input_headlight": self.input_headlight}

    def group_params(self, groups: range) -> dict[str, Tensor]:
        return sample_pair_params(self.seed, groups, self.n_views - 1, self.focus, self.focus_fraction,
                                  self.input_headlight)

    def cache_path(self) -> Path:
        import hashlib

        tag = hashlib.sha1(json.dumps(self._settings(), sort_keys=True).encode()).hexdigest()[:10]
        name = (f"toyworld_z123_v{Z123_CACHE_VERSION}_seed{self.seed}_g{self.num_groups}_n{self.n_views}"
                f"_r{self.resolution}_{tag}.npz")
        return Path(self.cache_dir) / name  # type: ignore[arg-type]


def split_pairs(batch: dict[str, Tensor], n_targets: int) -> dict[str, Tensor]:
    """A batch of whole groups -> the model's inputs for every target: ``target`` [N, 3, H, W], ``image``
    (its group's input view), ``camera`` (:func:`relative_camera`), ``input_cam`` and, when the batch has
    them, ``feature_region``."""
    n = 1 + n_targets
    B = batch["image"].shape[0]
    if B % n:
        raise ValueError(f"a batch of {B} views is not whole groups of 1 + {n_targets}")
    idx = torch.arange(B).view(-1, n)
    inp, tgt = idx[:, 0].repeat_interleave(n_targets), idx[:, 1:].reshape(-1)
    out = {
        "target": batch["image"][tgt],
        "image": batch["image"][inp],
        "camera": relative_camera(batch["elevation"][tgt], batch["azimuth"][tgt], batch["distance"][tgt],
                                  batch["azimuth"][inp]),
        "input_cam": input_camera(batch["elevation"][inp], batch["distance"][inp]),
        "input_azimuth": batch["azimuth"][inp],
    }
    if "feature_region" in batch:
        out["feature_region"] = batch["feature_region"][tgt]
    return out


def pair_loss(model: ToyZero123, sched: Any, batch: dict[str, Tensor], g: torch.Generator, n_targets: int,
              feature_weight: float = 0.0, autocast: str | None = None, align_weight: float = 0.0,
              pose_weight: float = 0.0) -> Tensor:
    """The denoising loss of the targets given their input views: the single-view prior's target
    (v or epsilon MSE on the same schedule), one timestep, noise and input-view drop per target, all
    drawn from ``g``; the front-feature pixels weigh ``1 + feature_weight``.

    ``align_weight`` adds the image embedding's squared distance to what the object's prompt adds to
    the text-dropped conditioning of the prior (both [D]; the target detached), per input view: the
    toy analogue of CLIP, whose image embeddings sit where the text's do, so the UNet reads the
    input's identity in a language it already knows.

    ``pose_weight`` adds the pose head's squared error to the (sin, cos) of the rendered azimuth, for
    every view of the batch (input views and targets alike: more views of the few objects whose front
    shows than the input views alone give). Views of a symmetric object do not tell their azimuth; the least-squares answer there is
    a short vector, whose direction (and so the camera it turns) matters as little as the view."""
    from lift3d.priors.toyworld.train import _autocast_enabled

    p = split_pairs(batch, n_targets)
    x0 = p["target"]
    N = x0.shape[0]
    t = torch.randint(0, model.cfg.num_train_timesteps, (N,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    drop = torch.rand(N, generator=g) < model.cfg.p_uncond
    x_t = sched.add_noise(x0, noise, t)
    with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=_autocast_enabled(autocast)):
        out = model(x_t, t, p["image"], p["camera"], p["input_cam"], drop)
    target = noise if model.cfg.prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)
    err = F.mse_loss(out.float(), target, reduction="none")
    if feature_weight:
        if "feature_region" not in p:
            raise ValueError("feature_weight needs batches with a feature_region")
        err = err * (1 + feature_weight * p["feature_region"])
    loss = err.mean()
    if align_weight:
        n = 1 + n_targets
        first = torch.arange(0, batch["image"].shape[0], n)
        with torch.no_grad():
            text = model.text_embedding(batch["tokens"][first]) - model.text_proj(model.null_text)[None]
        with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=_autocast_enabled(autocast)):
            emb = model.image_embedding(batch["image"][first], p["input_cam"][::n_targets])
        loss = loss + align_weight * F.mse_loss(emb.float(), text.float())
    if pose_weight:  # every view of the batch, targets too: each is a render at a known azimuth
        az = torch.deg2rad(batch["azimuth"].float())
        with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=_autocast_enabled(autocast)):
            pose = model.input_pose(batch["image"], input_camera(batch["elevation"], batch["distance"]))
        loss = loss + pose_weight * F.mse_loss(pose.float(), torch.stack([torch.sin(az), torch.cos(az)], dim=-1))
    return loss


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class Zero123TrainConfig(GroupFineTuneConfig):
    steps: int = 2000
    """Optimizer steps (the cosine learning-rate decay spans them)."""
    num_groups: int = 3000
    """Training groups (input + targets), rendered once and cached under cache_dir."""
    out_dir: str = "outputs/toyworld-prior-zero123"
    """Checkpoint, logs, sample grids and the final safetensors file."""
    n_targets: int = 4
    """Targets per input view (a step sees groups_per_batch * n_targets targets)."""
    input_headlight: float = 0.5
    """Share of input views lit from their camera (the rest: as the training data)."""
    align_weight: float = 0.0
    """Weight of the image embedding's alignment to the prompt's text embedding (:func:`pair_loss`)."""
    pose_weight: float = 0.0
    """Weight of the pose head's error on the views' azimuths (:func:`pair_loss`; needs
    ``encoder.pose_head``)."""
    pose_pretrain_steps: int = 0
    """Before the fine-tune (a fresh run only; a resumed one has them in its checkpoint): steps that
    fit the input encoder and the pose head alone to the azimuths of random views of the whole data
    set (:func:`pretrain_pose`)."""
    pose_pretrain_batch: int = 128
    """Views a pose pre-training step."""
    pose_pretrain_lr: float = 1.0e-3
    """Adam's learning rate in the pose pre-training."""
    encoder: dict[str, Any] = field(default_factory=dict)
    """Zero123TwinConfig of the input view's encoder (a start from a single-view file only)."""
    new_lr_scale: float = 1.0
    """Learning rate of the new layers (the input view's convolution, encoder and embedding) as a
    multiple of ``lr``: they start at zero, the rest is the shipped prior's."""


def initial_model(cfg: Zero123TrainConfig) -> ToyZero123:
    from safetensors import safe_open

    from lift3d.priors.toyworld.vocab import VOCAB

    if cfg.init_from is None:
        return ToyZero123({"vocab_size": len(VOCAB), **cfg.model}, cfg.encoder)
    if cfg.model:
        raise ConfigError("train-zero123: 'model' sets the architecture of a random start; with init_from "
                          f"({cfg.init_from!r}) the architecture is the file's. Set init_from=null or drop model")
    path = DEFAULT_WEIGHTS if cfg.init_from == "shipped" else Path(cfg.init_from)
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            if Z123_META_KEY in (f.metadata() or {}):
                return ToyZero123.load(path)
    return ToyZero123.from_single_view(path, cfg.encoder)


def train_zero123(cfg: Zero123TrainConfig | dict, progress: bool = True) -> Path:
    """Fine-tune (or resume) in ``cfg.out_dir``; returns the final (or, with stop_after, partial) weights.
    The loop is the single-view training's (:func:`lift3d.priors.toyworld.train.fit`)."""
    from lift3d.priors.toyworld.train import _step_generator, epoch_batch, fit, start_run

    cfg = parse_structured(Zero123TrainConfig, cfg, key="train-zero123")
    check_counts(cfg, "train-zero123", ("steps", "groups_per_batch", "n_targets", "num_groups", "ckpt_every",
                                        "log_every", "pose_pretrain_batch"))
    _focus_indices(list(cfg.focus_prompts))  # unknown prompts fail before anything is built
    start_run(cfg, progress)
    model = initial_model(cfg)
    if cfg.pose_weight and model.pose_head is None:
        raise ConfigError(f"train-zero123: pose_weight={cfg.pose_weight} trains a pose head, but the model has none: "
                          "set encoder.pose_head=true (a start from a single-view file) or pose_weight=0")

    cache = cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "lift3d", "toyworld")
    ds = PairDataset(cfg.groups_per_batch, cfg.seed, cfg.num_groups, cfg.n_targets, model.cfg.resolution, cache,
                     cfg.focus_prompts, cfg.focus_fraction, cfg.input_headlight, feature_regions=bool(cfg.feature_weight))
    if cfg.pose_pretrain_steps and not (Path(cfg.out_dir) / "ckpt.pt").exists():
        if model.pose_head is None:
            raise ConfigError("train-zero123: pose_pretrain_steps needs a pose head: set encoder.pose_head=true")
        losses = pretrain_pose(model, ds.data(), cfg.pose_pretrain_steps, cfg.pose_pretrain_batch, cfg.pose_pretrain_lr,
                               cfg.seed)
        with open(Path(cfg.out_dir) / "pose_pretrain.csv", "w") as fh:
            fh.write("step,loss\n" + "".join(f"{i + 1},{v:.6f}\n" for i, v in enumerate(losses)))

    def batches() -> Callable[[int], dict[str, Tensor]]:
        ds.data()
        return lambda step: epoch_batch(ds, step)

    def loss_at(model: ToyZero123, sched: Any, batch: dict[str, Tensor], step: int) -> Tensor:
        return pair_loss(model, sched, batch, _step_generator(cfg.seed, step, 1), cfg.n_targets, cfg.feature_weight,
                         cfg.autocast, cfg.align_weight, cfg.pose_weight)

    return fit(cfg, model, batches, loss_at, save_novel_view_grid, name=FINAL_Z123_NAME.removesuffix(".safetensors"),
               desc="toyworld zero123", extra_metadata={"init_from": str(cfg.init_from)}, progress=progress)


def pretrain_pose(model: ToyZero123, data: dict[str, Tensor], steps: int, batch_size: int, lr: float,
                  seed: int) -> list[float]:
    """Fit the input encoder and the pose head (nothing else) to the rendered azimuths of ``data``'s
    views (every view of every group, :meth:`PairDataset.data`), ``batch_size`` views drawn at random a
    step from a generator seeded by ``seed``; returns the loss of each step. A few views a fine-tune
    step are too few for the head: the objects whose front shows are a quarter of the data."""
    from lift3d.priors.toyworld.data import collate

    params = [*model.image_encoder.parameters(), *model.pose_head.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed * 1_000_003 + _POSE_TAG)
    n = data["image"].shape[0]
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=g)
        b = collate({k: v[idx] for k, v in data.items()})
        az = torch.deg2rad(b["azimuth"].float())
        pose = model.input_pose(b["image"], input_camera(b["elevation"], b["distance"]))
        loss = F.mse_loss(pose, torch.stack([torch.sin(az), torch.cos(az)], dim=-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def load_z123_recipe(source: str | Path | dict | None = None) -> dict[str, Any]:
    """The fine-tune recipe (a YAML path, a mapping, or None: the packaged recipe-zero123.yaml), without
    its description."""
    from lift3d.priors.toyworld.recipe import read_recipe

    source, _ = read_recipe(source, PACKAGED_Z123_RECIPE, "a mapping of train-zero123 keys")
    return {k: v for k, v in source.items() if k != "description"}


def train_zero123_recipe(recipe: str | Path | dict | None = None, overrides: dict[str, Any] | None = None,
                         progress: bool = True) -> Path:
    from lift3d.config import merge_dicts

    return train_zero123(merge_dicts(load_z123_recipe(recipe), dict(overrides or {})), progress=progress)


# ---------------------------------------------------------------------------------------------
# Evaluation


GRID_PROMPTS = ("a snowman", "a chair", "a mug", "a red cube", "a blue torus")


def _input_views(prompts: list[str], elevation: float, azimuth: float, distance: float = 2.0) -> Tensor:
    """[P, 3, H, W] in [0, 1]: each object's exact render at the input camera, lit from the camera."""
    from lift3d.priors.toyworld.data import FOVY, RESOLUTION
    from lift3d.priors.toyworld.render import render
    from lift3d.priors.toyworld.shapes import get_object
    from lift3d.utils.cameras import make_cameras

    P = len(prompts)
    cams = make_cameras(torch.full((P,), elevation), torch.full((P,), azimuth), torch.full((P,), distance),
                        torch.full((P,), FOVY), RESOLUTION, RESOLUTION)
    light = F.normalize(cams["camera_positions"], dim=-1)
    out = render([get_object(p) for p in prompts], cams, light)
    return out["rgb"].permute(0, 3, 1, 2)


def save_novel_view_grid(model: ToyZero123, path: Path, seed: int = 0, steps: int = 25,
                         prompts: tuple[str, ...] = GRID_PROMPTS, input_camera_deg: tuple[float, float] = (10.0, 30.0),
                         n_azimuths: int = 4) -> Path:
    """One row per prompt: the input view, then samples at elevation 20 and azimuths ``k * 360 / n``."""
    from lift3d.utils.io import image_grid, save_image

    n, P = n_azimuths, len(prompts)
    inputs = _input_views(list(prompts), *input_camera_deg)
    image = inputs.repeat_interleave(n, dim=0)
    az = (torch.arange(n, dtype=torch.float32) * (360.0 / n)).repeat(P)
    full = lambda v: torch.full((n * P,), float(v))  # noqa: E731
    was_training = model.training
    imgs = sample_novel_views(model.eval(), image, full(input_camera_deg[0]), full(input_camera_deg[1]), full(2.0),
                              full(20.0), az, full(2.0), steps=steps, generator=torch.Generator().manual_seed(seed))
    model.train(was_training)
    rows = [[inputs[i].permute(1, 2, 0).numpy()] + [imgs[i * n + j].permute(1, 2, 0).cpu().numpy() for j in range(n)]
            for i in range(P)]
    return save_image(path, image_grid(rows))


@torch.no_grad()
def evaluate_novel_views(model: ToyZero123, prompts: list[str] | None = None, n_per_prompt: int = 8,
                         input_camera_deg: tuple[float, float] = (10.0, 30.0), steps: int = 50,
                         guidance_scale: float = 3.0, seed: int = 0) -> list[Any]:
    """Novel views sampled from the object's input view at ``input_camera_deg`` (elevation, azimuth),
    scored against the exact renders at random training cameras: mask IoU, colour error and (snowman,
    chair, mug) the front check (:func:`lift3d.priors.toyworld.evaluate.score_samples`)."""
    from lift3d.priors.toyworld.data import FOVY, RESOLUTION, light_in_upper_hemisphere, sample_cameras
    from lift3d.priors.toyworld.evaluate import PromptScore, score_samples
    from lift3d.priors.toyworld.render import render
    from lift3d.priors.toyworld.shapes import get_object, list_prompts
    from lift3d.utils.cameras import make_cameras

    prompts = prompts or list_prompts()
    g = torch.Generator().manual_seed(seed)
    scores = []
    for prompt in prompts:
        obj = get_object(prompt)
        elev, az, dist = sample_cameras(n_per_prompt, g)
        fovy = torch.full((n_per_prompt,), FOVY)
        cams = make_cameras(elev, az, dist, fovy, RESOLUTION, RESOLUTION)
        light = light_in_upper_hemisphere(cams, g)
        gt = render(obj, cams, light)
        twin = None
        if obj.has_feature:
            rot = torch.tensor([[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]])
            twin = render(obj, make_cameras(elev, az + 180.0, dist, fovy, RESOLUTION, RESOLUTION), light @ rot.T)
        image = _input_views([prompt], *input_camera_deg).expand(n_per_prompt, -1, -1, -1)
        full = lambda v: torch.full((n_per_prompt,), float(v))  # noqa: E731
        imgs = sample_novel_views(model, image, full(input_camera_deg[0]), full(input_camera_deg[1]), full(2.0),
                                  elev, az, dist, steps=steps, guidance_scale=guidance_scale,
                                  generator=g).permute(0, 2, 3, 1).cpu()
        s = score_samples(imgs, gt, twin)
        scores.append(PromptScore(prompt, float(s["iou"].mean()), float(s["colour_error"].mean()),
                                  int(s["front_correct"].sum()) if twin is not None else 0,
                                  int(s["front_counted"].sum()) if twin is not None else 0,
                                  check="front" if twin is not None else None))
    return scores


__all__ = ["DEFAULT_Z123_WEIGHTS", "Z123_META_KEY", "Z123_TRAIN_COMMAND", "Zero123TwinConfig", "ToyZero123",
           "relative_camera", "input_camera", "object_frame_camera", "sample_novel_views", "sample_pair_params", "PairDataset", "split_pairs",
           "pair_loss", "pretrain_pose", "Zero123TrainConfig", "train_zero123", "train_zero123_recipe", "load_z123_recipe",
           "evaluate_novel_views", "save_novel_view_grid"]
