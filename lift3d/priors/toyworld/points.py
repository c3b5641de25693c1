"""The toy world's twin of Point-E (Nichol et al. 2022): a text-conditioned point-cloud diffusion prior.

Point-E denoises a cloud of coloured points (xyz + rgb per point) with a transformer that reads the
points as a set, conditioned on a CLIP text vector given as one extra token. :class:`ToyPointPrior`
is the same network (:class:`lift3d.priors.point_e.network.PointDiffusionTransformer`, at a tiny
width) and the same diffusion maths (:class:`lift3d.priors.point_e.diffusion.PointDiffusionSchedule`:
cosine schedule over 1024 steps, epsilon prediction, channel scaling), trained here on the 33
toy-world objects:

* Conditioning: the toy vocabulary (:mod:`lift3d.priors.toyworld.vocab`) instead of CLIP. The
  vector is the mean of a learned embedding of the prompt's tokens, L2-normalised and times
  ``sqrt(cond_dim)`` as Point-E treats CLIP's text features; an all-zero vector is the
  unconditional input, which training produces by dropping the condition with probability
  ``p_uncond`` (classifier-free guidance, as Point-E's condition dropout). The empty prompt
  encodes to it.
* Tokens: Point-E gives the condition and the timestep as two extra tokens; the toy adds both
  embeddings to every point token instead (``token_cond``, ``time_token_cond``; the network supports
  either), which a model trained for minutes learns to read far sooner.
* Output: v (``sqrt(a) eps - sqrt(1 - a) x0``) for 6 channels, turned into epsilon by
  :meth:`ToyPointPrior.predict_eps`. Point-E predicts epsilon and learns the variance (12 channels)
  for its DDPM sampler; the toy samples with Point-E's Karras/Heun sampler and score distillation
  reads epsilon alone. Epsilon's loss hardly depends on the clean cloud at high noise, where the
  prompt decides it; v's does, so the prompt is learned within minutes.
* Channel scaling: Point-E doubles xyz (its clouds lie in about [-0.5, 0.5]^3); the toy objects
  reach 0.695 from the origin, so xyz is scaled by ``xyz_scale`` (1.4 keeps every object inside
  the sampler's [-1, 1] clamp). Colours are Point-E's: rgb in [0, 1] -> [-1, 1].
* Frame: the toy world's, which is lift3d's (+z up, front +x). Real Point-E has a frame of its
  own that its guidance converts; this twin's clouds need no conversion.

Data: points on each object's exact surface with the albedo there (:func:`surface_pool`: area-weighted
samples of the marching-cubes surface projected onto the exact SDF, as the benchmark's Chamfer
uses), the objects in their canonical pose (the snowman's nose at +x, the chair's back at -x, the
mug's handle at +y: what the orientation checks read). Every step draws a fresh cloud per object
from a large pool: ``fps_oversample * n_ctx`` random pool points reduced to ``n_ctx`` by
farthest-point sampling, the same spreading the guidance applies to Gaussian centres.

Training reuses the toy prior's loop (:func:`lift3d.priors.toyworld.train.fit`: EMA, atomic
checkpoints, resume bit for bit, safetensors output); the weights ship as
``weights/toyworld-points.safetensors``, made by
``python -m lift3d.priors.toyworld train-points threads=2 --install`` (``recipe-points.yaml``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lift3d.config import ConfigError, parse_structured
from lift3d.priors.toyworld.model import WEIGHTS_DIR, MissingWeightsError

DEFAULT_POINTS_WEIGHTS = WEIGHTS_DIR / "toyworld-points.safetensors"
POINTS_META_KEY = "lift3d_toyworld_points"
FINAL_POINTS_NAME = "toyworld-points.safetensors"
PACKAGED_POINTS_RECIPE = Path(__file__).with_name("recipe-points.yaml")
#: How to make the weights: the command the messages point to.
POINTS_TRAIN_COMMAND = "python -m lift3d.priors.toyworld train-points threads=2 --install"
_DATA_TAG = 0


@dataclass
class ToyPointConfig:
    vocab_size: int = 15
    """Token ids the text embedding knows (the toy vocabulary, padding at 0)."""
    n_ctx: int = 256
    """Points per cloud in training, and the subset size the guidance scores."""
    width: int = 128
    """Transformer width."""
    layers: int = 4
    """Transformer blocks."""
    heads: int = 4
    """Attention heads."""
    init_scale: float = 0.25
    """Point-E's initialisation scale."""
    cond_dim: int = 64
    """Size of the conditioning vector (Point-E: 768, CLIP ViT-L/14's)."""
    token_cond: bool = False
    """The condition as an extra token (Point-E's ``textvec`` models) or, false, added to every point
    token: a model trained for minutes learns to read it far sooner when every point sees it."""
    time_token_cond: bool = False
    """The same choice for the timestep embedding (Point-E: a token)."""
    timesteps: int = 1024
    """Diffusion steps of the cosine schedule (Point-E's)."""
    xyz_scale: float = 1.4
    """Multiplier of the coordinates in the model's space (Point-E: 2 for its smaller clouds)."""
    p_uncond: float = 0.1
    """Probability of dropping the condition in training (classifier-free guidance)."""
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    """What the network predicts; :meth:`ToyPointPrior.predict_eps` converts v to epsilon. Point-E
    predicts epsilon, whose loss hardly depends on the clean cloud at high noise, so a prompt barely
    lowers it there; v (``sqrt(a) eps - sqrt(1 - a) x0``, Salimans & Ho 2022, as the toy image prior)
    is mostly the clean cloud at high noise, which the prompt decides."""

    # What the toy prior's training loop reads of a model's config (``make_scheduler``): the cosine
    # schedule is diffusers' "squaredcos_cap_v2". The loss here uses PointDiffusionSchedule.
    beta_schedule = "squaredcos_cap_v2"

    @property
    def num_train_timesteps(self) -> int:
        return self.timesteps


class ToyPointPrior(nn.Module):
    """``forward(x [B, 6, N] model space, t [B], tokens [B, L], drop [B] bool) -> eps [B, 6, N]``.

    Also the prior adapter ``point-e-guidance`` talks to: ``schedule``, ``model`` (its ``cfg.n_ctx``),
    :meth:`encode_text` and :meth:`predict_eps`.
    """

    def __init__(self, cfg: ToyPointConfig | dict | None = None):
        super().__init__()
        from lift3d.priors.point_e.diffusion import PointDiffusionSchedule
        from lift3d.priors.point_e.network import PointDiffusionTransformer, PointTransformerConfig

        self.cfg = parse_structured(ToyPointConfig, cfg or {}, key="toyworld.points")
        c = self.cfg
        self.model = PointDiffusionTransformer(PointTransformerConfig(
            input_channels=6, output_channels=6, n_ctx=c.n_ctx, width=c.width, layers=c.layers, heads=c.heads,
            init_scale=c.init_scale, time_token_cond=c.time_token_cond, cond_dim=c.cond_dim, token_cond=c.token_cond))
        self.token_embedding = nn.Embedding(c.vocab_size, c.cond_dim, padding_idx=0)
        s = float(c.xyz_scale)
        self.schedule = PointDiffusionSchedule(timesteps=c.timesteps, schedule="cosine",
                                               channel_scales=(s, s, s, 2.0 / 255.0, 2.0 / 255.0, 2.0 / 255.0),
                                               channel_biases=(0.0, 0.0, 0.0, -1.0, -1.0, -1.0))

    # ------------------------------------------------------------------ conditioning

    def text_condition(self, tokens: Tensor) -> Tensor:
        """[B, L] token ids (0 = pad) -> [B, cond_dim]: the mean token embedding, normalised, times
        sqrt(cond_dim); an all-pad row gives the zero vector (unconditional)."""
        mask = (tokens > 0).to(self.token_embedding.weight.dtype)[..., None]
        mean = (self.token_embedding(tokens) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        has_text = mask.sum(1) > 0
        cond = F.normalize(mean, dim=-1) * math.sqrt(self.cfg.cond_dim)
        return torch.where(has_text, cond, torch.zeros_like(cond))

    def encode_text(self, prompts: list[str]) -> Tensor:
        """[B, cond_dim] condition vectors of toy-world prompts ("" or blank: unconditional, zeros).
        A word outside the toy vocabulary raises UnknownPromptError naming it."""
        from lift3d.priors.toyworld.vocab import pad_tokens, tokenize

        tokens = pad_tokens([tokenize(p) if p.strip() else [] for p in prompts])
        return self.text_condition(tokens.to(self.token_embedding.weight.device))

    def forward(self, x: Tensor, t: Tensor, tokens: Tensor, drop: Tensor | None = None) -> Tensor:
        """The network's output (``prediction_type``) [B, 6, N]; rows with ``drop`` are unconditional."""
        cond = self.text_condition(tokens)
        if drop is not None:
            cond = cond * (~drop).to(cond.dtype)[:, None]
        return self.model(x, t, cond)

    def _coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(a_t), sqrt(1 - a_t)) [B, 1, 1] in ``like``'s dtype."""
        a = self.schedule.alphas_cumprod().to(like.device)[t.long()].view(-1, 1, 1)
        return a.sqrt().to(like.dtype), (1 - a).sqrt().to(like.dtype)

    def eps_from_output(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The network's output at ``x_t`` as epsilon."""
        if self.cfg.prediction_type == "epsilon":
            return out
        sa, so = self._coefficients(t, x_t)
        return sa * out + so * x_t

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network is trained to output for clean ``x0`` noised with ``noise`` at ``t``."""
        if self.cfg.prediction_type == "epsilon":
            return noise
        sa, so = self._coefficients(t, x0)
        return sa * noise - so * x0

    def predict_eps(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """eps [B, 6, N] at (x_t [B, 6, N], t [B], cond [B, cond_dim]) (all-zero rows: unconditional)."""
        return self.eps_from_output(self.model(x_t, t, cond.to(x_t.dtype))[:, :6], x_t, t)

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:
        """Write weights + config to a safetensors file (atomically)."""
        import os

        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {POINTS_META_KEY: json.dumps(asdict(self.cfg)), **(extra_metadata or {})}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path | None = None, map_location: str | torch.device = "cpu") -> "ToyPointPrior":
        """Load a file written by :meth:`save` (None: the shipped ``weights/toyworld-points.safetensors``)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path) if path is not None else DEFAULT_POINTS_WEIGHTS
        if not path.is_file():
            raise MissingWeightsError(missing_weights_message(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if POINTS_META_KEY not in meta:
            raise ValueError(f"{path} is not a toy point-cloud prior file (no '{POINTS_META_KEY}' in its metadata); "
                             f"`{POINTS_TRAIN_COMMAND}` makes one")
        model = cls(json.loads(meta[POINTS_META_KEY]))
        model.load_state_dict(load_file(str(path), device=str(map_location)))
        model.metadata = meta  # type: ignore[attr-defined]
        return model


def missing_weights_message(path: Path) -> str:
    return (f"toy point-cloud prior weights not found at {path}. They are trained in minutes on a CPU: run "
            f"`{POINTS_TRAIN_COMMAND}` (the packaged recipe-points.yaml; --install writes them to "
            f"{DEFAULT_POINTS_WEIGHTS}), or pass the path of a file you trained.")


# ---------------------------------------------------------------------------------------------
# Data

_POOLS: dict[tuple, Tensor] = {}


def surface_pool(prompt: str, n: int = 8192, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(xyz [n, 3], rgb [n, 3]): points on the object's exact surface and the albedo there.

    Area-weighted samples of the marching-cubes surface projected onto the exact SDF
    (:func:`lift3d.priors.toyworld.metrics.surface_samples`); cached per geometry, so the six
    colours of a primitive share one set of positions."""
    from lift3d.priors.toyworld.metrics import surface_samples
    from lift3d.priors.toyworld.shapes import get_object

    obj = get_object(prompt)
    key = (obj.geometry_key, n, seed)
    if key not in _POOLS:
        with torch.enable_grad():  # the projection onto the SDF differentiates it
            _POOLS[key] = surface_samples(obj, n, seed)
    xyz = _POOLS[key]
    return xyz, obj.albedo(xyz)


class PointCloudData:
    """Fresh clouds of the catalogue objects each step, all choices drawn from (seed, step).

    ``batch(step, batch_size)``: ``xyz``, ``rgb`` [B, n_points, 3], ``tokens`` [B, MAX_TOKENS] and
    ``prompt_index`` [B]. An object is uniform over the catalogue, or one of ``focus`` with
    probability ``focus_fraction``."""

    def __init__(self, n_points: int = 256, pool_size: int = 8192, seed: int = 0, fps_oversample: int = 4,
                 focus_prompts: list[str] | None = None, focus_fraction: float = 0.0):
        from lift3d.priors.toyworld.shapes import list_prompts
        from lift3d.priors.toyworld.vocab import pad_tokens, tokenize

        self.prompts = list_prompts()
        unknown = [p for p in focus_prompts or [] if p not in self.prompts]
        if unknown:
            raise ConfigError(f"train-points focus_prompts: {unknown} are not toy-world prompts; valid: "
                              f"{', '.join(self.prompts)}")
        if fps_oversample < 1 or fps_oversample * n_points > pool_size:
            raise ConfigError(f"train-points: fps_oversample ({fps_oversample}) must be >= 1 and fps_oversample * "
                              f"n_points ({fps_oversample * n_points}) at most pool_size ({pool_size})")
        self.n_points, self.pool_size, self.seed, self.fps_oversample = n_points, pool_size, seed, fps_oversample
        self.focus = [self.prompts.index(p) for p in focus_prompts or []]
        self.focus_fraction = focus_fraction
        pools = [surface_pool(p, pool_size, seed) for p in self.prompts]
        self.xyz = torch.stack([x for x, _ in pools])  # [P, pool, 3]
        self.rgb = torch.stack([c for _, c in pools])
        self.tokens = pad_tokens([tokenize(p) for p in self.prompts])

    def batch(self, step: int, batch_size: int) -> dict[str, Tensor]:
        from lift3d.priors.toyworld.train import _step_generator

        g = _step_generator(self.seed, step, _DATA_TAG)
        index = torch.randint(len(self.prompts), (batch_size,), generator=g)
        if self.focus:
            coin = torch.rand(batch_size, generator=g) < self.focus_fraction
            pick = torch.tensor(self.focus)[torch.randint(len(self.focus), (batch_size,), generator=g)]
            index = torch.where(coin, pick, index)
        return {**self.clouds(index, g), "tokens": self.tokens[index], "prompt_index": index}

    def clouds(self, index: Tensor, g: torch.Generator) -> dict[str, Tensor]:
        """One fresh cloud per entry of ``index`` [B] (catalogue indices): ``xyz``, ``rgb`` [B, n_points, 3]."""
        from lift3d.utils.point_sampling import farthest_point_sample

        B, m = len(index), self.n_points * self.fps_oversample
        cand = torch.stack([torch.randperm(self.pool_size, generator=g)[:m] for _ in range(B)])  # [B, m]
        xyz = torch.gather(self.xyz[index], 1, cand[..., None].expand(-1, -1, 3))
        rgb = torch.gather(self.rgb[index], 1, cand[..., None].expand(-1, -1, 3))
        if self.fps_oversample > 1:
            # the candidates are in random order, so starting at the first one is a random start
            keep = farthest_point_sample(xyz, self.n_points, start_idx=torch.zeros(B, dtype=torch.long))
            xyz = torch.gather(xyz, 1, keep[..., None].expand(-1, -1, 3))
            rgb = torch.gather(rgb, 1, keep[..., None].expand(-1, -1, 3))
        return {"xyz": xyz, "rgb": rgb}


def point_loss(model: ToyPointPrior, batch: dict[str, Tensor], g: torch.Generator) -> Tensor:
    """MSE to the model's target (v or epsilon) on one batch: timesteps uniform over the schedule, the
    condition dropped with probability ``p_uncond``, all randomness from ``g``."""
    x0 = model.schedule.to_model_space(batch["xyz"], batch["rgb"])
    B = x0.shape[0]
    t = torch.randint(0, model.cfg.timesteps, (B,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    drop = torch.rand(B, generator=g) < model.cfg.p_uncond
    x_t = model.schedule.q_sample(x0, t, noise)
    return F.mse_loss(model(x_t, t, batch["tokens"], drop), model.target(x0, noise, t))


# ---------------------------------------------------------------------------------------------
# Sampling


@torch.no_grad()
def sample_points(model: ToyPointPrior, prompts: list[str], n_points: int | None = None, steps: int = 64,
                  guidance_scale: float = 3.0, generator: torch.Generator | None = None,
                  s_churn: float = 3.0) -> tuple[Tensor, Tensor]:
    """Clouds of ``prompts``: (xyz [B, N, 3] world frame, rgb [B, N, 3] in [0, 1]); N: ``n_points``
    (default the model's ``n_ctx``). Point-E's base sampler (Karras et al.'s Heun steps with churn,
    guidance on the clamped x0 predictions, the last x0 prediction as the sample)."""
    from lift3d.priors.point_e.diffusion import (GaussianKarrasDenoiser, KarrasSettings, guided,
                                                 karras_heun_sample)

    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    B, N = len(prompts), n_points or model.cfg.n_ctx
    cond = model.encode_text(list(prompts))
    settings = KarrasSettings(steps=steps, s_churn=s_churn, guidance_scale=guidance_scale)
    if guidance_scale != 1.0:
        both = torch.cat([cond, torch.zeros_like(cond)])
        denoiser = guided(GaussianKarrasDenoiser(lambda x, t: model.predict_eps(x, t, both), model.schedule),
                          guidance_scale)
    else:
        denoiser = GaussianKarrasDenoiser(lambda x, t: model.predict_eps(x, t, cond), model.schedule)
    last: dict[str, Tensor] = {}
    for last in karras_heun_sample(denoiser, (B, 6, N), settings, generator=generator, device=dev):
        pass
    model.train(was_training)
    xyz, rgb = model.schedule.from_model_space(last["pred_x0"])
    return xyz, rgb.clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class PointScore:
    prompt: str
    chamfer: float
    """Mean over samples of the symmetric Chamfer distance to the exact surface (:func:`cloud_chamfer`)."""
    chamfer_floor: float
    """The same for clouds of the training data (exact surface points): what a perfect model scores."""
    colour_error: float
    """Mean |rgb - albedo at the nearest true surface point|."""
    front_ok: int = 0
    front_counted: int = 0
    """Samples passing / checked by :func:`front_check` (the snowman, chair and mug only)."""


def cloud_chamfer(xyz: Tensor, prompt: str, reference: Tensor) -> float:
    """Symmetric Chamfer distance of a cloud [N, 3] to an object: the mean of (a) the exact distance
    |sdf| of its points to the surface and (b) the distance of dense true-surface points
    ``reference`` [M, 3] to their nearest cloud point."""
    from lift3d.priors.toyworld.shapes import get_object

    d_pred = get_object(prompt).sdf(xyz).abs().mean()
    d_true = torch.cdist(reference, xyz).min(dim=1).values.mean()
    return float(0.5 * (d_pred + d_true))


def front_check(prompt: str, xyz: Tensor, rgb: Tensor) -> tuple[bool, float] | None:
    """Whether a cloud of the snowman, chair or mug has its front feature on the right side, with
    the coordinate that decides it; None for the primitives.

    * snowman: the nose's points (coloured nearer the nose's orange than white) lie at mean x > 0;
    * chair: the back's points (above the seat, z > 0.1) lie at mean x < 0 (the chair faces +x);
    * mug: the handle's points (farther than 0.33 from the axis) lie at mean y > 0.
    """
    from lift3d.priors.toyworld.shapes import NOSE_ORANGE, WHITE, get_object

    shape = get_object(prompt).shape
    if shape == "snowman":
        orange, white = torch.tensor(NOSE_ORANGE), torch.tensor(WHITE)
        sel = (rgb - orange).norm(dim=-1) < (rgb - white).norm(dim=-1)
        value = float(xyz[sel, 0].mean()) if sel.any() else float("nan")
        return (bool(sel.any()) and value > 0.0), value
    if shape == "chair":
        sel = xyz[:, 2] > 0.1
        value = float(xyz[sel, 0].mean()) if sel.any() else float("nan")
        return (bool(sel.any()) and value < 0.0), value
    if shape == "mug":
        sel = xyz[:, :2].norm(dim=-1) > 0.33
        value = float(xyz[sel, 1].mean()) if sel.any() else float("nan")
        return (bool(sel.any()) and value > 0.0), value
    return None


@torch.no_grad()
def evaluate_points(model: ToyPointPrior, prompts: list[str] | None = None, n_per_prompt: int = 4,
                    steps: int = 64, guidance_scale: float = 3.0, seed: int = 0, out_dir: str | Path | None = None,
                    n_points: int | None = None) -> list[PointScore]:
    """Sample ``n_per_prompt`` clouds per prompt and score them against the exact surface; with
    ``out_dir`` every cloud is written as ``{slug}-{k}.ply``."""
    from lift3d.priors.toyworld.shapes import get_object, list_prompts
    from lift3d.utils.point_cloud_io import write_point_cloud_ply

    prompts = list(prompts or list_prompts())
    n = n_points or model.cfg.n_ctx
    floor_data = PointCloudData(n, max(8192, 4 * n), seed=seed + 1, fps_oversample=4)
    g = torch.Generator().manual_seed(seed)
    scores = []
    for prompt in prompts:
        obj = get_object(prompt)
        reference, _ = surface_pool(obj.name, 4096, seed + 2)
        xyz, rgb = sample_points(model, [obj.name] * n_per_prompt, n, steps, guidance_scale, g)
        chamfers, colours, fronts = [], [], []
        for k in range(n_per_prompt):
            chamfers.append(cloud_chamfer(xyz[k], obj.name, reference))
            nearest = torch.cdist(xyz[k], reference).argmin(dim=1)
            colours.append(float((rgb[k] - obj.albedo(reference[nearest])).abs().mean()))
            fronts.append(front_check(obj.name, xyz[k], rgb[k]))
            if out_dir is not None:
                slug = obj.name.replace(" ", "-")
                write_point_cloud_ply(Path(out_dir) / f"{slug}-{k}.ply", xyz[k], rgb[k])
        exact = floor_data.clouds(torch.full((n_per_prompt,), floor_data.prompts.index(obj.name)), g)["xyz"]
        floor = [cloud_chamfer(exact[k], obj.name, reference) for k in range(n_per_prompt)]
        checked = [f for f in fronts if f is not None]
        scores.append(PointScore(obj.name, sum(chamfers) / len(chamfers), sum(floor) / len(floor),
                                 sum(colours) / len(colours), sum(int(ok) for ok, _ in checked), len(checked)))
    return scores


def format_point_table(scores: list[PointScore]) -> str:
    lines = ["| prompt | Chamfer | Chamfer of exact clouds | colour error | front |", "|---|---|---|---|---|"]
    for s in scores:
        front = f"{s.front_ok}/{s.front_counted}" if s.front_counted else "-"
        lines.append(f"| {s.prompt} | {s.chamfer:.4f} | {s.chamfer_floor:.4f} | {s.colour_error:.3f} | {front} |")
    n = len(scores)
    if n:
        ok, counted = sum(s.front_ok for s in scores), sum(s.front_counted for s in scores)
        mean = lambda key: sum(getattr(s, key) for s in scores) / n  # noqa: E731
        front = f"{ok}/{counted}" if counted else "-"
        lines.append(f"| mean ({n}) | {mean('chamfer'):.4f} | {mean('chamfer_floor'):.4f} | {mean('colour_error'):.3f} "
                     f"| {front} |")
    return "\n".join(lines)


GRID_PROMPTS = ("a red cube", "a green torus", "a snowman", "a chair", "a mug")


def save_cloud_grid(model: ToyPointPrior, path: Path, seed: int = 0, steps: int = 32,
                    prompts: tuple[str, ...] = GRID_PROMPTS) -> Path:
    """A quick look: one row per prompt, the sampled cloud splatted from the front (+x), the side (+y)
    and above (+z), nearer points drawn over farther ones."""
    import numpy as np

    from lift3d.utils.io import image_grid, save_image

    xyz, rgb = sample_points(model, list(prompts), steps=steps, generator=torch.Generator().manual_seed(seed))
    rows = []
    for i in range(len(prompts)):
        row = []
        # (horizontal axis, vertical axis, depth axis towards the viewer)
        for u, v, d, su in ((1, 2, 0, 1.0), (0, 2, 1, -1.0), (1, 0, 2, 1.0)):
            img = np.zeros((64, 64, 3), np.float32)
            p, c = xyz[i].numpy(), rgb[i].numpy()
            order = np.argsort(p[:, d])  # far first
            px = np.clip(((su * p[order, u] + 0.75) / 1.5 * 63).round().astype(int), 0, 63)
            py = np.clip(((0.75 - p[order, v]) / 1.5 * 63).round().astype(int), 0, 63)
            img[py, px] = c[order]
            row.append(img)
        rows.append(row)
    return save_image(path, image_grid(rows))


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class PointsTrainConfig:
    seed: int = 0
    """Seed of the data, the initialisation and every step's noise."""
    steps: int = 1500
    """Optimizer steps (the cosine learning-rate decay spans them)."""
    batch_size: int = 32
    """Clouds per step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW), after a linear warm-up, cosine-decayed to 10%."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    ema_decay: float = 0.995
    """Decay of the exponential moving average whose weights are saved."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    pool_size: int = 8192
    """Surface points per object the clouds are drawn from."""
    fps_oversample: int = 4
    """A cloud is this many times n_ctx random pool points reduced by farthest-point sampling (1: random)."""
    focus_prompts: list[str] = field(default_factory=list)
    """Prompts over-represented in every batch (e.g. the snowman, chair and mug)."""
    focus_fraction: float = 0.0
    """Probability that a cloud of the batch is one of the focus prompts."""
    out_dir: str = "outputs/toyworld-points"
    """Checkpoint, logs, sample grids and the final safetensors file."""
    ckpt_every: int = 100
    """Steps between checkpoints."""
    sample_every: int = 0
    """Steps between sample grids (0: never)."""
    log_every: int = 25
    """Steps between log lines written to train_log.csv."""
    threads: Optional[int] = None
    """torch threads (default: torch's choice)."""
    stop_after: Optional[int] = None
    """Stop this invocation after so many steps (checkpointing there); run again to continue."""
    autocast: Optional[str] = None
    """Must stay null: the toy point prior trains in float32 (the key exists for the shared loop)."""
    model: dict[str, Any] = field(default_factory=dict)
    """ToyPointConfig overrides."""


def train_points(cfg: PointsTrainConfig | dict, progress: bool = True) -> Path:
    """Train (or resume) in ``cfg.out_dir``; returns the final (or, with stop_after, partial) weights.
    The loop is the single-view prior's (:func:`lift3d.priors.toyworld.train.fit`)."""
    from lift3d.priors.toyworld.multiview_train import check_counts
    from lift3d.priors.toyworld.train import _step_generator, fit, start_run
    from lift3d.priors.toyworld.vocab import VOCAB

    cfg = parse_structured(PointsTrainConfig, cfg, key="train-points")
    check_counts(cfg, "train-points", ("steps", "batch_size", "pool_size", "fps_oversample", "ckpt_every",
                                       "log_every"))
    if cfg.autocast is not None:
        raise ConfigError(f"train-points.autocast must be null (float32), got {cfg.autocast!r}")
    if not 0.0 <= cfg.focus_fraction <= 1.0:
        raise ConfigError(f"train-points.focus_fraction must be in [0, 1], got {cfg.focus_fraction}")
    start_run(cfg, progress)
    model = ToyPointPrior({"vocab_size": len(VOCAB), **cfg.model})

    def batches() -> Callable[[int], dict[str, Tensor]]:
        data = PointCloudData(model.cfg.n_ctx, cfg.pool_size, cfg.seed, cfg.fps_oversample, cfg.focus_prompts,
                              cfg.focus_fraction)
        return lambda step: data.batch(step, cfg.batch_size)

    def loss_at(model: ToyPointPrior, sched: Any, batch: dict[str, Tensor], step: int) -> Tensor:
        return point_loss(model, batch, _step_generator(cfg.seed, step, 1))

    return fit(cfg, model, batches, loss_at, save_cloud_grid, name=FINAL_POINTS_NAME.removesuffix(".safetensors"),
               desc="toyworld points", progress=progress)


def load_points_recipe(source: str | Path | dict | None = None) -> dict[str, Any]:
    """The recipe (a YAML path, a mapping, or None: the packaged recipe-points.yaml), without its description."""
    from lift3d.priors.toyworld.recipe import read_recipe

    source, _ = read_recipe(source, PACKAGED_POINTS_RECIPE, "a mapping of train-points keys")
    return {k: v for k, v in source.items() if k != "description"}


def train_points_recipe(recipe: str | Path | dict | None = None, overrides: dict[str, Any] | None = None,
                        progress: bool = True) -> Path:
    from lift3d.config import merge_dicts

    return train_points(merge_dicts(load_points_recipe(recipe), dict(overrides or {})), progress=progress)


__all__ = ["DEFAULT_POINTS_WEIGHTS", "POINTS_META_KEY", "POINTS_TRAIN_COMMAND", "FINAL_POINTS_NAME", "ToyPointConfig",
           "ToyPointPrior", "surface_pool", "PointCloudData", "point_loss", "sample_points", "PointScore",
           "cloud_chamfer", "front_check", "evaluate_points", "format_point_table", "save_cloud_grid",
           "PointsTrainConfig", "train_points", "train_points_recipe", "load_points_recipe", "missing_weights_message"]
