"""Point-E as a 3D score-distillation prior on the geometry's points: ``point-e-guidance``.

GSGEN (Chen et al., CVPR 2024, "Text-to-3D using Gaussian Splatting") adds to the 2D image prior a
3D one: Point-E (Nichol et al. 2022), a diffusion model of coloured point clouds of 1024 points,
scores the Gaussian centres directly, which keeps the geometry plausible from every side (fewer
Janus faces) while the image prior adds detail. This guidance is that 3D SDS, written against the
:mod:`lift3d.priors.point_e` prior (or any prior with the same methods, see :meth:`build_prior`):

* **Input.** ``requires()`` is ``{"points"}``: the system fills ``inp.points`` [N, 3] and
  ``inp.point_colors`` [N, 3] from ``geometry.guidance_points()`` (Gaussian splatting); a geometry
  without points fails at start-up.
* **Subsets.** Each step scores ``n_subsets`` subsets of ``n_points`` points (Point-E's 1024, its
  context size) chosen by farthest-point sampling (:func:`lift3d.utils.point_sampling.farthest_point_sample`)
  from a random start, so each subset covers the whole shape. Given ``t`` and ``noise`` the starts are
  evenly spaced indices instead of random ones, so a step is deterministic (the guidance contract). A
  cloud smaller than ``n_points`` is used whole, its points repeated in turn to fill the subset.
* **Colours.** Detached by default (``detach_colors``: GSGEN's ``mean_only``): the 3D prior moves
  the centres only and leaves colour to the image prior. ``colors: grey`` scores a fixed mid grey instead.
* **Frame and scale.** Our world is +z up with the front at +x; Point-E's clouds are +z up with the
  front at -y (GSGEN turns Point-E samples a quarter turn about z to face +x: its ``facex``). With
  ``point_e_frame`` the points are turned back into Point-E's frame before scoring, so the prior sees
  the object the way it was sampled (GSGEN's guidance skips this turn). Coordinates are then multiplied
  by ``point_scale`` (1, as GSGEN: its scene and Point-E's clouds have similar sizes), or, with
  ``normalize`` (GSGEN's option), scaled so the farthest point sits at 0.5. Then the prior's own
  channel scaling maps them into its space (``schedule.to_model_space``: xyz doubled, colours to [-1, 1],
  the scaling GSGEN sets for colours in [0, 1]).
* **SDS.** ``x_t = sqrt(a_t) x + sqrt(1 - a_t) eps`` with one t per subset drawn in
  [``min_step_percent``, ``max_step_percent``) of the 1024 steps; the gradient is
  ``w(t) (eps_cfg - eps)`` with ``w(t) = 1 - a_t`` (``weighting: sds``), and
  ``loss_sds = 0.5 ||x - sg(x - grad)||^2 / n_subsets`` has exactly that gradient (per subset, over the
  number of subsets) with respect to the scaled points, which autograd carries back through the
  scaling, the turn and the subset gather onto the Gaussian centres.
* **Classifier-free guidance** ``e_u + s (e_c - e_u)`` at ``guidance_scale`` (GSGEN's 100). The
  condition is Point-E's CLIP text vector of the prompt. The unconditional input is, by default
  (``uncond: zero``), the all-zero condition: what Point-E's condition dropout trained on and what
  GSGEN feeds (``texts=[None]``, a zero embedding in Point-E's CLIP wrapper); ``uncond: empty_text``
  uses the CLIP vector of the empty text instead (the literal reading of "CFG with the empty text").

The guidance also samples the initial point cloud (:meth:`sample_init_points`, what
``gaussian-splatting``'s ``init: guidance:NAME`` asks for): Point-E's sample for the prompt (with the
upsampler when configured: 4096 points, as GSGEN), turned into our frame, centred and scaled as
GSGEN's initialisation does.

The prior talks through: ``schedule.alphas_cumprod()``, ``schedule.to_model_space(xyz, rgb)``,
``encode_text(prompts)``, ``predict_eps(x_t, t, cond)`` and ``model.cfg.n_ctx`` (plus, for
initialisation, :meth:`_sample_cloud`). A subclass swaps the prior by overriding :meth:`build_prior`
(and :meth:`resolve` for its own weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from lift3d.config import ConfigError, Scheduled
from lift3d.guidance.base import GuidanceInput, GuidanceOutput
from lift3d.guidance.score_distillation import DiffusionGuidance, step_bounds, timestep_weight
from lift3d.priors.point_e.checkpoint import BASE_FILE, RELEASE_URL, UPSAMPLER_FILE
from lift3d.priors.point_e.prior import world_to_point_e
from lift3d.priors.point_e.text import DEFAULT_CLIP_MODEL
from lift3d.registry import register
from lift3d.utils.point_sampling import farthest_point_sample

DEFAULT_KEY = "system.guidance"
#: Where Point-E's own download code keeps the published files (``point_e_model_cache/`` in the working
#: directory): the default folder for both the base model and the upsampler.
DEFAULT_POINT_E_DIR = "point_e_model_cache"


@register("point-e-guidance")
class PointEGuidance(DiffusionGuidance):
    """3D score distillation of the geometry's points with Point-E; returns ``loss_sds``."""

    prior_family = "point-e"
    loss_name = "sds"

    @dataclass
    class Config:
        pretrained_model_name_or_path: str = DEFAULT_POINT_E_DIR
        """Point-E's text-conditioned base model: a folder holding the published ``base_40m_textvec.pt``
        (default: ``point_e_model_cache/``, where Point-E's own code downloads it), or the file itself (the
        original keys, read weights-only, or our safetensors copy). Not on the Hugging Face hub:
        ``curl -LO https://openaipublic.azureedge.net/main/point-e/base_40m_textvec.pt``. Recipes set it to
        ``${point_e_model}``."""
        upsampler_model_name_or_path: Optional[str] = None
        """Point-E's upsampler (a folder holding ``upsample_40m.pt``, or the file), used only to sample the
        initial cloud: 1024 -> 4096 points, as GSGEN initialises. null: the base model's 1024 points."""
        clip_model_name_or_path: str = DEFAULT_CLIP_MODEL
        """CLIP ViT-L/14 in the transformers layout (a folder or a Hugging Face id found in the local
        cache, never downloaded): Point-E's text condition. Recipes set it to ``${clip_model}``."""
        prompt: Optional[str] = None
        """The text Point-E is conditioned on (and samples the initial cloud for); null: the run's prompt
        (the prompt processor's ``prompt``). Point-E knows simple categories and colours only: a shorter
        prompt than the image prior's may suit it (GSGEN lets its initialisation prompt differ)."""
        guidance_scale: Scheduled = 100.0
        """Classifier-free guidance scale ``s`` of ``e_u + s (e_c - e_u)`` (GSGEN's Point-E guidance: 100)."""
        uncond: Literal["zero", "empty_text"] = "zero"
        """The unconditional input of CFG: ``zero``, the all-zero condition (Point-E's condition dropout,
        what GSGEN feeds), or ``empty_text``, the CLIP text vector of ""."""
        n_points: Optional[int] = None
        """Points per scored subset; null: the prior's context size (1024 for Point-E)."""
        n_subsets: int = 4
        """Subsets (each with its own t and noise) scored per step (GSGEN's batch_size: 4)."""
        min_step_percent: Scheduled = 0.02
        """Lowest timestep sampled, as a fraction of the prior's timesteps (GSGEN: 0.02)."""
        max_step_percent: Scheduled = 0.98
        """Highest timestep sampled (GSGEN: 0.98)."""
        weighting: Literal["sds", "uniform", "fantasia3d"] = "sds"
        """w(t): ``sds`` 1 - a_t, ``uniform`` 1, ``fantasia3d`` sqrt(a_t)(1 - a_t)."""
        detach_colors: bool = True
        """Score the colours without passing gradient to them: the prior moves the centres only (GSGEN's
        ``mean_only``)."""
        colors: Literal["geometry", "grey"] = "geometry"
        """Colours shown to the prior: the geometry's base colours, or a fixed mid grey (shape only)."""
        point_e_frame: bool = True
        """Turn our frame (front +x) into Point-E's (front -y) before scoring, and Point-E's samples back
        for initialisation; false scores in our frame (as GSGEN's guidance does)."""
        point_scale: float = 1.0
        """World units -> Point-E's units, before its channel scaling (GSGEN: 1; ignored with normalize)."""
        normalize: bool = False
        """Scale the cloud so its farthest point from the origin sits at 0.5 (the scale itself carries no
        gradient): GSGEN's ``normalize`` option."""
        grad_clip: Optional[Scheduled] = None
        """Clamp each gradient element to [-grad_clip, grad_clip] (GSGEN: none)."""
        init_steps: int = 64
        """Sampler steps (Karras/Heun, per stage) for the initial cloud (Point-E's default: 64)."""
        init_radius: Optional[float] = 0.8
        """The initial cloud is centred and scaled so its farthest point sits at this distance (GSGEN's
        ``mean_std``, 0.8 in its base config); null keeps Point-E's size (divided by point_scale)."""
        init_colors: Literal["sample", "random"] = "sample"
        """Colours of the initial cloud: Point-E's, or uniform random (GSGEN's ``random_color``)."""
        init_guidance_scale: float = 3.0
        """CFG scale when sampling the initial cloud (Point-E's text-to-point-cloud default)."""

    cfg: Config

    # -- configuration and weights -------------------------------------------------------------------

    @classmethod
    def requires(cls, cfg: Any) -> frozenset[str]:
        return frozenset({"points"})

    @classmethod
    def resolve(cls, cfg: Any, key: str = DEFAULT_KEY) -> dict[str, Any]:
        """The files of ``cfg`` (``base``, ``upsampler`` or None, the ``clip`` folder), or a
        MissingWeightsError naming the key, the file and how to get it. Loads nothing."""
        from lift3d.utils.hub import MissingWeightsError, resolve_weights

        def find_file(name: str, k: str, filename: str) -> Path:
            fetch = (f"download the published {filename} once (`curl -LO {RELEASE_URL}{filename}`; Point-E is not "
                     f"on the Hugging Face hub) into a folder and point the key at it (recipes: point_e_model="
                     f"/path/to/folder). lift3d never downloads at start-up")
            if not name:
                raise MissingWeightsError(f"config key '{k}' is empty: {fetch}.")
            path = Path(name).expanduser()
            if path.is_dir() or (not path.exists() and path.suffix not in (".pt", ".pth", ".safetensors")):
                path = path / filename  # a folder (or what can only be one): the published file in it
            if not path.is_file():
                raise MissingWeightsError(f"config key '{k}' = {name!r}: no such file ({path.resolve()}); {fetch}.")
            return path.resolve()

        base = find_file(cfg.pretrained_model_name_or_path, f"{key}.pretrained_model_name_or_path", BASE_FILE)
        up = cfg.upsampler_model_name_or_path
        up = None if up is None else find_file(up, f"{key}.upsampler_model_name_or_path", UPSAMPLER_FILE)
        clip = resolve_weights(cfg.clip_model_name_or_path, key=f"{key}.clip_model_name_or_path",
                               required=("config.json",))
        return {"base": base, "upsampler": up, "clip": clip.path}

    def configure(self) -> None:
        c, key = self.cfg, self._cfg_key
        if c.n_subsets < 1:
            raise ConfigError(f"{key}.n_subsets must be >= 1 (GSGEN: 4), got {c.n_subsets}")
        if c.n_points is not None and c.n_points < 1:
            raise ConfigError(f"{key}.n_points must be >= 1 or null (the prior's context size), got {c.n_points}")
        if not c.point_scale > 0:
            raise ConfigError(f"{key}.point_scale must be positive, got {c.point_scale}")
        if c.init_steps < 1:
            raise ConfigError(f"{key}.init_steps must be >= 1, got {c.init_steps}")
        if c.init_radius is not None and not c.init_radius > 0:
            raise ConfigError(f"{key}.init_radius must be positive or null, got {c.init_radius}")
        super().configure()  # builds the frozen prior (kept out of the module tree and checkpoints)
        ab = self.prior.schedule.alphas_cumprod()
        self.register_buffer("_alphas", torch.as_tensor(ab).detach().float().clone(), persistent=False)
        self.__dict__["_cond_cache"] = {}

    def build_prior(self) -> Any:
        """The frozen prior. Override to swap it (a toy prior with the same methods)."""
        from lift3d.priors.point_e import PointEPrior
        from lift3d.utils.hub import MissingWeightsError

        files = self.resolve(self.cfg, self._cfg_key)
        try:
            # The prior's own sampler then returns clouds in the frame this guidance scores in.
            return PointEPrior.from_pretrained(files["base"], files["clip"], upsampler=files["upsampler"],
                                               rotate=self.cfg.point_e_frame)
        except (OSError, EOFError) as exc:
            raise MissingWeightsError(f"config key '{self._cfg_key}.pretrained_model_name_or_path': the Point-E "
                                      f"files {', '.join(str(v) for v in files.values() if v)} do not load "
                                      f"(interrupted download?): {exc}") from exc

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "PointEGuidance":
        self.__dict__.get("_cond_cache", {}).clear()  # conditions follow the prior's device and dtype
        return super()._apply(fn, *args, **kwargs)

    # -- the pieces of a step ------------------------------------------------------------------------

    @property
    def alphas_cumprod(self) -> Tensor:
        return self._alphas

    @property
    def num_train_timesteps(self) -> int:
        return int(self._alphas.shape[0])

    @property
    def n_points(self) -> int:
        return int(self.cfg.n_points or self.prior.model.cfg.n_ctx)

    def _prior_dtype(self) -> torch.dtype:
        p = next(iter(self.prior.parameters()), None)
        return p.dtype if p is not None else self._alphas.dtype

    def weight(self, t: Tensor) -> Tensor:
        return timestep_weight(self.alphas_cumprod[t], self.cfg.weighting)

    def step_range(self) -> tuple[int, int]:
        """(lo, hi) timesteps from the (scheduled) min/max step percentages, clamped to the schedule."""
        return step_bounds(self.num_train_timesteps, self.C(self.cfg.min_step_percent), self.C(self.cfg.max_step_percent))

    def prompt_text(self, inp: GuidanceInput | None = None) -> str:
        """The text Point-E is conditioned on: ``prompt`` from the config, else the run's prompt."""
        if self.cfg.prompt is not None:
            return self.cfg.prompt
        text = getattr(inp.prompt, "prompt", None) if inp is not None else None
        if text is None:
            raise ValueError(f"{self.name()} needs the prompt text: set {self._cfg_key}.prompt, or use a prompt "
                             "processor (its prompt= is read)")
        return str(text)

    def conditions(self, prompt: str, device: torch.device) -> tuple[Tensor, Tensor]:
        """(cond [1, D], uncond [1, D]) for ``prompt``; computed once per prompt and device."""
        key = (prompt, self.cfg.uncond, str(device))
        cache = self.__dict__["_cond_cache"]
        if key not in cache:
            with torch.no_grad():
                texts = [prompt] + ([""] if self.cfg.uncond == "empty_text" else [])
                enc = self.prior.encode_text(texts).detach().to(device)
                cond = enc[:1]
                uncond = enc[1:2] if self.cfg.uncond == "empty_text" else torch.zeros_like(cond)
            cache[key] = (cond, uncond)
        return cache[key]

    def scored_points(self, inp: GuidanceInput) -> tuple[Tensor, Tensor]:
        """(points [N, 3], colours [N, 3]) as the prior will see them before subsetting."""
        if inp.points is None:
            raise ValueError(f"{self.name()} scores the geometry's points, but the input has none: the geometry "
                             "must provide guidance_points() (gaussian-splatting)")
        pts = inp.points
        if pts.dim() != 2 or pts.shape[-1] != 3 or pts.shape[0] == 0:
            raise ValueError(f"{self.name()}: points must be [N, 3] with N >= 1, got {tuple(pts.shape)}")
        if self.cfg.colors == "grey" or inp.point_colors is None:
            cols = torch.full_like(pts, 0.5).detach()
        else:
            cols = inp.point_colors.to(pts.dtype)
            if self.cfg.detach_colors:
                cols = cols.detach()
        return pts, cols

    def subset_indices(self, points: Tensor, starts: Tensor | None) -> Tensor:
        """[n_subsets, n_points] indices: farthest-point samples from ``starts`` [n_subsets] (random
        when None); a cloud of fewer than n_points points is taken whole, repeated in turn."""
        S, K, N = self.cfg.n_subsets, self.n_points, points.shape[0]
        if N <= K:
            return (torch.arange(K, device=points.device) % N).expand(S, K)
        if starts is None:
            starts = torch.randint(N, (S,), device=points.device)
        return farthest_point_sample(points.detach()[None].expand(S, N, 3), K, start_idx=starts)

    def to_prior_space(self, xyz: Float[Tensor, "S K 3"], rgb: Float[Tensor, "S K 3"],
                       all_points: Float[Tensor, "N 3"]) -> Float[Tensor, "S C K"]:
        """Subsets xyz [S, K, 3] (world), rgb [S, K, 3] in [0, 1] -> the prior's space [S, C, K]; ``all_points``
        (the whole cloud) sets the scale with ``normalize``."""
        if self.cfg.normalize:
            scale = 0.5 / all_points.detach().norm(dim=-1).max().clamp_min(1e-8)
        else:
            scale = self.cfg.point_scale
        xyz = xyz * scale
        if self.cfg.point_e_frame:
            xyz = world_to_point_e(xyz)
        return self.prior.schedule.to_model_space(xyz, rgb)

    def guided_eps(self, x_t: Tensor, t: Tensor, cond: Tensor, uncond: Tensor) -> Tensor:
        """``e_u + s (e_c - e_u)`` at ``x_t`` [S, C, K]; both branches in one network call."""
        S = x_t.shape[0]
        dt = self._prior_dtype()
        conds = torch.cat([cond.expand(S, -1), uncond.expand(S, -1)]).to(dt)
        eps = self.prior.predict_eps(torch.cat([x_t, x_t]).to(dt), torch.cat([t, t]), conds).to(x_t.dtype)
        e_c, e_u = eps[:, : x_t.shape[1]].chunk(2)
        return e_u + float(self.C(self.cfg.guidance_scale)) * (e_c - e_u)

    # -- the step -------------------------------------------------------------------------------------

    def forward(self, inp: GuidanceInput, t: Tensor | None = None, noise: Tensor | None = None) -> GuidanceOutput:
        """``loss_sds`` on ``n_subsets`` subsets. ``t`` [n_subsets] (or one value for all) and ``noise``
        [n_subsets, C, n_points] in the prior's space are drawn when not given (t first, then the
        subsets' starts, then the noise); given the noise, the starts are evenly spaced indices."""
        c = self.cfg
        S, K = c.n_subsets, self.n_points
        pts, cols = self.scored_points(inp)
        dev = pts.device
        lo, hi = self.step_range()
        if t is None:
            t = torch.randint(lo, max(hi, lo + 1), (S,), device=dev)
        t = torch.as_tensor(t, device=dev).long().reshape(-1)
        if t.numel() == 1:
            t = t.expand(S)
        if t.numel() != S:
            raise ValueError(f"{self.name()}: t must hold one timestep per subset ({self._cfg_key}.n_subsets = {S}) "
                             f"or one for all, got shape {tuple(t.shape)}")
        N = pts.shape[0]
        starts = None if noise is None else (torch.arange(S, device=dev) * N) // S
        idx = self.subset_indices(pts, starts)  # [S, K]
        x = self.to_prior_space(pts[idx], cols[idx], pts)  # [S, C, K], differentiable in the points
        if noise is None:
            noise = torch.randn_like(x)
        noise = noise.to(device=x.device, dtype=x.dtype)
        if noise.shape != x.shape:
            raise ValueError(f"{self.name()}: noise must be [n_subsets, C, n_points] = {tuple(x.shape)}, "
                             f"got {tuple(noise.shape)}")
        a = self.alphas_cumprod[t].to(x.dtype).view(-1, 1, 1)
        x_t = a.sqrt() * x.detach() + (1 - a).sqrt() * noise
        with torch.no_grad():
            cond, uncond = self.conditions(self.prompt_text(inp), x.device)
            e_cfg = self.guided_eps(x_t, t, cond, uncond)
            grad = torch.nan_to_num(self.weight(t).to(x.dtype).view(-1, 1, 1) * (e_cfg - noise))
            if c.grad_clip is not None:
                clip = float(self.C(c.grad_clip))
                grad = grad.clamp(-clip, clip)
        loss = 0.5 * F.mse_loss(x, (x - grad).detach(), reduction="sum") / S
        diagnostics = {"grad_norm": grad.norm(), "t": t, "timestep": t.float().mean(),
                       "min_step": torch.tensor(lo), "max_step": torch.tensor(hi)}
        return GuidanceOutput(losses={f"loss_{self.loss_name}": loss}, diagnostics=diagnostics)

    # -- initialisation -------------------------------------------------------------------------------

    def sample_init_points(self, prompt: str | None = None) -> tuple[Tensor, Tensor]:
        """An initial point cloud for ``prompt`` (the configured ``prompt`` wins): (xyz [N, 3] in our frame,
        centred, its farthest point at ``init_radius``; rgb [N, 3] in [0, 1]), float32 on the CPU.

        Randomness comes from the global generators (the system seeds them before asking)."""
        text = self.cfg.prompt if self.cfg.prompt is not None else prompt
        if text is None:
            raise ValueError(f"{self.name()}: no prompt to sample an initial cloud for; set {self._cfg_key}.prompt")
        with torch.no_grad():
            xyz, rgb = self._sample_cloud(str(text))
        xyz, rgb = xyz.detach().float().cpu().reshape(-1, 3), rgb.detach().float().cpu().reshape(-1, 3)
        if not self.cfg.normalize:
            xyz = xyz / self.cfg.point_scale
        if self.cfg.init_radius is not None:
            xyz = xyz - xyz.mean(0, keepdim=True)
            xyz = xyz * (self.cfg.init_radius / xyz.norm(dim=-1).max().clamp_min(1e-8))
        if self.cfg.init_colors == "random":
            rgb = torch.rand(rgb.shape)
        return xyz, rgb.clamp(0.0, 1.0)

    def _sample_cloud(self, prompt: str) -> tuple[Tensor, Tensor]:
        """(xyz [n, 3] in our frame (turned back from Point-E's when ``point_e_frame``) and Point-E's units,
        rgb [n, 3] in [0, 1]): the prior's sample for ``prompt``. A subclass with another prior overrides it."""
        xyz, rgb = self.prior.sample([prompt], steps=self.cfg.init_steps, guidance_scale=self.cfg.init_guidance_scale,
                                     upsampler_steps=self.cfg.init_steps)
        return xyz[0], rgb[0]


__all__ = ["PointEGuidance", "DEFAULT_POINT_E_DIR"]
