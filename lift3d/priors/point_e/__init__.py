"""Point-E (Nichol et al. 2022, "Point-E: A System for Generating 3D Point Clouds from Complex Prompts").

lift3d's own implementation of Point-E's networks, loading the published weights:

* :mod:`~lift3d.priors.point_e.network`: the base transformer (``base40M-textvec``) and the upsampler;
* :mod:`~lift3d.priors.point_e.diffusion`: schedules, channel scaling, learned-range variance, samplers;
* :mod:`~lift3d.priors.point_e.checkpoint`: the explicit key map from the original ``.pt`` files;
* :mod:`~lift3d.priors.point_e.text`: CLIP ViT-L/14 text features as Point-E reads them (transformers);
* :mod:`~lift3d.priors.point_e.prior`: :class:`PointEPrior`, what a guidance holds, and the frame conversion.

``python -m lift3d.priors.point_e sample --prompt ... --out cloud.ply`` samples a point cloud.
The names below are imported lazily so reading the package does not import transformers.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "PointTransformerConfig": "network", "PointDiffusionTransformer": "network",
    "PointUpsamplerConfig": "network", "PointUpsampleTransformer": "network",
    "PointDiffusionSchedule": "diffusion", "KarrasSettings": "diffusion",
    "PointEPrior": "prior", "point_e_to_world": "prior", "world_to_point_e": "prior",
    "PointETextEncoder": "text", "PointECheckpointError": "checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
