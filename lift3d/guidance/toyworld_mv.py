"""Score distillation from the multi-view toy prior: the toy world's MVDream guidance.

MVDream (Shi et al. 2023) scores a set of rendered views of the object together: the views of a
group are noised to one timestep and denoised jointly, the network's self-attention running over
all of them (:mod:`lift3d.priors.toyworld.multiview`), so the prior sees whether the views fit one
object. ``toyworld-mv-guidance`` is the core's SDS (:mod:`lift3d.guidance.score_distillation`)
with an adapter for that network:

* the batch is whole groups of ``n_views`` consecutive views, as ``random-camera-datamodule``
  yields them with ``data.n_views`` (each group shares elevation, distance and fov, azimuths
  360 / n_views apart); anything else stops with an error naming ``data.n_views`` and
  ``data.batch_size``;
* one timestep per group (``timestep_sharing: group``, or ``batch``; per view is refused: the
  network was trained with one noise level per group);
* each view keeps its own camera conditioning and the group shares the prompt; classifier-free
  guidance drops the text of whole groups (the unconditional branch is a whole batch).

Its weights are a multi-view toy-world file (``pretrained``; default
``lift3d/priors/toyworld/weights/toyworld-mv.safetensors``), made by fine-tuning the shipped
single-view prior: ``python -m lift3d.priors.toyworld train-mv threads=2 --install``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch.nn as nn
from torch import Tensor

from lift3d.config import ConfigError
from lift3d.guidance.base import GuidanceInput, GuidanceOutput
from lift3d.guidance.score_distillation import SDSGuidance
from lift3d.guidance.toyworld import ToyWorldPrior, autocast_dtype, warn_if_bf16_emulated
from lift3d.registry import register


class ToyWorldMVPrior(ToyWorldPrior):
    """Adapter around a :class:`lift3d.priors.toyworld.multiview.MultiViewToyPrior`: the toy adapter
    (pixels in [-1, 1], token ids, camera vectors) whose network call denoises groups of ``n_views``."""

    def __init__(self, model: nn.Module, name: str = "toyworld-mv", autocast: Optional[str] = None,
                 n_views: Optional[int] = None):
        super().__init__(model, name, autocast)
        self.n_views = int(n_views if n_views is not None else model.mv_cfg.n_views)

    @classmethod
    def load(cls, path: str | None, name: str = "toyworld-mv", autocast: Optional[str] = None,  # type: ignore[override]
             n_views: Optional[int] = None) -> "ToyWorldMVPrior":
        """From a multi-view toy-world file (None: the package's ``weights/toyworld-mv.safetensors``)."""
        from lift3d.priors.toyworld.multiview import MultiViewToyPrior

        autocast_dtype(autocast, f"{name}.autocast")
        return cls(MultiViewToyPrior.load(path), name, autocast, n_views)

    def network_kwargs(self) -> dict[str, Any]:
        """The group size: the network denoises each ``n_views`` consecutive rows jointly."""
        return {"n_views": self.n_views}

    def lora_copy(self, rank: int, alpha: float, targets: list[str]) -> "ToyWorldMVPrior":
        raise NotImplementedError("toyworld-mv-guidance does not support VSD")


@register("toyworld-mv-guidance")
class ToyWorldMVGuidance(SDSGuidance):
    """SDS with the multi-view toy prior on groups of views; returns ``loss_sds``."""

    prior_family = "toyworld-mv"
    prior_inputs = frozenset({"prompt_embeddings"})

    @dataclass
    class Config(SDSGuidance.Config):
        pretrained: Optional[str] = None
        """Path of a multi-view toy-world safetensors file; null: ``weights/toyworld-mv.safetensors``
        in the package (made by ``python -m lift3d.priors.toyworld train-mv --install``)."""
        n_views: Optional[int] = None
        """Views per group the prior denoises jointly; the data must yield groups of this size
        (``data.n_views``). null: the group size the weights were trained on (their metadata)."""
        timestep_sharing: Literal["view", "group", "batch"] = "group"
        """One t per group of ``n_views`` (as the prior was trained) or one for the batch; "view" is refused."""
        autocast: Optional[str] = None
        """"bf16": the prior's network under bfloat16 autocast (faster on CPUs with AMX or
        AVX512-BF16, slower on others); null or "none": float32."""

    cfg: Config

    @classmethod
    def weights_path(cls, cfg: Any) -> Path:
        from lift3d.priors.toyworld.multiview import DEFAULT_MV_WEIGHTS

        return Path(cfg.pretrained) if cfg.pretrained else DEFAULT_MV_WEIGHTS

    @classmethod
    def missing_weights(cls, cfg: Any) -> str | None:
        from lift3d.priors.toyworld.multiview import FINE_TUNE_COMMAND

        path = cls.weights_path(cfg)
        if path.is_file():
            return None
        return (f"no multi-view toy-world weights at {path}. They are made by "
                f"fine-tuning the shipped single-view prior on groups of views: `{FINE_TUNE_COMMAND}` writes "
                "them to lift3d/priors/toyworld/weights/toyworld-mv.safetensors (its wall time: "
                "lift3d/priors/toyworld/README.md); or set the guidance's pretrained to a file you trained")

    def configure(self) -> None:
        c = self.cfg
        if c.timestep_sharing == "view":
            raise ConfigError(f"{self.name()}.timestep_sharing: 'view' gives the views of a group different noise "
                              "levels, which the multi-view prior never saw in training; use 'group' or 'batch'")
        if c.n_views is not None and c.n_views < 1:
            raise ConfigError(f"{self.name()}.n_views must be >= 1 (or null: the weights' group size), got {c.n_views}")
        super().configure()

    def build_prior(self) -> ToyWorldMVPrior:
        msg = self.missing_weights(self.cfg)
        if msg is not None:
            from lift3d.priors.toyworld.model import MissingWeightsError

            raise MissingWeightsError(msg)
        prior = ToyWorldMVPrior.load(str(self.weights_path(self.cfg)), self.name(), self.cfg.autocast, self.cfg.n_views)
        warn_if_bf16_emulated(prior, self.name())
        return prior

    @property
    def n_views(self) -> int:
        """The group size the prior denoises jointly."""
        return self.prior.n_views

    def check_groups(self, inp: GuidanceInput) -> None:
        """ConfigError unless the batch is whole groups of :attr:`n_views` views, as the data yields them."""
        n, B, got = self.n_views, inp.batch_size, inp.cameras.n_views
        if got != n or B % n:
            raise ConfigError(
                f"{self.name()} denoises groups of {n} views jointly, but the batch has {B} views in groups of {got} "
                f"(data.n_views={got}, data.batch_size={B}); set data.n_views={n} and data.batch_size to a multiple "
                f"of it ({n}, {2 * n}, ...), or the guidance's n_views to the data's")

    def forward(self, inp: GuidanceInput, t: Tensor | None = None, noise: Tensor | None = None) -> GuidanceOutput:
        self.check_groups(inp)
        return super().forward(inp, t, noise)


__all__ = ["ToyWorldMVPrior", "ToyWorldMVGuidance"]
