"""tiny-cuda-nn backend: fused hash-grid encodings and MLPs on CUDA, used only when importable.

tiny-cuda-nn (Mueller, 2021; the kernels behind InstantNGP) needs a CUDA device; everything here is
guarded so importing this module never fails. The torch implementations in
``lift3d.geometry.encodings`` and ``lift3d.geometry.networks`` are the reference; these wrappers
expose the same small interface (``n_output_dims``, ``update_step``) and return float32.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

try:  # pragma: no cover - depends on the machine
    import tinycudann as _tcnn  # type: ignore

    _IMPORT_ERROR: Exception | None = None
except Exception as exc:  # ImportError, or a CUDA/driver error raised at import
    _tcnn = None
    _IMPORT_ERROR = exc


def available() -> bool:
    """True when tiny-cuda-nn imports and a CUDA device is present."""
    return _tcnn is not None and torch.cuda.is_available()


def _require() -> Any:
    if not available():
        why = f"tinycudann failed to import ({_IMPORT_ERROR})" if _tcnn is None else "no CUDA device is available"
        raise RuntimeError(
            f"backend 'tcnn' was asked for but {why}; use backend: torch (or auto)"
        )
    return _tcnn


class TcnnEncoding(nn.Module):
    """A tiny-cuda-nn encoding with float32 output and the progressive-band level mask."""

    def __init__(self, n_input_dims: int, config: dict) -> None:
        super().__init__()
        tcnn = _require()
        config = dict(config)
        progressive = config.get("otype") == "ProgressiveBandHashGrid"
        self.start_level = int(config.pop("start_level", 1 if progressive else config.get("n_levels", 16)))
        self.start_step = int(config.pop("start_step", 0))
        self.update_steps = max(1, int(config.pop("update_steps", 1)))
        config.pop("chunk_size", None)
        config["otype"] = "HashGrid" if progressive else config.get("otype", "HashGrid")
        self.n_levels = int(config.get("n_levels", 16))
        self.n_features_per_level = int(config.get("n_features_per_level", 2))
        with torch.cuda.device(torch.cuda.current_device()):
            self.encoding = tcnn.Encoding(n_input_dims, config, dtype=torch.float32)
        self.n_output_dims = self.encoding.n_output_dims
        self.register_buffer("level_mask", torch.ones(self.n_levels), persistent=False)
        self.current_level = self.n_levels
        self.update_step(0, 0)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape[:-1]
        out = self.encoding(x.reshape(-1, x.shape[-1])).float()
        if self.current_level < self.n_levels:
            out = out * self.level_mask.repeat_interleave(self.n_features_per_level)
        return out.view(*shape, -1)

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        level = self.start_level + max(global_step - self.start_step, 0) // self.update_steps
        self.current_level = min(self.n_levels, level)
        self.level_mask.zero_()
        self.level_mask[: self.current_level] = 1.0


class TcnnNetwork(nn.Module):
    """A tiny-cuda-nn fully fused MLP (no biases), float32 output."""

    def __init__(self, dim_in: int, dim_out: int, config: dict) -> None:
        super().__init__()
        tcnn = _require()
        cfg = {
            "otype": "FullyFusedMLP" if config.get("n_neurons", 64) in (16, 32, 64, 128) else "CutlassMLP",
            "activation": config.get("activation", "ReLU"),
            "output_activation": config.get("output_activation", "None"),
            "n_neurons": config.get("n_neurons", 64),
            "n_hidden_layers": config.get("n_hidden_layers", 1),
        }
        with torch.cuda.device(torch.cuda.current_device()):
            self.network = tcnn.Network(dim_in, dim_out, cfg)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape[:-1]
        return self.network(x.reshape(-1, x.shape[-1])).float().view(*shape, -1)


def make_encoding(n_input_dims: int, config: dict) -> nn.Module:
    """A tiny-cuda-nn hash-grid encoding from a threestudio-style dict (raises without CUDA/tcnn)."""
    return TcnnEncoding(n_input_dims, config)


def make_network(dim_in: int, dim_out: int, config: dict) -> nn.Module:
    """A tiny-cuda-nn MLP from a threestudio-style dict (raises without CUDA/tcnn)."""
    return TcnnNetwork(dim_in, dim_out, config)


__all__ = ["available", "make_encoding", "make_network", "TcnnEncoding", "TcnnNetwork"]
