"""The ViewDiff network: a Stable Diffusion UNet with cross-frame attention and projection layers.

:class:`ViewDiffUNet` takes a diffusers ``UNet2DConditionModel`` of the Stable Diffusion family
(frozen) and adds ViewDiff's two parts (Höllein et al., CVPR 2024):

* every self-attention layer (``attn1``) gets a :class:`~lift3d.priors.viewdiff.attention.CrossFrameAttnProcessor`
  (the views of a group attend to each other; a LoRA conditioned per view on pose, intrinsics and
  intensity), the text cross-attention stays per view;
* after chosen blocks (``projection_after``: the middle block and up blocks, never the first
  down block or the last up block, whose features are closest to the pixels) a
  :class:`~lift3d.priors.viewdiff.projection.ProjectionLayer` adds a feature volume rendered back into
  each view, through a forward hook on the block.

Both start as the identity (zero LoRA ``up``, zero output convolution), so an untrained
ViewDiffUNet predicts what the base UNet predicts for each view alone. Only these added tensors
are trained and saved: :meth:`ViewDiffUNet.save_added` writes them to one safetensors file with
the :class:`ViewDiffConfig` (and a description of the base UNet, checked on load) in its metadata;
the base UNet always comes from its own diffusers folder or the Hugging Face cache, read with
``local_files_only=True`` (:func:`load_base`).

Call: ``model(latents [(b f), 4, h, w], t [(b f)] or scalar, text [(b f), L, D], c2w [(b f), 4, 4],
intrinsics [(b f), 3, 3], intensity [(b f)], n_views=f)`` -> the UNet's prediction ``[(b f), 4, h, w]``
in its scheduler's parameterisation. Cameras and intrinsics follow :mod:`lift3d.priors.viewdiff.cameras`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn
from torch import Tensor

from lift3d.config import ConfigError, parse_structured
from lift3d.priors.viewdiff.attention import install_cross_frame_attention
from lift3d.priors.viewdiff.cameras import view_condition
from lift3d.priors.viewdiff.projection import ProjectionLayer

#: The Stable Diffusion ViewDiff builds on unless told otherwise (the paper used SD 2.1-base).
DEFAULT_BASE_MODEL = "stabilityai/stable-diffusion-2-1-base"

#: Written into the metadata of every weights file; a file without it is not ViewDiff's.
WEIGHTS_FORMAT = "lift3d-viewdiff/1"

#: Where ``train`` writes the finished weights inside its out_dir.
WEIGHTS_NAME = "viewdiff.safetensors"

#: How to make ViewDiff weights (no checkpoint is published): for messages.
TRAIN_COMMAND = "python -m lift3d.priors.viewdiff train root=<dataset folder> base_model=<SD folder or id> out_dir=<folder>"

#: What a diffusers Stable Diffusion folder must hold for ViewDiff.
BASE_FILES = ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json")


@dataclass
class ViewDiffConfig:
    """The shape of the parts ViewDiff adds to the UNet (saved with the weights)."""

    lora_rank: int = 4
    """Rank of the conditioned LoRA on each self-attention projection (q, k, v, out)."""
    lora_scale: float = 1.0
    """Scale of the LoRA update."""
    cond_hidden: int = 64
    """Width of the hidden layer of each attention layer's FiLM MLP (condition -> LoRA modulation)."""
    projection_after: Optional[list[str]] = None
    """UNet blocks followed by a projection layer: ``mid_block`` and ``up_blocks.<k>`` for every up
    block but the last. null: all of them."""
    proj_channels: int = 16
    """Channels of the feature volume (the 1x1 reduction's output)."""
    grid_size: int = 16
    """Voxels per side of the volume."""
    bound: float = 1.0
    """The volume covers the box [-bound, bound]^3 around the origin (world units; the object must fit)."""
    n_samples: int = 32
    """Points per ray when the volume is rendered back into a view."""
    proj_hidden: int = 32
    """Width of the 3D CNN and of the view-scoring MLP."""


def projection_sites(unet: nn.Module) -> dict[str, int]:
    """The blocks a projection layer may follow, with their output channels."""
    out = list(unet.config.block_out_channels)
    sites: dict[str, int] = {}
    if getattr(unet, "mid_block", None) is not None:
        sites["mid_block"] = int(out[-1])
    rev = list(reversed(out))
    for k in range(len(unet.up_blocks) - 1):
        sites[f"up_blocks.{k}"] = int(rev[k])
    return sites


def unet_signature(unet: nn.Module) -> dict[str, Any]:
    """What the added tensors' shapes depend on in the base UNet (checked when weights are loaded)."""
    c = unet.config
    return {"in_channels": int(c.in_channels), "block_out_channels": [int(v) for v in c.block_out_channels],
            "cross_attention_dim": int(c.cross_attention_dim), "layers_per_block": int(c.layers_per_block)}


class _Views:
    """The cameras of the current call, read by the projection hooks (set only during forward)."""

    def __init__(self) -> None:
        self.c2w: Optional[Tensor] = None
        self.intrinsics: Optional[Tensor] = None
        self.n_views = 1


class _ProjectionHook:
    """A forward hook that passes a block's output through its projection layer. An object, not a
    closure, so a deep copy of the model gets hooks that point at the copy's layers."""

    def __init__(self, layer: ProjectionLayer, views: _Views, name: str):
        self.layer, self.views, self.name = layer, views, name

    def __call__(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        v = self.views
        if v.c2w is None:
            raise RuntimeError(f"the ViewDiff projection layer after {self.name} needs the cameras: call the "
                               "ViewDiffUNet, not its base UNet")
        if not torch.is_tensor(output):
            raise TypeError(f"a projection layer follows blocks that return a tensor; {self.name} returned {type(output)}")
        return self.layer(output, v.c2w, v.intrinsics, v.n_views)


class ViewDiffUNet(nn.Module):
    """A frozen SD UNet (``self.unet``) with ViewDiff's cross-frame attention and projection layers
    (see the module docstring for the call)."""

    def __init__(self, unet: nn.Module, config: ViewDiffConfig | dict | None = None):
        super().__init__()
        cfg = parse_structured(ViewDiffConfig, config if config is not None else {}, key="viewdiff.model")
        sites = projection_sites(unet)
        chosen = list(sites) if cfg.projection_after is None else list(cfg.projection_after)
        bad = [n for n in chosen if n not in sites]
        if bad:
            raise ConfigError(f"viewdiff.model.projection_after: {', '.join(map(repr, bad))} cannot take a projection "
                              f"layer; valid for this UNet: {', '.join(sites)} (never the first or last block)")
        if len(set(chosen)) != len(chosen):
            raise ConfigError(f"viewdiff.model.projection_after names a block twice: {chosen}")
        self.config = ViewDiffConfig(**{**asdict(cfg), "projection_after": chosen})
        self.unet = unet
        unet.requires_grad_(False)
        install_cross_frame_attention(unet, rank=cfg.lora_rank, scale=cfg.lora_scale, cond_hidden=cfg.cond_hidden)
        ref = unet.conv_in.weight
        self.projections = nn.ModuleDict({
            name.replace(".", "_"): ProjectionLayer(sites[name], cfg.proj_channels, cfg.grid_size, cfg.bound,
                                                    cfg.n_samples, cfg.proj_hidden).to(ref.device, ref.dtype)
            for name in chosen})
        self._views = _Views()
        for name in chosen:
            unet.get_submodule(name).register_forward_hook(
                _ProjectionHook(self.projections[name.replace(".", "_")], self._views, name))

    # -- the call ---------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    def forward(self, latents: Tensor, timesteps: Tensor | float, text: Tensor, c2w: Tensor, intrinsics: Tensor,
                intensity: Tensor, n_views: int) -> Tensor:
        N = latents.shape[0]
        if n_views < 1 or N % n_views:
            raise ValueError(f"ViewDiffUNet: a batch of {N} views cannot be split into groups of n_views={n_views}")
        for what, t, shape in (("c2w", c2w, (N, 4, 4)), ("intrinsics", intrinsics, (N, 3, 3)), ("intensity", intensity, (N,))):
            if tuple(t.shape) != shape:
                raise ValueError(f"ViewDiffUNet: {what} must be {list(shape)} (one per view), got {list(t.shape)}")
        dt = self.dtype
        cond = view_condition(c2w.float(), intrinsics.float(), intensity.float(), n_views).to(dt)
        v = self._views
        v.c2w, v.intrinsics, v.n_views = c2w.to(dt), intrinsics.to(dt), int(n_views)
        try:
            out = self.unet(latents.to(dt), timesteps, encoder_hidden_states=text.to(dt),
                            cross_attention_kwargs={"n_views": int(n_views), "view_cond": cond}).sample
        finally:
            v.c2w = v.intrinsics = None
        return out

    # -- the added tensors ------------------------------------------------------------------------

    @staticmethod
    def is_added(name: str) -> bool:
        """Whether parameter ``name`` belongs to what ViewDiff adds (not to the base UNet)."""
        return name.startswith("projections.") or (name.startswith("unet.") and ".processor." in name)

    def added_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, tensor) of every added parameter: the LoRA, its FiLM MLPs and the projection layers."""
        return ((n, p) for n, p in self.named_parameters() if self.is_added(n))

    def metadata(self) -> dict[str, str]:
        return {"format": WEIGHTS_FORMAT, "config": json.dumps(asdict(self.config)),
                "unet": json.dumps(unet_signature(self.unet))}

    def save_added(self, path: str | Path, extra: Optional[dict[str, Tensor]] = None,
                   metadata: Optional[dict[str, str]] = None) -> Path:
        """Write the added tensors (float32) and the config to a safetensors file, atomically;
        ``extra`` tensors and ``metadata`` entries ride along (the trainer's optimizer state)."""
        from safetensors.torch import save_file

        from lift3d.utils.io import atomic_path

        state = {n: p.detach().float().cpu().contiguous() for n, p in self.added_parameters()}
        state.update({k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()})
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata={**self.metadata(), **(metadata or {})})
        return path

    def load_added(self, path: str | Path) -> dict[str, Tensor]:
        """Fill the added tensors from a file of :meth:`save_added`; every added tensor must be in it and
        every ``unet.``/``projections.`` tensor of it must have a place. Returns the file's other tensors."""
        from safetensors.torch import load_file

        path = Path(path)
        meta = read_metadata(path)
        if json.loads(meta["unet"]) != unet_signature(self.unet):
            raise ValueError(f"{path}: these ViewDiff weights were trained on a base UNet shaped "
                             f"{meta['unet']}, but the base model given is {json.dumps(unet_signature(self.unet))}; "
                             "use the base model they were trained on")
        state = load_file(str(path))
        own = dict(self.added_parameters())
        mine = {k for k in state if self.is_added(k)}
        missing, unknown = sorted(set(own) - mine), sorted(mine - set(own))
        if missing or unknown:
            raise ValueError(f"{path}: the file does not match this ViewDiff network: missing {missing[:4]} "
                             f"({len(missing)}), unplaced {unknown[:4]} ({len(unknown)})")
        with torch.no_grad():
            for k, p in own.items():
                if state[k].shape != p.shape:
                    raise ValueError(f"{path}: tensor {k} is {list(state[k].shape)}, the network's {list(p.shape)}")
                p.copy_(state[k].to(p.dtype))
        return {k: v for k, v in state.items() if k not in mine}

    @classmethod
    def from_weights(cls, unet: nn.Module, path: str | Path) -> "ViewDiffUNet":
        """The network of weights file ``path`` (its config from the metadata) on ``unet``, filled."""
        model = cls(unet, json.loads(read_metadata(Path(path))["config"]))
        model.load_added(path)
        return model


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata of a ViewDiff weights file (no tensor is read), or a ValueError saying what it is not."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{path} is not a safetensors file ({exc})") from exc
    if meta.get("format") != WEIGHTS_FORMAT or "config" not in meta or "unet" not in meta:
        raise ValueError(f"{path} holds no ViewDiff weights (its metadata lacks format={WEIGHTS_FORMAT!r}); "
                         f"make them with `{TRAIN_COMMAND}`")
    return meta


# -- the base model and the weights on disk -----------------------------------------------------


def resolve_base(name_or_path: str, key: str, revision: Optional[str] = None) -> Path:
    """The diffusers folder of the base Stable Diffusion (a local folder or the Hugging Face cache),
    or :class:`~lift3d.utils.hub.MissingWeightsError` naming ``key`` and how to get the weights."""
    from lift3d.utils.hub import resolve_weights

    return resolve_weights(name_or_path, key=key, required=BASE_FILES, revision=revision).path


def resolve_viewdiff_weights(path: str, key: str) -> Path:
    """The ViewDiff weights file ``path``, or :class:`~lift3d.utils.hub.MissingWeightsError` naming ``key``
    and the command that trains them (no ViewDiff checkpoint is published)."""
    from lift3d.utils.hub import MissingWeightsError

    how = (f"No ViewDiff checkpoint is published: train one with `{TRAIN_COMMAND}` (it writes "
           f"<out_dir>/{WEIGHTS_NAME}) and set {key}= to that file")
    if not path:
        raise MissingWeightsError(f"config key '{key}' is empty. {how}")
    p = Path(path).expanduser()
    if p.is_dir() and (p / WEIGHTS_NAME).is_file():
        p = p / WEIGHTS_NAME
    if not p.is_file():
        raise MissingWeightsError(f"config key '{key}' = {path!r}: no such ViewDiff weights file ({p.resolve()}). {how}")
    try:
        read_metadata(p)
    except ValueError as exc:
        raise MissingWeightsError(f"config key '{key}' = {path!r}: {exc}") from None
    return p


def load_base(folder: Path, parts: tuple[str, ...], key: str, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Load the named parts (``unet``, ``vae``, ``scheduler``, ``text_encoder``, ``tokenizer``) of the
    diffusers folder ``folder`` with ``local_files_only=True``; a part that does not load becomes a
    :class:`~lift3d.utils.hub.MissingWeightsError` naming ``key``."""
    from lift3d.utils.hub import MissingWeightsError

    unknown = [p for p in parts if p not in ("unet", "vae", "scheduler", "text_encoder", "tokenizer")]
    if unknown:
        raise ValueError(f"unknown Stable Diffusion part(s) {unknown}")
    out: dict[str, Any] = {}
    part = ""
    try:
        for part in parts:
            if part == "unet":
                from diffusers import UNet2DConditionModel

                out[part] = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype,
                                                                 local_files_only=True)
            elif part == "vae":
                from diffusers import AutoencoderKL

                out[part] = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, local_files_only=True)
            elif part == "scheduler":
                from diffusers import DDPMScheduler

                out[part] = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
            elif part == "text_encoder":
                from transformers import CLIPTextModel

                out[part] = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
            else:
                from transformers import CLIPTokenizer

                out[part] = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
    except (OSError, ValueError) as exc:
        raise MissingWeightsError(f"config key '{key}': the {part} of {folder} does not load as a diffusers Stable "
                                  f"Diffusion part (interrupted download?): {exc}") from exc
    for m in out.values():
        if isinstance(m, nn.Module):
            m.requires_grad_(False).eval()
    return out


def encode_texts(tokenizer: Any, text_encoder: nn.Module, texts: list[str]) -> Tensor:
    """CLIP hidden states ``[N, 77, D]`` (float32, on the CPU) of ``texts``, encoded as the
    ``stable-diffusion-prompt-processor`` does: padded to the maximum length, the last hidden state."""
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    device = next(text_encoder.parameters()).device
    with torch.no_grad():  # in chunks: a dataset may caption every object
        return torch.cat([text_encoder(chunk.to(device)).last_hidden_state.float().cpu() for chunk in ids.split(16)])


__all__ = ["ViewDiffConfig", "ViewDiffUNet", "DEFAULT_BASE_MODEL", "WEIGHTS_FORMAT", "WEIGHTS_NAME", "TRAIN_COMMAND",
           "projection_sites", "read_metadata", "resolve_base", "resolve_viewdiff_weights", "load_base", "encode_texts"]
