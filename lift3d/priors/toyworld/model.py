"""The toy-world prior: a small pixel-space diffusion model conditioned on text and camera.

Like DeepFloyd IF's first stage it works on pixels, with no VAE. Images stay 64x64x3 at the
interface, but the UNet (diffusers' ``UNet2DModel``) runs at 32x32 on a space-to-depth view
(64x64x3 -> 32x32x12 and back): on a 2-core CPU that is about 5x cheaper per step than running
at 64x64, and nothing is lost since the rearrangement is exact.

Conditioning: a learned embedding per token of the toy vocabulary (mean over the prompt's
tokens), an MLP of the camera vector (elevation/90, sin az, cos az, normalised distance), summed
and added to the UNet's timestep embedding (``class_embed_type="identity"``). Classifier-free
guidance: during training the text embedding is replaced by a learned null embedding with
probability ``p_uncond``; the camera is always given. With ``ray_conditioning`` the camera also
enters as a per-pixel ray map (Pluecker coordinates, six channels beside the image), which tells
every pixel where its ray passes in the world, so which side of an object faces the camera is a
local question for the convolutions.

Weights are saved as safetensors with the model config in the file's metadata, so a file is
self-describing and loads without pickle.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lift3d.config import parse_structured

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "toyworld.safetensors"


_Prior = TypeVar("_Prior", bound="ToyWorldPrior")  # load() returns the class it is called on


class MissingWeightsError(FileNotFoundError):
    """The prior's weights are not where they were looked for; the message says how to get them."""


@dataclass
class ToyPriorConfig:
    vocab_size: int = 15
    """Token ids the text embedding knows (the toy vocabulary, padding at 0)."""
    resolution: int = 64
    """Image side at the interface (the UNet runs at resolution / space_to_depth)."""
    space_to_depth: int = 2
    """Pixel-unshuffle factor before the UNet."""
    block_out_channels: list[int] = field(default_factory=lambda: [48, 96, 96])
    """UNet widths per level."""
    layers_per_block: int = 1
    """ResNet layers per UNet level."""
    attention: bool = True
    """Self-attention at the lowest resolution."""
    norm_num_groups: int = 16
    """GroupNorm groups."""
    camera_dim: int = 4
    """Size of the camera vector."""
    camera_harmonics: int = 1
    """Azimuth harmonics the camera MLP sees: sin and cos of k * azimuth for k = 1 .. this. A cube
    looks the same every 90 degrees, so its corners follow sin/cos(4 az); with 1 (version 2's
    model) the MLP would have to build that frequency itself."""
    ray_conditioning: bool = False
    """Also give the UNet each pixel's camera ray (Pluecker coordinates, 6 channels, computed from the
    camera vector) as input channels: the view enters where the image is, not only as a global bias."""
    ray_fovy: float = 40.0
    """Field of view (degrees) of the ray map; the toy world's cameras."""
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    """What the network predicts."""
    num_train_timesteps: int = 1000
    """DDPM steps."""
    beta_schedule: str = "squaredcos_cap_v2"
    """diffusers beta schedule name."""
    p_uncond: float = 0.1
    """Probability of dropping the text in training (for classifier-free guidance)."""


class ToyWorldPrior(nn.Module):
    """``forward(x [B,3,H,W] in [-1,1], t [B], tokens [B,L], camera [B,4], drop_text [B] bool) -> [B,3,H,W]``."""

    def __init__(self, cfg: ToyPriorConfig | dict | None = None):
        super().__init__()
        from diffusers import UNet2DModel

        self.cfg = parse_structured(ToyPriorConfig, cfg or {}, key="toyworld.model")
        c = self.cfg
        s = c.space_to_depth
        if c.resolution % s:
            raise ValueError(f"resolution {c.resolution} is not divisible by space_to_depth {s}")
        n_levels = len(c.block_out_channels)
        down = ["DownBlock2D"] * n_levels
        up = ["UpBlock2D"] * n_levels
        if c.attention:
            down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
        ch = 3 * s * s
        self.unet = UNet2DModel(
            sample_size=c.resolution // s,
            in_channels=ch + (6 * s * s if c.ray_conditioning else 0),
            out_channels=ch,
            block_out_channels=tuple(c.block_out_channels),
            layers_per_block=c.layers_per_block,
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            class_embed_type="identity",
            norm_num_groups=c.norm_num_groups,
            attention_head_dim=32,
        )
        # NHWC weights make oneDNN run the convolutions in its native layout: on this project's CPU a
        # training step is 1.2x (two threads) to 1.35x (one) faster; the guidance's small-batch
        # forward pass gains at most 5% (bench/prior_speed.py).
        # Only the layout changes: load_state_dict copies into these tensors and keeps it, and
        # save() writes contiguous copies, so files are the same either way.
        self.unet.to(memory_format=torch.channels_last)
        emb_dim = c.block_out_channels[0] * 4  # UNet2DModel's timestep embedding width
        self.token_embedding = nn.Embedding(c.vocab_size, emb_dim, padding_idx=0)
        self.null_text = nn.Parameter(torch.zeros(emb_dim))
        self.text_proj = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if c.camera_harmonics < 1:
            raise ValueError(f"toyworld.model.camera_harmonics must be >= 1, got {c.camera_harmonics}")
        cam_in = c.camera_dim + 2 * (c.camera_harmonics - 1)
        self.camera_mlp = nn.Sequential(nn.Linear(cam_in, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def camera_features(self, camera: Tensor) -> Tensor:
        """[B, 4] camera vector -> the MLP's input: the vector, then sin/cos(k az) for k = 2 .. harmonics."""
        K = self.cfg.camera_harmonics
        if K == 1:
            return camera
        az = torch.atan2(camera[:, 1], camera[:, 2])
        k = torch.arange(2, K + 1, device=camera.device, dtype=camera.dtype)
        return torch.cat([camera, torch.sin(az[:, None] * k), torch.cos(az[:, None] * k)], dim=-1)

    def text_embedding(self, tokens: Tensor, drop_text: Tensor | None = None) -> Tensor:
        """[B, L] token ids (0 = pad) -> [B, D]; rows with ``drop_text`` get the null embedding."""
        mask = (tokens > 0).float()[..., None]  # [B, L, 1]
        mean = (self.token_embedding(tokens) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        emb = self.text_proj(mean)
        if drop_text is not None:
            emb = torch.where(drop_text[:, None], self.text_proj(self.null_text)[None].expand_as(emb), emb)
        return emb

    def forward(self, x: Tensor, t: Tensor, tokens: Tensor, camera: Tensor, drop_text: Tensor | None = None) -> Tensor:
        cond = self.text_embedding(tokens, drop_text) + self.camera_mlp(self.camera_features(camera.to(x.dtype)))
        return self.denoise(x, t, cond, camera)

    def denoise(self, x: Tensor, t: Tensor, cond: Tensor, camera: Tensor, extra: Tensor | None = None) -> Tensor:
        """The UNet on ``x`` [B, 3, H, W] given the summed conditioning ``cond`` [B, D]; the camera gives
        the ray map (with ``ray_conditioning``); ``extra`` [B, C, H, W]: more input channels after them
        (the image-conditioned twin's input view)."""
        s = self.cfg.space_to_depth
        if self.cfg.ray_conditioning:
            from lift3d.priors.toyworld.data import ray_map

            rays = ray_map(camera, self.cfg.resolution, self.cfg.ray_fovy).to(x)
            x = torch.cat([x, rays], dim=1)
        if extra is not None:
            x = torch.cat([x, extra.to(x)], dim=1)
        h = F.pixel_unshuffle(x, s) if s > 1 else x
        out = self.unet(h, t, class_labels=cond).sample
        return F.pixel_shuffle(out, s) if s > 1 else out

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:
        """Write weights + config to a safetensors file (atomically)."""
        import os

        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"lift3d_toyworld_config": json.dumps(asdict(self.cfg)), **(extra_metadata or {})}
        tmp = path.with_name(f".{path.name}.tmp")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(tmp), metadata=meta)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls: type[_Prior], path: str | Path | None = None, map_location: str | torch.device = "cpu") -> _Prior:
        """Load a safetensors file written by :meth:`save` (default: :meth:`default_weights`, for this class
        the weights shipped in the package)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path) if path is not None else cls.default_weights()
        if not path.is_file():
            raise MissingWeightsError(cls.missing_weights_message(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "lift3d_toyworld_config" not in meta:
            raise ValueError(f"{path} is not a toy-world prior file: its metadata has no 'lift3d_toyworld_config'")
        model = cls.from_metadata(path, meta)
        model.load_state_dict(load_file(str(path), device=str(map_location)))
        model.metadata = meta  # type: ignore[attr-defined]
        return model

    # What a subclass with a file format of its own (the multi-view twin) changes in :meth:`load`.

    @classmethod
    def default_weights(cls) -> Path:
        """The file :meth:`load` reads when given no path."""
        return DEFAULT_WEIGHTS

    @classmethod
    def missing_weights_message(cls, path: Path) -> str:
        """What :meth:`load` tells the user when ``path`` does not exist."""
        return (f"toy-world prior weights not found at {path}. They ship with lift3d in "
                f"{DEFAULT_WEIGHTS}; to rebuild them run `python -m lift3d.priors.toyworld train threads=2 "
                "--install` (the packaged recipe; its wall time is in lift3d/priors/toyworld/README.md), "
                "or pass the path of a file you trained.")

    @classmethod
    def from_metadata(cls: type[_Prior], path: Path, meta: dict[str, str]) -> _Prior:
        """An untrained model of the architecture recorded in a file's metadata (``path``: for messages)."""
        return cls(json.loads(meta["lift3d_toyworld_config"]))


def make_scheduler(cfg: ToyPriorConfig, kind: Literal["ddpm", "ddim"] = "ddpm") -> Any:
    """The diffusers noise scheduler matching the model's training."""
    from diffusers import DDIMScheduler, DDPMScheduler

    kwargs: dict[str, Any] = dict(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=True,
        clip_sample_range=1.0,
    )
    return DDPMScheduler(**kwargs) if kind == "ddpm" else DDIMScheduler(**kwargs, set_alpha_to_one=True)


def predict_eps_x0(cfg: ToyPriorConfig, model_out: Tensor, x_t: Tensor, alphas_cumprod_t: Tensor) -> tuple[Tensor, Tensor]:
    """(epsilon, x0) from the network output at noisy ``x_t``; ``alphas_cumprod_t`` [B]."""
    a = alphas_cumprod_t.to(x_t.dtype).view(-1, 1, 1, 1)
    sa, so = a.sqrt(), (1 - a).sqrt()
    if cfg.prediction_type == "epsilon":
        eps = model_out
        x0 = (x_t - so * eps) / sa
    else:  # v = sa * eps - so * x0
        x0 = sa * x_t - so * model_out
        eps = so * x_t + sa * model_out
    return eps, x0


@torch.no_grad()
def sample(
    model: ToyWorldPrior,
    tokens: Tensor,
    camera: Tensor,
    steps: int = 50,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    **model_kwargs: Any,
) -> Tensor:
    """DDIM sampling with classifier-free guidance. Returns images [B, 3, H, W] in [0, 1].

    ``model_kwargs`` go to every call of the model (the multi-view twin's ``n_views``); each call
    holds the conditional half of the batch, then the unconditional half, both in ``tokens``' order.
    """
    cfg = model.cfg
    sched = make_scheduler(cfg, "ddim")
    sched.set_timesteps(steps)
    B = tokens.shape[0]
    dev = next(model.parameters()).device
    x = torch.randn(B, 3, cfg.resolution, cfg.resolution, generator=generator).to(dev)
    tokens, camera = tokens.to(dev), camera.to(dev)
    drop = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)]).to(dev)
    for t in sched.timesteps:
        tt = torch.full((2 * B,), int(t), device=dev, dtype=torch.long)
        out = model(torch.cat([x, x]), tt, torch.cat([tokens, tokens]), torch.cat([camera, camera]), drop,
                    **model_kwargs)
        cond, uncond = out.chunk(2)
        guided = uncond + guidance_scale * (cond - uncond)
        # The step clips the predicted clean image to [-1, 1]; the noise it re-adds must be the one
        # implied by that clipped image, or a guided prediction that overshoots the range leaves its
        # excess in the noise and the trajectory drifts off the data (guidance 3 gave mask IoU 0.25).
        x = sched.step(guided, t, x, eta=eta, generator=generator, use_clipped_model_output=True).prev_sample
    return ((x + 1) / 2).clamp(0, 1)
