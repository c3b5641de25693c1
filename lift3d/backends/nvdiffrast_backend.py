"""Optional nvdiffrast backend for ``lift3d.utils.rasterize_ops`` (CUDA only).

nvdiffrast (Laine et al., "Modular Primitives for High-Performance Differentiable Rendering",
2020) is imported lazily and only used when it imports and the tensors live on CUDA; the torch
path in ``rasterize_ops`` is the reference it must match. Functions here take and return the same
shapes as ``rasterize_ops`` (single tensors, not nvdiffrast's (out, derivatives) pairs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

try:  # pragma: no cover - depends on the machine
    import nvdiffrast.torch as _dr

    _IMPORT_ERROR: Exception | None = None
except Exception as exc:  # ImportError, or a CUDA extension that fails to build/load
    _dr = None
    _IMPORT_ERROR = exc


def available() -> bool:
    """True when nvdiffrast imports and CUDA is present."""
    return _dr is not None and torch.cuda.is_available()


def _require() -> Any:
    if _dr is None:
        raise RuntimeError(f"nvdiffrast is not importable: {_IMPORT_ERROR}")
    return _dr


class RasterizeContext:
    """One nvdiffrast CUDA rasterizer context per device, created on first use and kept.

    Creating a context is expensive (it sets up CUDA state), so every call shares these.
    """

    _contexts: dict[str, Any] = {}

    @classmethod
    def get(cls, device: torch.device) -> Any:
        key = str(device)
        ctx = cls._contexts.get(key)
        if ctx is None:
            ctx = _require().RasterizeCudaContext(device=device)
            cls._contexts[key] = ctx
        return ctx


def rasterize(pos: Tensor, tri: Tensor, resolution: tuple[int, int]) -> Tensor:
    """[B, V, 4] clip positions, [F, 3] indices -> rast [B, H, W, 4]."""
    dr = _require()
    rast, _ = dr.rasterize(RasterizeContext.get(pos.device), pos.float().contiguous(), tri.int().contiguous(),
                           resolution=list(resolution))
    return rast


def interpolate(attr: Tensor, rast: Tensor, tri: Tensor) -> Tensor:
    """[B|1, V, C] or [V, C] attributes -> [B, H, W, C]."""
    dr = _require()
    if attr.ndim == 3 and attr.shape[0] == 1:
        attr = attr[0]
    out, _ = dr.interpolate(attr.float().contiguous(), rast, tri.int().contiguous())
    return out


def antialias(color: Tensor, rast: Tensor, pos: Tensor, tri: Tensor) -> Tensor:
    dr = _require()
    return dr.antialias(color.float().contiguous(), rast, pos.float().contiguous(), tri.int().contiguous())


def texture(tex: Tensor, uv: Tensor, filter_mode: str, boundary_mode: str) -> Tensor:
    dr = _require()
    return dr.texture(tex.float().contiguous(), uv.float().contiguous(), filter_mode=filter_mode,
                      boundary_mode=boundary_mode)


__all__ = ["available", "RasterizeContext", "rasterize", "interpolate", "antialias", "texture"]
