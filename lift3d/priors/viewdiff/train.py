"""Training ViewDiff's added layers on a multi-view dataset (layout: :mod:`lift3d.priors.viewdiff.data`).

``python -m lift3d.priors.viewdiff train root=<dataset> base_model=<SD folder or id> out_dir=<folder>``
(any :class:`TrainConfig` key as ``key=value``, nested ones as ``model.grid_size=24``).

Each step draws ``batch_size`` groups of ``n_views`` distinct views of one object each, encodes
the images with the frozen VAE (the posterior mean times the scaling factor; cached, since it never
changes), noises a group at one timestep and trains the ViewDiff UNet to predict the scheduler's
target (``epsilon``: the noise; ``v_prediction``: ``sqrt(a) eps - sqrt(1 - a) x0``; ``sample``: x0)
with a mean squared error. Only the added tensors (the conditioned LoRA with its FiLM MLPs, and
the projection layers) train, with AdamW; the base UNet, the VAE and the text encoder are frozen.

Two things prepare the model for how it is used:

* with probability ``p_uncond`` a group's text is the empty prompt (classifier-free guidance);
* with probability ``p_known`` the first k views of a group (k uniform in 1..n_views-1) are given
  clean, at t = 0, and left out of the loss: the autoregressive sampler's ``known: clean`` mode
  conditions later groups on already generated views this way (ViewDiff trains with a mix of
  noised and clean views for the same purpose).

The added layers' initial values come from ``seed`` alone, and everything random in a step
(objects, views, timesteps, noise, dropped texts) from a generator seeded by (seed, step), so a
resumed run draws exactly what an uninterrupted one would and ends with the same weights.
``<out_dir>/checkpoint.safetensors`` holds the added tensors, the AdamW state and the step (written
atomically every ``save_every`` steps and at the end); a run started on an out_dir with a checkpoint
resumes from it. The finished weights go to ``<out_dir>/viewdiff.safetensors`` (what the sampler
and ``viewdiff-guidance`` read).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from contextlib import nullcontext
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lift3d.config import ConfigError, parse_structured
from lift3d.priors.viewdiff.data import load_image, scan_dataset
from lift3d.priors.viewdiff.model import (
    DEFAULT_BASE_MODEL,
    WEIGHTS_NAME,
    ViewDiffConfig,
    ViewDiffUNet,
    encode_texts,
    load_base,
    resolve_base,
)

CHECKPOINT_NAME = "checkpoint.safetensors"


@dataclass
class TrainConfig:
    root: str = ""
    """The dataset folder (one sub-folder per object; see lift3d.priors.viewdiff.data)."""
    base_model: str = DEFAULT_BASE_MODEL
    """The Stable Diffusion to build on: a diffusers folder or a Hugging Face id in the local cache."""
    out_dir: str = "outputs/viewdiff"
    """Where the checkpoint and the finished weights go (an existing checkpoint is resumed)."""
    model: ViewDiffConfig = field(default_factory=ViewDiffConfig)
    """The added layers' shape (rank, volume size, where the projection layers go)."""
    steps: int = 10000
    """Optimizer steps in all (a resumed run continues to this many)."""
    n_views: int = 4
    """Views per group."""
    batch_size: int = 1
    """Groups per step."""
    lr: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the gradient's global norm to this (0: no clipping)."""
    resolution: Optional[int] = None
    """Image side in pixels; null: the UNet's sample size times the VAE's factor (512 for SD 2.1-base)."""
    p_uncond: float = 0.1
    """Probability that a group's text is dropped (the empty prompt)."""
    p_known: float = 0.25
    """Probability that a group's first views are given clean and unscored (see the module docstring)."""
    seed: int = 0
    """Seed of every random draw (per step)."""
    save_every: int = 500
    """Write the checkpoint every this many steps."""
    log_every: int = 50
    """Print the mean loss every this many steps (0: never)."""
    autocast: Optional[Literal["bf16", "fp16"]] = None
    """Run the UNet under torch.autocast in bfloat16 or float16 (the trained tensors stay float32); null: float32."""
    gradient_checkpointing: bool = False
    """Recompute the base UNet's activations in the backward pass (diffusers' gradient checkpointing): less memory."""
    cache_latents: bool = True
    """Keep every encoded image in memory (the VAE runs once per image)."""
    device: Optional[str] = None
    """Where to train; null: CUDA when available, else the CPU."""
    threads: Optional[int] = None
    """torch CPU threads; null: torch's default."""


def _generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + 12_345) % (2**63 - 1))


class Trainer:
    """One training run (see the module docstring); :meth:`run` trains to ``cfg.steps``."""

    def __init__(self, cfg: TrainConfig | dict, progress: bool = True):
        cfg = parse_structured(TrainConfig, cfg, key="train")
        for name in ("steps", "n_views", "batch_size", "save_every"):
            if getattr(cfg, name) < 1:
                raise ConfigError(f"config key 'train.{name}' must be >= 1, got {getattr(cfg, name)}")
        for name in ("p_uncond", "p_known"):
            if not 0 <= getattr(cfg, name) <= 1:
                raise ConfigError(f"config key 'train.{name}' must be in [0, 1], got {getattr(cfg, name)}")
        if not cfg.root:
            raise ConfigError("config key 'train.root' is empty: give the dataset folder (root=...)")
        self.cfg, self.progress = cfg, progress
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.objects = scan_dataset(cfg.root, cfg.n_views)
        parts = load_base(resolve_base(cfg.base_model, key="base_model"),
                          ("unet", "vae", "scheduler", "text_encoder", "tokenizer"), key="base_model")
        unet, self.vae = parts["unet"], parts["vae"].to(self.device)
        sched = parts["scheduler"]
        self.prediction_type = sched.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ConfigError(f"base_model: the scheduler's prediction_type {self.prediction_type!r} is not one of "
                              "epsilon, v_prediction, sample")
        self.alphas_cumprod = sched.alphas_cumprod.float().to(self.device)
        self.num_train_timesteps = int(sched.config.num_train_timesteps)
        vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = int(cfg.resolution or int(unet.config.sample_size) * vae_factor)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        texts = sorted({o.prompt for o in self.objects} | {""})
        states = encode_texts(parts["tokenizer"], parts["text_encoder"], texts)
        self.text = {t: s.to(self.device) for t, s in zip(texts, states)}
        del parts
        with torch.random.fork_rng(devices=[]):  # the added layers' initialisation is a function of the seed
            torch.manual_seed(cfg.seed)
            self.model = ViewDiffUNet(unet, cfg.model).to(self.device)
        self.model.unet.eval()
        if cfg.gradient_checkpointing:
            self.model.unet.enable_gradient_checkpointing()
        self.params = dict(self.model.added_parameters())
        for p in self.params.values():
            p.requires_grad_(True)
        self.opt = torch.optim.AdamW(list(self.params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.out_dir = Path(cfg.out_dir)
        self.step = 0
        self._cache: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        if (self.out_dir / CHECKPOINT_NAME).is_file():
            self.resume()

    # -- data ---------------------------------------------------------------------------------------

    def view(self, obj: int, idx: int) -> tuple[Tensor, Tensor]:
        """(latent ``[4, h, w]``, intensity) of view ``idx`` of object ``obj``."""
        key = (obj, idx)
        if key in self._cache:
            return self._cache[key]
        img = load_image(self.objects[obj].files[idx], self.resolution).to(self.device)
        with torch.no_grad():
            dist = self.vae.encode((img[None] * 2 - 1).to(self.vae.dtype)).latent_dist
            latent = (dist.mean * self.scaling_factor)[0].float()
        out = (latent, img.mean().float())
        if self.cfg.cache_latents:
            self._cache[key] = out
        return out

    def batch(self, step: int) -> dict[str, Any]:
        """The training batch of ``step`` (a pure function of the seed and the step)."""
        c, g = self.cfg, _generator(self.cfg.seed, step)
        f = c.n_views
        lat, inten, c2w, K, t, known, text = [], [], [], [], [], [], []
        for _ in range(c.batch_size):
            o = int(torch.randint(len(self.objects), (1,), generator=g))
            obj = self.objects[o]
            views = torch.randperm(len(obj), generator=g)[:f].tolist()
            for v in views:
                z, i = self.view(o, v)
                lat.append(z)
                inten.append(i)
            c2w.append(obj.c2w[views])
            K.append(obj.intrinsics[views])
            tg = int(torch.randint(self.num_train_timesteps, (1,), generator=g))
            k = 0
            if f > 1 and float(torch.rand((), generator=g)) < c.p_known:
                k = int(torch.randint(1, f, (1,), generator=g))
            t.append(torch.tensor([0] * k + [tg] * (f - k)))
            known.append(torch.tensor([True] * k + [False] * (f - k)))
            drop = float(torch.rand((), generator=g)) < c.p_uncond
            text.append(self.text["" if drop else obj.prompt][None].expand(f, -1, -1))
        latents = torch.stack(lat)
        noise = torch.randn(latents.shape, generator=g).to(self.device)
        dev = self.device
        return {"latents": latents, "noise": noise, "t": torch.cat(t).to(dev), "known": torch.cat(known).to(dev),
                "text": torch.cat(text), "c2w": torch.cat(c2w).to(dev), "intrinsics": torch.cat(K).to(dev),
                "intensity": torch.stack(inten)}

    # -- the objective ------------------------------------------------------------------------------

    def loss(self, b: dict[str, Any]) -> Tensor:
        """The mean squared error of the prediction on the views that are not given clean."""
        x, noise, t, known = b["latents"], b["noise"], b["t"], b["known"]
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = torch.where(known.view(-1, 1, 1, 1), x, a.sqrt() * x + (1 - a).sqrt() * noise)
        ac = self.cfg.autocast
        ctx = (torch.autocast(self.device.type, dtype=torch.bfloat16 if ac == "bf16" else torch.float16) if ac
               else nullcontext())
        with ctx:
            pred = self.model(x_t, t, b["text"], b["c2w"], b["intrinsics"], b["intensity"], self.cfg.n_views)
        pred = pred.float()
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = a.sqrt() * noise - (1 - a).sqrt() * x
        else:
            target = x
        per_view = F.mse_loss(pred, target, reduction="none").flatten(1).mean(1)
        scored = (~known).float()
        return (per_view * scored).sum() / scored.sum().clamp_min(1.0)

    def train_step(self) -> float:
        b = self.batch(self.step)
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(b)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.grad_clip)
        self.opt.step()
        self.step += 1
        return float(loss.detach())

    def run(self) -> Path:
        """Train to ``cfg.steps`` (checkpointing on the way); returns the finished weights' path."""
        c = self.cfg
        self.model.unet.eval()
        running, n, t0 = 0.0, 0, time.time()
        while self.step < c.steps:
            running += self.train_step()
            n += 1
            if c.log_every and self.step % c.log_every == 0 and self.progress:
                print(f"[viewdiff] step {self.step}/{c.steps} loss {running / n:.4f} "
                      f"({(time.time() - t0) / n:.2f} s/step)", file=sys.stderr)
                running, n, t0 = 0.0, 0, time.time()
            if self.step % c.save_every == 0 or self.step == c.steps:
                self.save_checkpoint()
        return self.model.save_added(self.out_dir / WEIGHTS_NAME, metadata={"steps": str(self.step)})

    # -- checkpoints --------------------------------------------------------------------------------

    def _train_meta(self) -> dict[str, Any]:
        """What a resumed run must share with the checkpoint (the model and what the batches depend on)."""
        c = self.cfg
        return {"model": asdict(self.model.config), "n_views": c.n_views, "batch_size": c.batch_size,
                "seed": c.seed, "resolution": self.resolution}

    def save_checkpoint(self) -> Path:
        """The added tensors, AdamW's state and the step, in one safetensors file (atomically)."""
        extra: dict[str, Tensor] = {}
        for name, p in self.params.items():
            st = self.opt.state.get(p)
            if st:
                for k, v in st.items():
                    extra[f"optimizer.{name}.{k}"] = torch.as_tensor(v).detach().float()
        meta = {"step": str(self.step), "train": json.dumps(self._train_meta())}
        return self.model.save_added(self.out_dir / CHECKPOINT_NAME, extra=extra, metadata=meta)

    def resume(self) -> None:
        from lift3d.priors.viewdiff.model import read_metadata

        path = self.out_dir / CHECKPOINT_NAME
        meta = read_metadata(path)
        saved = json.loads(meta.get("train", "{}"))
        if saved != json.loads(json.dumps(self._train_meta())):
            raise ConfigError(f"{path} was written by a run with other settings ({saved}); this run has "
                              f"{self._train_meta()}: use those settings or a new out_dir")
        extra = self.model.load_added(path)
        state: dict[int, dict[str, Tensor]] = {}
        for i, (name, p) in enumerate(self.params.items()):
            keys = {k.rsplit(".", 1)[-1]: v for k, v in extra.items() if k.startswith(f"optimizer.{name}.")
                    and "." not in k[len(f"optimizer.{name}."):]}
            if keys:
                state[i] = {k: (v if k == "step" else v.to(p.device, p.dtype)) for k, v in keys.items()}
        self.opt.load_state_dict({"state": state, "param_groups": self.opt.state_dict()["param_groups"]})
        self.step = int(meta["step"])
        if self.progress:
            print(f"[viewdiff] resumed {path} at step {self.step}", file=sys.stderr)


def train(cfg: TrainConfig | dict, progress: bool = True) -> Path:
    """Train (or resume) in ``cfg.out_dir``; returns the path of the finished weights."""
    return Trainer(cfg, progress).run()


__all__ = ["TrainConfig", "Trainer", "train", "CHECKPOINT_NAME"]
