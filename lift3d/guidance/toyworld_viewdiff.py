"""Score distillation from the toy ViewDiff: the toy world's ViewDiff guidance.

ViewDiff (Höllein et al., CVPR 2024) denoises a group of views together through cross-frame
attention with a pose-conditioned LoRA and a 3D projection layer
(:mod:`lift3d.priors.toyworld.viewdiff`). ``toyworld-viewdiff-guidance`` scores rendered groups
with it by the core's SDS (:mod:`lift3d.guidance.score_distillation`), exactly as
``toyworld-mv-guidance`` (:mod:`lift3d.guidance.toyworld_mv`) does with the toy MVDream, whose
adapter and checks it inherits:

* the batch is whole groups of ``n_views`` consecutive views (``data.n_views``), each group one
  timestep (``timestep_sharing: group`` or ``batch``; per view is refused);
* every view keeps its camera: the network turns the toy camera vector into the pose, intrinsics
  and relative view condition its LoRA and projection layer read, so the adapter passes what it
  passes to the toy MVDream. The intensity ViewDiff conditions on is held at a neutral 0.5 by the
  network (the toy prior is not told the light), so no brightness is measured from the renders.

Its weights are a toy ViewDiff file (``pretrained``; default
``lift3d/priors/toyworld/weights/toyworld-viewdiff.safetensors``), made by fine-tuning the shipped
single-view prior: ``python -m lift3d.priors.toyworld train-viewdiff threads=2 --install``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from lift3d.guidance.toyworld import autocast_dtype, warn_if_bf16_emulated
from lift3d.guidance.toyworld_mv import ToyWorldMVGuidance, ToyWorldMVPrior
from lift3d.registry import register


class ToyWorldViewDiffPrior(ToyWorldMVPrior):
    """The toy MVDream's adapter around a :class:`lift3d.priors.toyworld.viewdiff.ViewDiffToyPrior`."""

    @classmethod
    def load(cls, path: str | None, name: str = "toyworld-viewdiff",  # type: ignore[override]
             autocast: Optional[str] = None, n_views: Optional[int] = None) -> "ToyWorldViewDiffPrior":
        """From a toy ViewDiff file (None: the package's ``weights/toyworld-viewdiff.safetensors``)."""
        from lift3d.priors.toyworld.viewdiff import ViewDiffToyPrior

        autocast_dtype(autocast, f"{name}.autocast")
        return cls(ViewDiffToyPrior.load(path), name, autocast, n_views)

    def lora_copy(self, rank: int, alpha: float, targets: list[str]) -> "ToyWorldViewDiffPrior":
        raise NotImplementedError("toyworld-viewdiff-guidance does not support VSD")


@register("toyworld-viewdiff-guidance")
class ToyWorldViewDiffGuidance(ToyWorldMVGuidance):
    """SDS with the toy ViewDiff on groups of views; returns ``loss_sds``."""

    prior_family = "toyworld-viewdiff"

    @dataclass
    class Config(ToyWorldMVGuidance.Config):
        pretrained: Optional[str] = None
        """Path of a toy ViewDiff safetensors file; null: ``weights/toyworld-viewdiff.safetensors`` in the
        package (made by ``python -m lift3d.priors.toyworld train-viewdiff --install``)."""

    @classmethod
    def weights_path(cls, cfg: Any) -> Path:
        from lift3d.priors.toyworld.viewdiff import DEFAULT_VIEWDIFF_WEIGHTS

        return Path(cfg.pretrained) if cfg.pretrained else DEFAULT_VIEWDIFF_WEIGHTS

    @classmethod
    def missing_weights(cls, cfg: Any) -> str | None:
        from lift3d.priors.toyworld.viewdiff import VIEWDIFF_TRAIN_COMMAND

        path = cls.weights_path(cfg)
        if path.is_file():
            return None
        return (f"no toy ViewDiff weights at {path}. They are made by fine-tuning the shipped single-view prior "
                f"with ViewDiff's layers added, on groups of views: `{VIEWDIFF_TRAIN_COMMAND}` writes them to "
                "lift3d/priors/toyworld/weights/toyworld-viewdiff.safetensors; or set the guidance's pretrained "
                "to a file you trained")

    def build_prior(self) -> ToyWorldViewDiffPrior:
        msg = self.missing_weights(self.cfg)
        if msg is not None:
            from lift3d.priors.toyworld.model import MissingWeightsError

            raise MissingWeightsError(msg)
        prior = ToyWorldViewDiffPrior.load(str(self.weights_path(self.cfg)), self.name(), self.cfg.autocast,
                                           self.cfg.n_views)
        warn_if_bf16_emulated(prior, self.name())
        return prior


__all__ = ["ToyWorldViewDiffPrior", "ToyWorldViewDiffGuidance"]
