"""Training of the toy-world prior: reproducible from a seed, resumable, CPU-friendly.

Every random choice of step ``k`` (the batch order, timesteps, noise, the text drop) comes from
generators seeded by (seed, k), so an interrupted run resumed from its checkpoint ends with the
same weights as an uninterrupted one. The checkpoint (``ckpt.pt``: model, EMA, optimizer, step)
is written atomically and loaded with ``weights_only=True``. The final EMA weights are written as
safetensors, the format the package ships.

The loop itself (:func:`fit`) also fine-tunes the multi-view twin
(:mod:`lift3d.priors.toyworld.multiview_train`), which brings its own model, data and loss.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from lift3d.config import parse_structured
from lift3d.priors.toyworld.model import ToyPriorConfig, ToyWorldPrior, make_scheduler
from lift3d.utils.checkpoint import atomic_torch_save


@dataclass
class TrainConfig:
    seed: int = 0
    """Seed of the data, the initialisation and every step's noise."""
    steps: int = 7000
    """Optimizer steps (the cosine learning-rate decay spans them)."""
    batch_size: int = 32
    """Images per step."""
    lr: float = 3e-4
    """Peak learning rate (AdamW), after a linear warm-up, cosine-decayed to 10%."""
    warmup_steps: int = 300
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    ema_decay: float = 0.999
    """Decay of the exponential moving average whose weights are saved."""
    min_snr_gamma: Optional[float] = 5.0
    """Min-SNR loss weighting (Hang et al. 2023); null for plain MSE."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    num_samples: int = 20000
    """Training images, rendered once (and cached under cache_dir)."""
    cache_dir: Optional[str] = None
    """Where rendered training images are cached (default: ~/.cache/lift3d/toyworld)."""
    out_dir: str = "outputs/toyworld-prior"
    """Checkpoints, sample grids and the final safetensors file."""
    ckpt_every: int = 200
    """Steps between checkpoints."""
    sample_every: int = 1000
    """Steps between sample grids (0: never)."""
    log_every: int = 50
    """Steps between log lines written to train_log.csv."""
    threads: Optional[int] = None
    """torch threads (default: torch's choice)."""
    stop_after: Optional[int] = None
    """Stop this invocation after so many steps (checkpointing there); run again to continue. For
    training in slices of machine time: the result equals one uninterrupted run."""
    model: dict[str, Any] = field(default_factory=dict)
    """ToyPriorConfig overrides."""
    focus_prompts: list[str] = field(default_factory=list)
    """Prompts over-represented in every batch, e.g. the snowman, chair and mug, the only objects
    whose front and back the camera conditioning has to tell apart; empty: the data's uniform mix."""
    focus_fraction: float = 0.0
    """Share of each batch drawn (per step, from that step's seed) from the focus prompts' images."""
    random_background: float = 0.0
    """Share of training images put on a random solid colour (uniform RGB, drawn from the step's seed)
    instead of black. On black alone a dim surface and a half-transparent one look the same, so SDS
    lets dark objects and shadowed sides fade out; a recipe with a random background tells them apart
    only if the prior has seen objects on other colours."""
    feature_weight: float = 0.0
    """Extra loss weight on the pixels where the object or its Janus twin shows its front feature
    (``data.feature_regions``): 10 makes a snowman's nose count eleven times. The nose, chair back
    and handle cover about 1% of an image, too little of the plain loss for the network to learn
    which azimuth puts them where; 0 leaves the loss as it was."""
    corner_weight: float = 0.0
    """Extra loss weight on the pixels where a cube's silhouette differs from the cube turned 45
    degrees (``data.corner_regions``): what places its corners. Version 2 ignored the cube's azimuth
    entirely; 0 leaves the loss as it was."""
    region_weight_final: float = 1.0
    """Multiplier of feature_weight and corner_weight at the last step, reached linearly from 1 at
    step 0: strong early, while the network learns to read the azimuth; weaker late, so that a
    weighted loss does not end up drawing the features too large."""
    autocast: Optional[str] = None
    """"bf16": run the network's forward pass under bfloat16 autocast (weights, optimizer, EMA and
    the loss stay float32). On a CPU with AMX or AVX512-BF16 a training step is about 1.4x faster
    (``bench/prior_speed.py --autocast``); on one without, it is slower. null: float32 throughout."""
    init_from: Optional[str] = None
    """Start from the weights of this safetensors file (fine-tuning; "shipped": the packaged weights).
    Input channels the new model has and the file lacks (``model.ray_conditioning``) start at zero,
    so step 0 computes what the file's model computes."""


def _step_generator(seed: int, step: int, tag: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + tag * 104_729) % (2**63 - 1))


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def random_backgrounds(image: torch.Tensor, mask: torch.Tensor, share: float, g: torch.Generator) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] over black, with a ``share`` of them put on a random solid colour.

    ``mask`` [B, 1, H, W] is the object's coverage; the renders are ``albedo * shading * mask`` over
    black, so adding ``(1 - mask) * colour`` composites them over that colour exactly.
    """
    B = image.shape[0]
    chosen = torch.rand(B, generator=g) < share
    colour = torch.rand(B, 3, generator=g).to(image.dtype)[:, :, None, None]
    over = image + 2.0 * (1.0 - mask) * colour  # in [-1, 1] units: black (-1) + 2 * colour
    return torch.where(chosen[:, None, None, None], over, image)


AUTOCAST_CHOICES = (None, "bf16")


def _autocast_enabled(autocast: str | None) -> bool:
    if autocast not in AUTOCAST_CHOICES:
        raise ValueError(f"train.autocast must be one of {AUTOCAST_CHOICES} (null: float32), got {autocast!r}")
    return autocast == "bf16"


BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # bf16: Arm's BF16 extension


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags listed in ``cpuinfo`` (default: ``/proc/cpuinfo``; x86 ``flags``, Arm
    ``Features``); empty where there is no such file (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    return {f for line in cpuinfo.splitlines() if line.startswith(("flags", "Features"))
            for f in line.split(":", 1)[-1].split()}


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU has bfloat16 matrix instructions (AMX, AVX512-BF16 or Arm's BF16), read off
    :func:`cpu_flags`; None where that cannot be told (not Linux). Without them torch emulates bf16
    and ``autocast=bf16`` trains slower than float32."""
    flags = cpu_flags(cpuinfo)
    return bool(flags & set(BF16_CPU_FLAGS)) if flags else None


def autocast_note(autocast: str | None, device: str = "cpu", cpuinfo: str | None = None) -> str | None:
    """A line for the user when ``autocast`` will be slow here (bf16 on a CPU without bf16 hardware)."""
    if _autocast_enabled(autocast) and device == "cpu" and cpu_has_native_bf16(cpuinfo) is False:
        return ("[toyworld] autocast=bf16 on a CPU without bf16 instructions (AMX, AVX512-BF16): torch "
                "emulates bfloat16 there, slower than float32. autocast=null trains in float32 (weights "
                "close to, not bit for bit, the shipped ones, which were trained under bf16).")
    return None


def diffusion_loss(model: ToyWorldPrior, sched: Any, batch: dict[str, torch.Tensor], g: torch.Generator,
                   min_snr_gamma: float | None, random_background: float = 0.0,
                   g_background: torch.Generator | None = None, feature_weight: float = 0.0,
                   corner_weight: float = 0.0, autocast: str | None = None,
                   n_views: int | None = None) -> torch.Tensor:
    """The denoising loss on one batch, all randomness drawn from ``g`` (backgrounds: ``g_background``).

    The backgrounds have a generator of their own, so the other draws of a step do not depend on them.
    With ``feature_weight`` the batch's ``feature_region`` pixels weigh ``1 + feature_weight``; with
    ``corner_weight`` its ``corner_region`` pixels weigh ``1 + corner_weight`` (the two are disjoint).
    ``autocast="bf16"`` runs the network under bfloat16 autocast; the loss is computed in float32.
    ``n_views`` (the multi-view twin): the batch is whole groups of ``n_views`` consecutive views, each
    group gets one timestep and one text drop, and the model is called with ``n_views``; None draws
    them per image, in the same order, and calls the model without it.
    """
    x0 = batch["image"]
    B = x0.shape[0]
    per_draw = 1 if n_views is None else n_views
    if B % per_draw:
        raise ValueError(f"a batch of {B} views is not whole groups of {n_views}")
    n_draws = B // per_draw
    model_kwargs = {} if n_views is None else {"n_views": n_views}
    if random_background > 0:
        x0 = random_backgrounds(x0, batch["mask"], random_background, g_background or torch.Generator())
    t = torch.randint(0, model.cfg.num_train_timesteps, (n_draws,), generator=g).repeat_interleave(per_draw)
    noise = torch.randn(x0.shape, generator=g)
    drop = (torch.rand(n_draws, generator=g) < model.cfg.p_uncond).repeat_interleave(per_draw)
    x_t = sched.add_noise(x0, noise, t)
    with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=_autocast_enabled(autocast)):
        out = model(x_t, t, batch["tokens"], batch["camera"], drop, **model_kwargs)
    out = out.float()
    target = noise if model.cfg.prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)
    err = F.mse_loss(out, target, reduction="none")
    weight = 1.0
    for w, kind in ((feature_weight, "feature"), (corner_weight, "corner")):
        if w:
            if f"{kind}_region" not in batch:
                raise ValueError(f"{kind}_weight needs batches with a {kind}_region (data.{kind}_regions)")
            weight = weight + w * batch[f"{kind}_region"]
    err = err * weight
    per = err.mean(dim=(1, 2, 3))
    if min_snr_gamma:
        a = sched.alphas_cumprod[t]
        snr = a / (1 - a)
        w = snr.clamp(max=min_snr_gamma) / (snr + 1 if model.cfg.prediction_type == "v_prediction" else snr)
        per = per * w
    return per.mean()


def focus_pool(cfg: TrainConfig, ds: Any) -> torch.Tensor | None:
    """Indices of the data set's images of ``cfg.focus_prompts`` (None when there is no focus)."""
    if not cfg.focus_prompts or cfg.focus_fraction <= 0:
        return None
    from lift3d.priors.toyworld.shapes import list_prompts

    prompts = list_prompts()
    unknown = [p for p in cfg.focus_prompts if p not in prompts]
    if unknown:
        raise ValueError(f"train.focus_prompts: {unknown} are not toy-world prompts; valid: {', '.join(prompts)}")
    if not 0 < cfg.focus_fraction <= 1:
        raise ValueError(f"train.focus_fraction must be in (0, 1], got {cfg.focus_fraction}")
    wanted = torch.tensor([prompts.index(p) for p in cfg.focus_prompts])
    pool = torch.nonzero(torch.isin(ds._finite_data()["prompt_index"], wanted)).flatten()
    if len(pool) == 0:
        raise ValueError(f"train.focus_prompts: no image of {cfg.focus_prompts} among the {cfg.num_samples} samples")
    return pool


def with_focus(batch: dict[str, torch.Tensor], ds: Any, pool: torch.Tensor, cfg: TrainConfig,
               step: int) -> dict[str, torch.Tensor]:
    """Replace the last ``focus_fraction`` of ``batch`` by focus images drawn from step ``step``'s seed."""
    from lift3d.priors.toyworld.data import collate

    B = batch["image"].shape[0]
    n = max(1, round(cfg.focus_fraction * B))
    pick = pool[torch.randint(len(pool), (n,), generator=_step_generator(cfg.seed, step, 2))]
    extra = collate({k: v[pick] for k, v in ds._finite_data().items()})
    return {k: torch.cat([v[: B - n], extra[k]]) for k, v in batch.items()}


def init_weights(model: ToyWorldPrior, path: str) -> None:
    """Load ``path`` into ``model``; the extra input channels of a widened ``conv_in`` start at zero."""
    from safetensors.torch import load_file

    from lift3d.priors.toyworld.model import DEFAULT_WEIGHTS

    src = load_file(str(DEFAULT_WEIGHTS if path == "shipped" else path))
    own = model.state_dict()
    for key, value in src.items():
        if key not in own:
            raise ValueError(f"init_from {path}: '{key}' is not a parameter of this model")
        if own[key].shape != value.shape:
            widened = (key == "unet.conv_in.weight" and own[key].shape[0] == value.shape[0]
                       and own[key].shape[1] > value.shape[1])
            if not widened:
                raise ValueError(f"init_from {path}: '{key}' has shape {tuple(value.shape)}, the model "
                                 f"{tuple(own[key].shape)}; only conv_in may gain input channels")
            value = torch.cat([value, value.new_zeros(value.shape[0], own[key].shape[1] - value.shape[1],
                                                      *value.shape[2:])], dim=1)
        own[key] = value
    missing = set(own) - set(src)
    if missing:
        raise ValueError(f"init_from {path} lacks {sorted(missing)[:5]}")
    model.load_state_dict(own)


def build_dataset(cfg: TrainConfig, resolution: int) -> Any:
    from lift3d.priors.toyworld.data import ToyWorldDataset

    cache = cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "lift3d", "toyworld")
    ds = ToyWorldDataset(batch_size=cfg.batch_size, seed=cfg.seed, resolution=resolution,
                         num_samples=cfg.num_samples, cache_dir=cache, shuffle=True, drop_last=True)
    if cfg.feature_weight:
        attach_regions(ds, "feature")
    if cfg.corner_weight:
        attach_regions(ds, "corner")
    return ds


def attach_regions(ds: Any, kind: str = "feature") -> None:
    """Add ``{kind}_region`` ("feature" or "corner") to a finite data set's samples, rendered once and
    cached beside them (``data.feature_regions`` / ``data.corner_regions``)."""
    from lift3d.priors.toyworld import data as tw_data

    make, suffix = {"feature": (tw_data.feature_regions, "_features.npz"),
                    "corner": (tw_data.corner_regions, "_corners.npz")}[kind]
    data = ds._finite_data()
    path = None
    if ds.cache_dir is not None:
        base = tw_data.cache_path(ds.cache_dir, ds.seed, ds.num_samples, ds.resolution, ds.supersample)
        path = base.with_name(base.stem + suffix)
    key = f"{kind}_region"
    data[key] = tw_data.cached_npz(path, lambda: {key: make(data, ds.resolution)})[key]


def region_scale(cfg: TrainConfig, step: int) -> float:
    """The factor on feature_weight and corner_weight at ``step``: 1 at step 0, region_weight_final at the end."""
    p = min(1.0, step / max(1, cfg.steps - 1))
    return 1.0 + (cfg.region_weight_final - 1.0) * p


def start_run(cfg: Any, progress: bool = True) -> None:
    """What a training does before it builds its model: check ``cfg.autocast`` (a bad value fails
    before any data is rendered), set the threads, make ``cfg.out_dir`` and seed torch's global
    generator with ``cfg.seed`` (the model's initialisation draws from it)."""
    note = autocast_note(cfg.autocast)
    if note and progress:
        print(note)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)


def epoch_batch(ds: Any, step: int) -> dict[str, torch.Tensor]:
    """Batch ``step`` of a data set that is reshuffled every epoch (``set_epoch``, ``batch``, ``len``)."""
    n_batches = len(ds)
    ds.set_epoch(step // n_batches)
    return ds.batch(step % n_batches)


def fit(cfg: Any, model: ToyWorldPrior, batches: Callable[[], Callable[[int], dict[str, torch.Tensor]]],
        loss_at: Callable[[ToyWorldPrior, Any, dict[str, torch.Tensor], int], torch.Tensor],
        save_samples: Callable[..., Path], name: str = "toyworld", desc: str = "toyworld prior",
        extra_metadata: dict[str, str] | None = None, progress: bool = True) -> Path:
    """The resumable training loop of ``model`` in ``cfg.out_dir``; returns the safetensors file of its EMA.

    ``cfg``: a :class:`TrainConfig` or the multi-view twin's config (the loop reads seed, steps, lr,
    warmup_steps, weight_decay, ema_decay, grad_clip, ckpt_every, log_every, sample_every and
    stop_after). After the checkpoint (``ckpt.pt``) is loaded, if there is one, ``batches()`` builds
    the data and returns the batch of each step; ``loss_at(model, scheduler, batch, step)`` is that
    step's loss and ``save_samples(ema, path, seed=...)`` writes a sample grid every
    ``cfg.sample_every`` steps. The file is ``{name}.safetensors`` once ``cfg.steps`` are done, else
    ``{name}-step{step}.safetensors``; its metadata holds the steps, the seed and ``extra_metadata``.
    """
    out = Path(cfg.out_dir)
    ema = copy.deepcopy(model).requires_grad_(False)
    # A model may ask for some of its parameters to learn faster (``lr_groups``: the image-conditioned
    # twin's new layers, which start at zero); every group follows the same schedule, scaled.
    groups = model.lr_groups(cfg) if hasattr(model, "lr_groups") else [{"params": list(model.parameters())}]
    opt = torch.optim.AdamW([{**g, "lr_scale": g.get("lr_scale", 1.0)} for g in groups], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    sched = make_scheduler(model.cfg, "ddpm")
    step = 0
    ckpt_path = out / "ckpt.pt"
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        step = int(ck["step"])
        print(f"[{name}] resuming from {ckpt_path} at step {step}")
    batch_at = batches()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=desc, dynamic_ncols=True)
    log = open(out / "train_log.csv", "a")
    if step == 0:
        log.write("step,loss,lr,seconds\n")
    t_start, losses = time.time(), []
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, step + cfg.stop_after)
    try:
        while step < end:
            batch = batch_at(step)
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, step) * group["lr_scale"]
            loss = loss_at(model, sched, batch, step)
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite loss at step {step}; last checkpoint: {ckpt_path}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            with torch.no_grad():
                d = min(cfg.ema_decay, (1 + step) / (10 + step))
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - d)
                for be, bm in zip(ema.buffers(), model.buffers()):
                    be.copy_(bm)
            step += 1
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr_at(cfg, step - 1):.2e}")
            if step % cfg.log_every == 0:
                log.write(f"{step},{sum(losses) / len(losses):.6f},{lr_at(cfg, step - 1):.3e},"
                          f"{time.time() - t_start:.1f}\n")
                log.flush()
                losses = []
            if step % cfg.ckpt_every == 0 or step == end:
                atomic_torch_save({"model": model.state_dict(), "ema": ema.state_dict(),
                                   "optimizer": opt.state_dict(), "step": step, "config": asdict(cfg)}, ckpt_path)
            if cfg.sample_every and step % cfg.sample_every == 0:
                save_samples(ema, out / f"samples-{step:06d}.png", seed=cfg.seed)
    finally:
        log.close()
        if bar is not None:
            bar.close()
    file_name = f"{name}.safetensors" if step >= cfg.steps else f"{name}-step{step}.safetensors"
    final = ema.save(out / file_name, {"train_steps": str(step), "train_seed": str(cfg.seed),
                                       **(extra_metadata or {})})
    print(f"[{name}] weights after {step}/{cfg.steps} steps: {final}")
    return final


def train(cfg: TrainConfig | dict, progress: bool = True) -> Path:
    """Train (or resume) in ``cfg.out_dir``; returns the path of the final safetensors file."""
    from lift3d.priors.toyworld.vocab import VOCAB

    cfg = parse_structured(TrainConfig, cfg, key="train")
    start_run(cfg, progress)
    model = ToyWorldPrior(parse_structured(ToyPriorConfig, {"vocab_size": len(VOCAB), **cfg.model}))
    if cfg.init_from:
        init_weights(model, cfg.init_from)

    def batches() -> Callable[[int], dict[str, torch.Tensor]]:
        ds = build_dataset(cfg, model.cfg.resolution)
        pool = focus_pool(cfg, ds)

        def batch_at(step: int) -> dict[str, torch.Tensor]:
            batch = epoch_batch(ds, step)
            return batch if pool is None else with_focus(batch, ds, pool, cfg, step)

        return batch_at

    def loss_at(model: ToyWorldPrior, sched: Any, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        scale = region_scale(cfg, step)
        return diffusion_loss(model, sched, batch, _step_generator(cfg.seed, step, 1), cfg.min_snr_gamma,
                              cfg.random_background, _step_generator(cfg.seed, step, 3),
                              cfg.feature_weight * scale, cfg.corner_weight * scale, cfg.autocast)

    return fit(cfg, model, batches, loss_at, save_sample_grid, progress=progress)


SAMPLE_GRID_PROMPTS = ("a red cube", "a blue sphere", "a green torus", "a snowman", "a chair", "a mug")


def save_sample_grid(model: ToyWorldPrior, path: Path, seed: int = 0, steps: int = 25,
                     prompts: tuple[str, ...] = SAMPLE_GRID_PROMPTS, n_azimuths: int = 4,
                     sampler: Callable[..., torch.Tensor] | None = None) -> Path:
    """One row per prompt, ``n_azimuths`` views at elevation 20 and azimuths ``k * 360 / n_azimuths``:
    a quick look at what the prior learned. ``sampler`` (default :func:`~lift3d.priors.toyworld.model.sample`)
    is called as ``sampler(model, tokens, cameras, steps=..., generator=...)`` with a row's views
    consecutive (the multi-view twin samples each row as one group)."""
    from lift3d.priors.toyworld.data import camera_vector
    from lift3d.priors.toyworld.model import sample
    from lift3d.priors.toyworld.vocab import pad_tokens, tokenize
    from lift3d.utils.io import image_grid, save_image

    n = n_azimuths
    az = torch.arange(n, dtype=torch.float32) * (360.0 / n)
    tokens = pad_tokens([tokenize(p) for p in prompts for _ in range(n)])
    cams = camera_vector(torch.full((n * len(prompts),), 20.0), az.repeat(len(prompts)),
                         torch.full((n * len(prompts),), 2.0))
    was_training = model.training
    imgs = (sampler or sample)(model.eval(), tokens, cams, steps=steps, generator=torch.Generator().manual_seed(seed))
    model.train(was_training)
    rows = [[imgs[i * n + j].permute(1, 2, 0).cpu().numpy() for j in range(n)] for i in range(len(prompts))]
    return save_image(path, image_grid(rows))
