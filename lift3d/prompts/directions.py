"""View-dependent prompting: view buckets, prompt rewriting per bucket, and Perp-Neg falloffs.

A text-to-image prior has no camera input, so DreamFusion (Poole et al. 2022) tells it where the
camera is through the words: "a hamburger, back view". A camera is put into one of a few buckets
(front, side, back, overhead) from its elevation and azimuth, and the bucket's rewritten prompt
conditions the prior for that render.

Perp-Neg (Armandpour et al. 2023, "Re-imagine the Negative Prompt Algorithm") goes further: the
positive embedding is blended between the front/side/back prompts by azimuth, and the *other*
views enter as negative prompts whose weights fall off exponentially with how close the camera is
to them. The falloff curve is ``a * exp(-b * r) + c`` (:func:`exp_falloff`); this module holds the
four curves as threestudio parameterises them and :class:`~lift3d.prompts.base.PromptUtils` turns
them into per-camera weights.

Angles are degrees. Azimuth 0 (+x) is the front (see docs/ARCHITECTURE.md, "Conventions of the
world"); azimuths are compared after wrapping to [-180, 180).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

#: The placeholder a direction template replaces with the prompt.
PROMPT_SLOT = "{prompt}"

#: Bucket names Perp-Neg needs, in the order :func:`make_view_directions` lists them.
DIRECTION_NAMES = ("side", "front", "back", "overhead")


def wrap_azimuth(azimuth: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
    """Azimuth in degrees wrapped to [-180, 180)."""
    return torch.remainder(azimuth + 180.0, 360.0) - 180.0


def exp_falloff(params: Sequence[float], r: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
    """``a * exp(-b * r) + c`` for ``params = (a, b, c)``: a Perp-Neg negative-prompt weight curve."""
    a, b, c = params
    return a * torch.exp(-b * r) + c


@dataclass(frozen=True)
class ViewDirection:
    """One view-dependent prompt bucket.

    A camera belongs to the bucket when its wrapped azimuth lies strictly within
    ``azimuth_half_width`` degrees of ``azimuth_center`` (any azimuth when the centre is None) and
    its elevation is strictly above ``min_elevation`` (any elevation when None). When several
    buckets match, the later one in the list wins (see :func:`direction_index`), so the first
    bucket of a list should match every camera and act as the fallback.
    """

    name: str
    """Bucket name: "front", "side", "back" or "overhead" for the built-in set."""
    template: str = PROMPT_SLOT
    """How the prompt is rewritten; ``{prompt}`` stands for the prompt ("{prompt}, side view")."""
    negative_template: str = PROMPT_SLOT
    """How the negative prompt is rewritten; unchanged by default, as in threestudio."""
    azimuth_center: float | None = None
    """Centre of the bucket's azimuth range in degrees; None accepts every azimuth."""
    azimuth_half_width: float = 180.0
    """Half width of the azimuth range in degrees (exclusive)."""
    min_elevation: float | None = None
    """Elevation in degrees the camera must exceed; None accepts every elevation."""

    def prompt(self, text: str) -> str:
        """The prompt as this bucket words it."""
        return self.template.replace(PROMPT_SLOT, text)

    def negative_prompt(self, text: str) -> str:
        """The negative prompt as this bucket words it."""
        return self.negative_template.replace(PROMPT_SLOT, text)

    def contains(self, elevation: Float[Tensor, "B"], azimuth: Float[Tensor, "B"]) -> Bool[Tensor, "B"]:
        """Which cameras fall in this bucket."""
        mask = torch.ones(elevation.shape, dtype=torch.bool, device=elevation.device)
        if self.azimuth_center is not None:
            offset = wrap_azimuth(azimuth.to(torch.float64) - self.azimuth_center).abs()
            mask &= offset < self.azimuth_half_width
        if self.min_elevation is not None:
            mask &= elevation > self.min_elevation
        return mask


def direction_index(directions: Sequence[ViewDirection], elevation: Float[Tensor, "B"],
                    azimuth: Float[Tensor, "B"]) -> Int[Tensor, "B"]:
    """Index into ``directions`` of each camera's bucket; the last matching bucket wins, and a
    camera no bucket matches gets 0."""
    elevation = torch.as_tensor(elevation)
    azimuth = torch.as_tensor(azimuth, device=elevation.device)
    if elevation.shape != azimuth.shape:
        raise ValueError(f"elevation {tuple(elevation.shape)} and azimuth {tuple(azimuth.shape)} must have the "
                         "same shape (one entry per camera)")
    idx = torch.zeros(elevation.shape, dtype=torch.long, device=elevation.device)
    for i, d in enumerate(directions):
        idx = torch.where(d.contains(elevation, azimuth), torch.full_like(idx, i), idx)
    return idx


def direction_template(phrase: str, style: Literal["append", "prepend"]) -> str:
    """A bucket's template from its phrase: "{prompt}, side view" (append) or "side view of {prompt}"
    (prepend). A phrase that already holds ``{prompt}`` is used as it is; an empty one keeps the prompt."""
    if PROMPT_SLOT in phrase:
        return phrase
    if not phrase.strip():
        return PROMPT_SLOT
    if style == "append":
        return f"{PROMPT_SLOT}, {phrase}"
    if style == "prepend":
        return f"{phrase} of {PROMPT_SLOT}"
    raise ValueError(f"view prompt style must be 'append' or 'prepend', got {style!r}")


def make_view_directions(
    style: Literal["append", "prepend"] = "append",
    front: str = "front view",
    side: str = "side view",
    back: str = "back view",
    overhead: str = "overhead view",
    front_threshold: float = 45.0,
    back_threshold: float = 45.0,
    overhead_threshold: float = 60.0,
) -> list[ViewDirection]:
    """The built-in buckets, in precedence order: side (fallback), front (within ``front_threshold``
    of azimuth 0), back (within ``back_threshold`` of 180), overhead (elevation above
    ``overhead_threshold``, whatever the azimuth)."""
    return [
        ViewDirection("side", direction_template(side, style)),
        ViewDirection("front", direction_template(front, style), azimuth_center=0.0,
                      azimuth_half_width=front_threshold),
        ViewDirection("back", direction_template(back, style), azimuth_center=180.0,
                      azimuth_half_width=back_threshold),
        ViewDirection("overhead", direction_template(overhead, style), min_elevation=overhead_threshold),
    ]


@dataclass(frozen=True)
class PerpNegFalloffs:
    """The four ``(a, b, c)`` curves of :func:`exp_falloff` that weigh Perp-Neg's negative prompts.

    ``r`` is the interpolation ratio of the positive embedding (see
    :meth:`~lift3d.prompts.base.PromptUtils.get_text_embeddings_perp_neg`); the defaults are
    threestudio's, chosen so that a view's own negative weight vanishes when the camera is exactly
    on it (``front_side(1) == 0``, ``side_back(1) == 0`` up to rounding).
    """

    front_side: tuple[float, float, float] = (4.0, 0.5, -2.426)
    """Front-side half (|azimuth| < 90): weight of the front negative at ratio r (r = 1 at the front)."""
    side_front: tuple[float, float, float] = (4.0, 0.5, -2.426)
    """Front-side half: weight of the side negative, evaluated at 1 - r."""
    side_back: tuple[float, float, float] = (1.0, 0.5, -0.606)
    """Side-back half (|azimuth| >= 90): weight of the side negative at ratio r (r = 1 at the side)."""
    front_side_back: tuple[float, float, float] = (1.0, 0.5, 0.967)
    """Side-back half: weight of the front negative at ratio r."""

    def __post_init__(self) -> None:
        for name in ("front_side", "side_front", "side_back", "front_side_back"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3 or not all(math.isfinite(v) for v in value):
                raise ValueError(f"Perp-Neg falloff {name} must be three finite numbers (a, b, c), got {value}")
            object.__setattr__(self, name, value)


__all__ = [
    "PROMPT_SLOT",
    "DIRECTION_NAMES",
    "ViewDirection",
    "PerpNegFalloffs",
    "wrap_azimuth",
    "exp_falloff",
    "direction_index",
    "direction_template",
    "make_view_directions",
]
