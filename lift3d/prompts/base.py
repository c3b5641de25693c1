"""Prompt processors: turn the recipe's prompt into what a guidance conditions on.

A processor is built from the ``system.prompt_processor`` config and called once, lazily, when
fitting starts; the call returns a :class:`PromptUtils`, which the guidances receive every step.
``PromptUtils`` holds the encoded prompt, the encoded negative prompt (the unconditional branch
of classifier-free guidance) and, with view-dependent prompting (DreamFusion, Poole et al. 2022),
one encoded prompt per view bucket ("a hamburger, back view"). Per batch of cameras it hands out
the rows each camera needs, for plain CFG (:meth:`PromptUtils.get_text_embeddings`) or for
Perp-Neg (Armandpour et al. 2023; :meth:`PromptUtils.get_text_embeddings_perp_neg`). The guidance
does the arithmetic on noise predictions; this module supplies embeddings and weights only.

Writing a processor for a new text encoder means subclassing :class:`BasePromptProcessor` and
implementing :meth:`~BasePromptProcessor.encoder_id` and :meth:`~BasePromptProcessor.encode`;
deduplication, the disk cache (:mod:`lift3d.prompts.cache`) and memoisation come from the base.
Load the encoder inside ``encode`` (and drop it in ``release_encoder``): construction must stay
cheap, since ``--export`` and ``--test`` build the processor without ever calling it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
from jaxtyping import Float, Int, Shaped
from torch import Tensor

from lift3d.config import ConfigError, Provenance
from lift3d.prompts.cache import EmbeddingCache, default_text_embedding_dir, user_cache_root
from lift3d.prompts.directions import (
    DIRECTION_NAMES,
    PerpNegFalloffs,
    ViewDirection,
    direction_index,
    direction_template,
    exp_falloff,
    make_view_directions,
    wrap_azimuth,
)
from lift3d.registry import register
from lift3d.utils.base import BaseObject

_TENSOR_FIELDS = ("text_embeddings", "uncond_text_embeddings", "text_embeddings_vd", "uncond_text_embeddings_vd")


class NoTextEmbeddingsError(ValueError):
    """A guidance asked for text embeddings from a PromptUtils made without a text encoder."""


def encoder_processor_names() -> list[str]:
    """Registered prompt processors that encode text (what a text-conditioned guidance needs)."""
    from lift3d.registry import find, registered

    try:
        return [n for n in registered("prompt-processor") if getattr(find(n), "has_encoder", False)]
    except Exception:  # the listing only decorates an error message; never hide that error behind another
        return ["toyworld-prompt-processor"]


@dataclass(eq=False)  # compared by identity: field-wise == on tensors has no single truth value
class PromptUtils:
    """What a guidance receives: the prompt texts and, from processors with a text encoder, their
    embeddings, batch first (CLIP hidden states ``[1, 77, 768]``, toy-world token ids ``[1, L]``).

    Embeddings live where the processor left them (the CPU); call :meth:`to` once to move them to
    the guidance's device. The getters return rows on the device of the ``elevation`` they are given.
    """

    prompt: str
    """The prompt text."""
    negative_prompt: str = ""
    """The negative prompt text ("" for none)."""
    text_embeddings: Optional[Shaped[Tensor, "1 ..."]] = None
    """The prompt's embedding, ``[1, ...]``; None from processors without an encoder."""
    uncond_text_embeddings: Optional[Shaped[Tensor, "1 ..."]] = None
    """The negative prompt's embedding (the empty string's when there is none), ``[1, ...]``."""
    directions: list[ViewDirection] = field(default_factory=make_view_directions)
    """The view buckets, in precedence order (see :func:`~lift3d.prompts.directions.direction_index`)."""
    text_embeddings_vd: Optional[Shaped[Tensor, "D ..."]] = None
    """One prompt embedding per direction, ``[D, ...]``; all equal to the plain prompt's when
    ``view_dependent_prompting`` is off."""
    uncond_text_embeddings_vd: Optional[Shaped[Tensor, "D ..."]] = None
    """One negative-prompt embedding per direction, ``[D, ...]``."""
    use_perp_neg: bool = False
    """Whether the recipe asked for Perp-Neg; a guidance that supports it then calls
    :meth:`get_text_embeddings_perp_neg` instead of :meth:`get_text_embeddings`."""
    view_dependent_prompting: bool = False
    """Whether the ``_vd`` rows hold view-specific prompts. When False the getters always hand out
    the plain prompt, whatever the guidance asks for."""
    prompts_vd: list[str] = field(default_factory=list)
    """The prompt as each direction words it (texts, for guidances that read text)."""
    negative_prompts_vd: list[str] = field(default_factory=list)
    """The negative prompt as each direction words it."""
    perp_neg_falloffs: PerpNegFalloffs = field(default_factory=PerpNegFalloffs)
    """The curves that weigh Perp-Neg's negative prompts."""
    source: str = ""
    """Registry name of the processor that made this (for error messages)."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Anything else a specific processor wants to pass to its guidance."""

    def __post_init__(self) -> None:
        has = self.text_embeddings is not None
        if has and self.uncond_text_embeddings is None:
            raise ValueError("PromptUtils with text_embeddings needs uncond_text_embeddings too")
        if has and self.text_embeddings.shape[1:] != self.uncond_text_embeddings.shape[1:]:
            raise ValueError(f"text_embeddings {tuple(self.text_embeddings.shape)} and uncond_text_embeddings "
                             f"{tuple(self.uncond_text_embeddings.shape)} must match beyond the batch dimension")
        for name in ("text_embeddings_vd", "uncond_text_embeddings_vd"):
            vd = getattr(self, name)
            if vd is not None and vd.shape[0] != len(self.directions):
                raise ValueError(f"{name} has {vd.shape[0]} rows but there are {len(self.directions)} directions")
        if self.view_dependent_prompting and has and self.text_embeddings_vd is None:
            raise ValueError("PromptUtils with view_dependent_prompting needs text_embeddings_vd")

    # -- plumbing --------------------------------------------------------------------------------

    @property
    def has_embeddings(self) -> bool:
        """Whether this carries encoded text (False from the plain processor)."""
        return self.text_embeddings is not None

    def to(self, device: torch.device | str) -> "PromptUtils":
        """A copy with every embedding on ``device`` (``self`` when nothing has to move)."""
        device = torch.device(device)
        moved = {}
        for name in _TENSOR_FIELDS:
            t = getattr(self, name)
            if t is not None and t.device != device:
                moved[name] = t.to(device)
        return dataclasses.replace(self, **moved) if moved else self

    def direction_index(self, elevation: Float[Tensor, "B"], azimuth: Float[Tensor, "B"]) -> Int[Tensor, "B"]:
        """Index into :attr:`directions` of each camera's view bucket (angles in degrees)."""
        return direction_index(self.directions, elevation, azimuth)

    def direction_of(self, name: str) -> int:
        """Index of the direction called ``name``."""
        for i, d in enumerate(self.directions):
            if d.name == name:
                return i
        raise KeyError(f"no view direction {name!r}; the directions are: {', '.join(d.name for d in self.directions)}")

    def _require_embeddings(self) -> None:
        if self.text_embeddings is None:
            who = f"prompt processor '{self.source}'" if self.source else "this PromptUtils"
            raise NoTextEmbeddingsError(
                f"the guidance needs text embeddings, but {who} has no text encoder and passes only the "
                f"prompt text ({self.prompt!r}). Use a prompt processor with an encoder: set "
                f"system.prompt_processor_type to one of: {', '.join(encoder_processor_names())}"
            )

    @staticmethod
    def _cameras(elevation: Any, azimuth: Any) -> tuple[Tensor, Tensor]:
        elevation = torch.as_tensor(elevation)
        azimuth = torch.as_tensor(azimuth, device=elevation.device)
        if elevation.dim() != 1 or azimuth.shape != elevation.shape:
            raise ValueError(f"elevation and azimuth must both be [B] (one angle per camera), got "
                             f"{tuple(elevation.shape)} and {tuple(azimuth.shape)}")
        return elevation, azimuth

    # -- what guidances call ---------------------------------------------------------------------

    def get_text_embeddings(
        self,
        elevation: Float[Tensor, "B"],
        azimuth: Float[Tensor, "B"],
        camera_distances: Float[Tensor, "B"] | None = None,
        view_dependent_prompting: bool = True,
    ) -> tuple[Shaped[Tensor, "B ..."], Shaped[Tensor, "B ..."]]:
        """(cond ``[B, ...]``, uncond ``[B, ...]``) for classifier-free guidance.

        With view-dependent prompting (asked for here *and* enabled in the processor) row ``i`` is
        the prompt of camera ``i``'s bucket; otherwise every row is the plain prompt. The uncond rows
        are the negative prompt (the empty string when none was given). ``camera_distances`` does not
        affect the buckets; it is accepted so that every guidance calls this the same way.
        """
        self._require_embeddings()
        elevation, azimuth = self._cameras(elevation, azimuth)
        B, dev = elevation.shape[0], elevation.device
        if view_dependent_prompting and self.view_dependent_prompting:
            idx = self.direction_index(elevation, azimuth).to(self.text_embeddings_vd.device)
            cond = self.text_embeddings_vd[idx]
            uncond = self.uncond_text_embeddings_vd[idx]
        else:
            cond = self.text_embeddings.expand(B, *self.text_embeddings.shape[1:])
            uncond = self.uncond_text_embeddings.expand(B, *self.uncond_text_embeddings.shape[1:])
        return cond.to(dev), uncond.to(dev)

    def get_text_embeddings_perp_neg(
        self,
        elevation: Float[Tensor, "B"],
        azimuth: Float[Tensor, "B"],
        camera_distances: Float[Tensor, "B"] | None = None,
        view_dependent_prompting: bool = True,
    ) -> tuple[Float[Tensor, "B ..."], Float[Tensor, "B ..."], Float[Tensor, "B K ..."], Float[Tensor, "B K"]]:
        """(cond ``[B, ...]``, uncond ``[B, ...]``, negatives ``[B, 2, ...]``, weights ``[B, 2]``) for Perp-Neg.

        With ``a = |azimuth|`` wrapped to [0, 180] and ``f_xy(r) = A exp(-B r) + C`` the
        :attr:`perp_neg_falloffs` curves, per camera:

        - overhead bucket: cond is the overhead prompt; both negatives are the uncond row, weight 0;
        - ``a < 90`` (front-side half): ``r = 1 - a / 90`` (1 at the front, 0 at the side);
          cond ``= r * front + (1 - r) * side``; negatives (front, side) with weights
          ``(-f_fs(r), -f_sf(1 - r))``;
        - ``a >= 90`` (side-back half): ``r = 2 - a / 90`` (1 at the side, 0 at the back);
          cond ``= r * side + (1 - r) * back``; negatives (side, front) with weights
          ``(-f_sb(r), -f_fsb(r))``.

        The weights are negative, as threestudio applies them: the guidance adds
        ``sum_k w_k * perp(eps_neg_k - eps_uncond, eps_cond - eps_uncond)`` to the positive
        direction (``perp(x, y)`` the part of ``x`` orthogonal to ``y``), which pushes away from the
        other views. The uncond rows are the bucket's negative prompt, as in
        :meth:`get_text_embeddings`. Interpolating needs floating-point embeddings.
        """
        self._require_embeddings()
        if not (view_dependent_prompting and self.view_dependent_prompting):
            key = f"{self.source}: " if self.source else ""
            raise ValueError(f"{key}Perp-Neg works on view-dependent prompts: enable view_dependent_prompting in "
                             "the prompt processor (system.prompt_processor.view_dependent_prompting=true) and "
                             "do not turn it off in the guidance")
        if not self.text_embeddings_vd.is_floating_point():
            raise TypeError(f"Perp-Neg interpolates embeddings, but these are {self.text_embeddings_vd.dtype} "
                            "(token ids?); it needs a processor whose encoder returns floating-point embeddings")
        elevation, azimuth = self._cameras(elevation, azimuth)
        dev = elevation.device
        vd = self.text_embeddings_vd.to(dev)
        uncond_vd = self.uncond_text_embeddings_vd.to(dev)
        front, side, back, overhead = (vd[self.direction_of(n)] for n in ("front", "side", "back", "overhead"))
        idx = self.direction_index(elevation, azimuth)
        uncond = uncond_vd[idx]

        a = wrap_azimuth(azimuth.to(dev, torch.float32)).abs()  # [B] in [0, 180]
        front_half = a < 90
        r = torch.where(front_half, 1 - a / 90, 2 - a / 90)  # [B]
        expand = (-1,) + (1,) * (vd.dim() - 1)  # broadcast [B] against [B, ...]
        fh = front_half.view(expand)
        rr = r.view(expand).to(vd.dtype)
        near = torch.where(fh, front, side)  # the view r = 1 points at
        far = torch.where(fh, side, back)
        cond = rr * near + (1 - rr) * far
        neg0 = torch.where(fh, front, side)
        neg1 = torch.where(fh, side, front)
        f = self.perp_neg_falloffs
        w0 = torch.where(front_half, -exp_falloff(f.front_side, r), -exp_falloff(f.side_back, r))
        w1 = torch.where(front_half, -exp_falloff(f.side_front, 1 - r), -exp_falloff(f.front_side_back, r))

        top = (idx == self.direction_of("overhead")).to(dev)
        tv = top.view(expand)
        cond = torch.where(tv, overhead.expand_as(cond), cond)
        neg0 = torch.where(tv, uncond, neg0)
        neg1 = torch.where(tv, uncond, neg1)
        weights = torch.stack([w0, w1], dim=1).masked_fill(top[:, None], 0.0)
        return cond, uncond, torch.stack([neg0, neg1], dim=1), weights


class BasePromptProcessor(BaseObject):
    """Builds a :class:`PromptUtils` from the config: view buckets, deduplicated encoding, disk cache.

    Subclasses with a text encoder implement :meth:`encoder_id` and :meth:`encode`; ``__call__``
    encodes each distinct text once (prompt, negative prompt, each view variant), reading and
    writing the disk cache, and memoises the result.
    """

    category = "prompt-processor"
    #: Whether this processor produces embeddings (False: texts only, see plain-prompt-processor).
    has_encoder: bool = True

    @dataclass
    class Config:
        prompt: str = ""
        """The text prompt; recipes usually set it to ``${prompt}`` so ``prompt=...`` on the CLI fills it."""
        negative_prompt: str = ""
        """What to steer away from; encoded as the unconditional branch of guidance ("" for none)."""
        view_dependent_prompting: bool = True
        """Reword the prompt per camera bucket ("a hamburger, back view") so the prior knows the view."""
        view_prompt_style: Literal["append", "prepend"] = "append"
        """Where the view phrase goes: "a hamburger, side view" (append) or "side view of a hamburger" (prepend)."""
        prompt_front: str = "front view"
        """Phrase of the front bucket; a phrase containing ``{prompt}`` is used as the whole template."""
        prompt_side: str = "side view"
        """Phrase of the side bucket (cameras in no other bucket)."""
        prompt_back: str = "back view"
        """Phrase of the back bucket."""
        prompt_overhead: str = "overhead view"
        """Phrase of the overhead bucket."""
        front_threshold: float = 45.0
        """Front bucket: azimuth strictly within this many degrees of 0."""
        back_threshold: float = 45.0
        """Back bucket: azimuth strictly within this many degrees of 180."""
        overhead_threshold: float = 60.0
        """Overhead bucket: elevation strictly above this many degrees (whatever the azimuth; wins over the others)."""
        use_perp_neg: bool = False
        """Ask the guidance for Perp-Neg (Armandpour et al. 2023); needs view_dependent_prompting."""
        perp_neg_f_fs: tuple[float, float, float] = (4.0, 0.5, -2.426)
        """Perp-Neg falloff (a, b, c) of a*exp(-b*r)+c: front negative's weight in the front-side half."""
        perp_neg_f_sf: tuple[float, float, float] = (4.0, 0.5, -2.426)
        """Perp-Neg falloff: side negative's weight in the front-side half (evaluated at 1 - r)."""
        perp_neg_f_sb: tuple[float, float, float] = (1.0, 0.5, -0.606)
        """Perp-Neg falloff: side negative's weight in the side-back half."""
        perp_neg_f_fsb: tuple[float, float, float] = (1.0, 0.5, 0.967)
        """Perp-Neg falloff: front negative's weight in the side-back half."""
        allow_empty_prompt: bool = False
        """Encode an empty prompt as the empty text instead of stopping: a prior trained with dropped
        text then scores without one (image-to-3D recipes where the image says what the object is)."""
        use_cache: bool = True
        """Keep text embeddings on disk, keyed by encoder and text, so later runs skip the encoder."""
        cache_dir: Optional[str] = None
        """Folder of the embedding cache; default ``$LIFT3D_CACHE``, ``$XDG_CACHE_HOME/lift3d`` or
        ``~/.cache/lift3d``, then ``text_embeddings``."""

    cfg: Config

    def __init__(self, cfg: Any = None, *, cfg_key: str = "", prov: Provenance | None = None, **kwargs: Any):
        self.cfg_key = cfg_key or "system.prompt_processor"
        self.prov = prov
        self._utils: PromptUtils | None = None
        super().__init__(cfg, cfg_key=cfg_key, prov=prov, **kwargs)

    # -- set-up (cheap: no encoder here) ---------------------------------------------------------

    def configure(self, **kwargs: Any) -> None:
        super().configure(**kwargs)
        cfg = self.cfg
        for name in ("front_threshold", "back_threshold"):
            value = getattr(cfg, name)
            if not 0 < value <= 180:
                raise ConfigError(f"config key {self.key(name)}: must be in (0, 180] degrees, got {value}")
        if not -90 <= cfg.overhead_threshold <= 90:
            raise ConfigError(f"config key {self.key('overhead_threshold')}: must be in [-90, 90] degrees, "
                              f"got {cfg.overhead_threshold}")
        if cfg.use_perp_neg and not cfg.view_dependent_prompting:
            raise ConfigError(f"config key {self.key('use_perp_neg')}: Perp-Neg blends the view-dependent prompts; "
                              f"set {self.cfg_key}.view_dependent_prompting=true or use_perp_neg=false")
        self.directions = make_view_directions(
            cfg.view_prompt_style, front=cfg.prompt_front, side=cfg.prompt_side, back=cfg.prompt_back,
            overhead=cfg.prompt_overhead, front_threshold=cfg.front_threshold, back_threshold=cfg.back_threshold,
            overhead_threshold=cfg.overhead_threshold,
        )
        try:
            self.perp_neg_falloffs = PerpNegFalloffs(cfg.perp_neg_f_fs, cfg.perp_neg_f_sf, cfg.perp_neg_f_sb,
                                                     cfg.perp_neg_f_fsb)
        except ValueError as exc:
            raise ConfigError(f"config key {self.key('perp_neg_f_*')}: {exc}") from None

    def key(self, name: str) -> str:
        """``'<key path of this processor>.<name>'`` and the file that set it, for error messages."""
        path = f"{self.cfg_key}.{name}"
        return f"'{path}'" + (self.prov.describe(path) if self.prov else "")

    @property
    def name(self) -> str:
        return getattr(type(self), "registry_name", type(self).__name__)

    # -- what subclasses implement ---------------------------------------------------------------

    def encoder_id(self) -> str:
        """Identifies the encoder and its weights (model id, revision, dtype...); part of the cache key,
        so it must change whenever the same text would encode differently."""
        raise NotImplementedError(f"{self.name} must implement encoder_id()")

    def encode(self, texts: list[str]) -> Shaped[Tensor, "N ..."]:
        """Embeddings of ``texts``, one row each, ``[N, ...]``; load the encoder lazily here."""
        raise NotImplementedError(f"{self.name} must implement encode()")

    def release_encoder(self) -> None:
        """Called after encoding: drop the encoder's weights if they are no longer needed."""

    # -- encoding with the cache -----------------------------------------------------------------

    def cache(self) -> EmbeddingCache | None:
        """The disk cache this processor reads and writes, or None when ``use_cache`` is off."""
        if not self.cfg.use_cache:
            return None
        root = self.cfg.cache_dir if self.cfg.cache_dir else default_text_embedding_dir()
        return EmbeddingCache(root, self.encoder_id())

    def embed(self, texts: list[str]) -> dict[str, Tensor]:
        """text -> embedding (CPU) for every distinct text; each is encoded at most once, and not at
        all when the disk cache has it."""
        distinct = list(dict.fromkeys(texts))
        cache = self.cache()
        table: dict[str, Tensor] = {}
        missing = []
        for text in distinct:
            hit = cache.load(text) if cache is not None else None
            if hit is None:
                missing.append(text)
            else:
                table[text] = hit
        if missing:
            out = self.encode(missing)
            if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != len(missing):
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise TypeError(f"{self.name}.encode() must return a tensor with one row per text "
                                f"([{len(missing)}, ...]), got {got}")
            for text, row in zip(missing, out.detach().cpu()):
                row = row.clone()  # own the memory rather than keep the whole batch alive
                table[text] = row
                if cache is not None:
                    cache.save(text, row)
            self.release_encoder()
        shapes = {(tuple(t.shape), t.dtype) for t in table.values()}
        if len(shapes) > 1:
            where = f" (cache folder {cache.folder})" if cache is not None else ""
            raise RuntimeError(f"{self.name}: embeddings of different shapes or dtypes {sorted(map(str, shapes))} for "
                               f"one encoder {self.encoder_id()!r}{where}; encoder_id() must change whenever "
                               "the encoder does")
        return table

    def __call__(self) -> PromptUtils:
        """The :class:`PromptUtils` of this config, computed on the first call and memoised."""
        if self._utils is None:
            self._utils = self._build()
        return self._utils

    def check_prompt(self) -> None:
        """A ConfigError naming the key when a processor that encodes text is given an empty prompt
        (unless ``allow_empty_prompt``); cheap, so the launcher calls it before any folder is made."""
        if self.has_encoder and not self.cfg.prompt.strip() and not self.cfg.allow_empty_prompt:
            raise ConfigError(f"{self.name} needs a prompt, but config key {self.key('prompt')} is empty; "
                              'set prompt="..." on the command line (or allow_empty_prompt: true)')

    def _build(self) -> PromptUtils:
        cfg = self.cfg
        vd = cfg.view_dependent_prompting
        prompts_vd = [d.prompt(cfg.prompt) if vd else cfg.prompt for d in self.directions]
        negatives_vd = [d.negative_prompt(cfg.negative_prompt) if vd else cfg.negative_prompt
                        for d in self.directions]
        common = dict(
            prompt=cfg.prompt, negative_prompt=cfg.negative_prompt, directions=list(self.directions),
            use_perp_neg=cfg.use_perp_neg, view_dependent_prompting=vd, prompts_vd=prompts_vd,
            negative_prompts_vd=negatives_vd, perp_neg_falloffs=self.perp_neg_falloffs, source=self.name,
        )
        if not self.has_encoder:
            return PromptUtils(**common)
        self.check_prompt()
        table = self.embed([cfg.prompt, cfg.negative_prompt, *prompts_vd, *negatives_vd])
        return PromptUtils(
            **common,
            text_embeddings=table[cfg.prompt][None],
            uncond_text_embeddings=table[cfg.negative_prompt][None],
            text_embeddings_vd=torch.stack([table[p] for p in prompts_vd]),
            uncond_text_embeddings_vd=torch.stack([table[p] for p in negatives_vd]),
        )


@register("plain-prompt-processor")
class PlainPromptProcessor(BasePromptProcessor):
    """Passes the prompt text through without encoding it (for guidances that read text themselves,
    or need none). Its PromptUtils has no embeddings: ``get_text_embeddings`` explains which
    processor to use instead."""

    has_encoder = False


__all__ = [
    "PromptUtils",
    "ViewDirection",
    "PerpNegFalloffs",
    "BasePromptProcessor",
    "PlainPromptProcessor",
    "NoTextEmbeddingsError",
    "EmbeddingCache",
    "DIRECTION_NAMES",
    "direction_index",
    "direction_template",
    "make_view_directions",
    "exp_falloff",
    "wrap_azimuth",
    "encoder_processor_names",
    "default_text_embedding_dir",
    "user_cache_root",
]
