"""Regularizers: loss terms the system computes from a render, registered like every other module.

A regularizer registered as ``<x>-regularizer`` produces the term ``loss_<x>`` (dashes become
underscores), weighted by ``system.loss.lambda_<x>``; it runs only while that weight is non-zero and
no guidance already returns the term. A plugin adds one with ``@register("my-term-regularizer")``
and a recipe weights it with ``lambda_my_term``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lift3d.config import ConfigError
from lift3d.registry import register
from lift3d.utils.base import BaseObject

SUFFIX = "-regularizer"


def registry_name(term: str) -> str:
    """``normal_consistency`` -> ``normal-consistency-regularizer``."""
    return term.replace("_", "-") + SUFFIX


class BaseRegularizer(BaseObject):
    """``regularizer(system, out, batch) -> scalar Tensor``: ``out`` is the render of the random views."""

    category = "regularizer"

    def __call__(self, system: Any, out: dict[str, Any], batch: dict[str, Any]) -> Tensor:
        raise NotImplementedError


@register("sparsity-regularizer")
class Sparsity(BaseRegularizer):
    """A soft L1 on opacity keeps empty space empty (Magic3D / threestudio style)."""

    def __call__(self, system: Any, out: dict, batch: dict) -> Tensor:
        return torch.sqrt(out["opacity"] ** 2 + 0.01).mean()


@register("opaque-regularizer")
class Opaque(BaseRegularizer):
    """Binary entropy of the opacity, its maximum moved from 0.5 to ``system.opaque_split`` by o -> o^k."""

    def __call__(self, system: Any, out: dict, batch: dict) -> Tensor:
        split = float(system.cfg.opaque_split)
        if not 0.0 < split < 1.0:
            raise ConfigError(f"system.opaque_split must be strictly between 0 and 1, got {split}")
        o = out["opacity"].clamp(1e-4, 1 - 1e-4)
        if split != 0.5:
            o = (o ** (math.log(0.5) / math.log(split))).clamp(1e-4, 1 - 1e-4)
        return -(o * torch.log(o) + (1 - o) * torch.log(1 - o)).mean()


@register("orient-regularizer")
class Orient(BaseRegularizer):
    """DreamFusion's orientation loss: normals facing away from the camera are penalised by weight."""

    def __call__(self, system: Any, out: dict, batch: dict) -> Tensor:
        if "weights" not in out or "normal" not in out or "t_dirs" not in out:
            raise ConfigError(
                f"loss.lambda_orient needs per-sample 'weights', 'normal' and 't_dirs' from the renderer; "
                f"'{getattr(type(system.renderer), 'registry_name', '?')}' does not return them (set lambda_orient to 0)"
            )
        w, n, d = out["weights"].detach(), out["normal"], out["t_dirs"]
        return (w * torch.relu((n * d).sum(-1, keepdim=True)) ** 2).sum() / max(out["opacity"].numel(), 1)


@register("eikonal-regularizer")
class Eikonal(BaseRegularizer):
    """SDF gradients have unit norm (Gropp et al. 2020); NeuS renders return them per sample."""

    def __call__(self, system: Any, out: dict, batch: dict) -> Tensor:
        if "sdf_grad" not in out:
            raise ConfigError(
                "loss.lambda_eikonal needs per-sample 'sdf_grad' from an SDF renderer (neus-volume-renderer with an "
                "implicit-sdf geometry whose normal_type is not 'pred'); set it to 0 otherwise"
            )
        return ((out["sdf_grad"].norm(dim=-1) - 1.0) ** 2).mean()


def _mesh_of(out: dict, what: str) -> Any:
    mesh = out.get("mesh")
    if mesh is None:
        raise ConfigError(f"loss.lambda_{what} needs a mesh render (out['mesh']); set it to 0 for this stage")
    return mesh


@register("normal-consistency-regularizer")
class NormalConsistency(BaseRegularizer):
    """Neighbouring faces of the rendered mesh should face alike (Magic3D's refinement stage)."""

    def __call__(self, system: Any, out: dict, batch: dict) -> Tensor:
        from lift3d.utils.mesh_losses import normal_consistency

        return normal_consistency(_mesh_of(out, "normal_consistency"))


@register("laplacian-smoothness-regularizer")
class LaplacianSmoothness(BaseRegularizer):
    """Each vertex of the rendered mesh should sit near the mean of its neighbours."""

    def __call__(self, system: Any, out: dict, batch: dict) -> Tensor:
        from lift3d.utils.mesh_losses import laplacian_smoothness

        return laplacian_smoothness(_mesh_of(out, "laplacian_smoothness"))


__all__ = ["BaseRegularizer", "registry_name"]
