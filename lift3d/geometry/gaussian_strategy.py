"""Densification strategies for 3D Gaussians: when to clone, split, prune and reset opacities.

The adaptive density control of "3D Gaussian Splatting for Real-Time Radiance Field Rendering"
(Kerbl et al., SIGGRAPH 2023, Sec. 5.2): Gaussians whose view-space mean gradient, averaged over
the views that saw them, exceeds a threshold are cloned when small and split into smaller
children when large; nearly transparent and oversized ones are pruned; opacities are reset
periodically so floaters can be removed.

A strategy is a small dataclass with two hooks, run by the geometry: ``step_post_backward``
(gradients available; gathers statistics) and ``step_post_optimizer`` (after ``optimizer.step()``;
changes the set). It is picked by the geometry's ``strategy`` config field from
:data:`STRATEGIES`; plugins add their own with :func:`register_strategy`. Its fields are filled
from the geometry's config fields of the same name.

Changing the set replaces every parameter with a new ``nn.Parameter``; the optimizer is updated
in place: the group holding the old parameter (found by identity) gets the new one and the
per-element state (Adam's ``exp_avg``, ``exp_avg_sq``) is masked or extended with zeros.

What a strategy gathers between passes (its dataclass fields declared with ``init=False``, such as
the default strategy's gradient sums) decides what the next pass does, so it travels with the
geometry's checkpoint: ``state_dict()`` returns those fields (tensors and plain values only, so a
``weights_only`` load reads them) and ``load_state_dict()`` puts them back. A plugin strategy gets
this for free by declaring its running state the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable

import torch
import torch.nn as nn
from torch import Tensor

from lift3d.config import ConfigError
from lift3d.utils.gaussian_math import quat_to_rotmat

PARAM_NAMES = ("xyz", "features_dc", "features_rest", "scaling", "rotation", "opacity")

STRATEGIES: dict[str, type] = {}


def register_strategy(name: str) -> Callable[[type], type]:
    """Class decorator: make a strategy selectable as ``strategy: name`` in the geometry config."""

    def deco(cls: type) -> type:
        STRATEGIES[name] = cls
        return cls

    return deco


def build_strategy(cfg: Any) -> "NoStrategy":
    """The strategy named by ``cfg.strategy``, its fields taken from ``cfg`` where present."""
    name = cfg.strategy
    if name not in STRATEGIES:
        raise ConfigError(f"gaussian-splatting: unknown strategy {name!r}; valid: {', '.join(sorted(STRATEGIES))}")
    cls = STRATEGIES[name]
    kwargs = {f.name: getattr(cfg, f.name) for f in fields(cls) if f.init and hasattr(cfg, f.name)}
    if "densify_extent" in kwargs and kwargs["densify_extent"] is None:
        kwargs["densify_extent"] = float(cfg.radius)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Parameter surgery that keeps the optimizer consistent


def replace_in_optimizer(optimizer: torch.optim.Optimizer | None, old: Tensor, new: Tensor,
                         state_fn: Callable[[Tensor], Tensor]) -> bool:
    """Swap ``old`` for ``new`` in ``optimizer`` (found by identity) and map its per-element state with ``state_fn``.

    State tensors shaped like ``old`` (exp_avg, exp_avg_sq, max_exp_avg_sq, momentum buffers) are
    mapped; scalars such as ``step`` are kept. Returns False when ``old`` is not in the optimizer.
    """
    if optimizer is None:
        return False
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                st = optimizer.state.pop(old, None)
                if st is not None:
                    optimizer.state[new] = {
                        k: state_fn(v) if torch.is_tensor(v) and v.shape == old.shape else v for k, v in st.items()
                    }
                group["params"][i] = new
                return True
    return False


def update_params(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                  param_fn: Callable[[str, Tensor], Tensor], state_fn: Callable[[str, Tensor], Tensor],
                  names: tuple[str, ...] = PARAM_NAMES) -> None:
    """Replace each ``model.<name>`` by ``param_fn(name, old data)`` and its optimizer state by ``state_fn``."""
    for name in names:
        old = getattr(model, name)
        new = nn.Parameter(param_fn(name, old.detach()).contiguous(), requires_grad=old.requires_grad)
        replace_in_optimizer(optimizer, old, new, lambda v, _n=name: state_fn(_n, v))
        setattr(model, name, new)


def keep_rows(model: nn.Module, optimizer: torch.optim.Optimizer | None, keep: Tensor) -> None:
    """Keep only the Gaussians where ``keep`` [N] is True (parameters and optimizer state)."""
    update_params(model, optimizer, lambda n, t: t[keep], lambda n, v: v[keep])


def append_rows(model: nn.Module, optimizer: torch.optim.Optimizer | None, extra: dict[str, Tensor],
                keep: Tensor | None = None) -> None:
    """Keep rows ``keep`` (all when None) and append ``extra[name]`` rows; new rows get zero optimizer state."""

    def pf(n: str, t: Tensor) -> Tensor:
        t = t if keep is None else t[keep]
        return torch.cat([t, extra[n].to(t)], 0)

    def sf(n: str, v: Tensor) -> Tensor:
        v = v if keep is None else v[keep]
        return torch.cat([v, torch.zeros_like(extra[n]).to(v)], 0)

    update_params(model, optimizer, pf, sf)


# ---------------------------------------------------------------------------------------------
# Strategies


def _state_value(value: Any) -> Any:
    """A copy of one piece of running state that a ``weights_only`` checkpoint load accepts."""
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return [_state_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _state_value(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"strategy state of type {type(value).__name__} cannot go into a checkpoint loaded with "
                    "weights_only=True; keep running state in tensors, numbers, strings, lists and dicts")


def _to_device(value: Any, device: torch.device) -> Any:
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


@register_strategy("none")
@dataclass
class NoStrategy:
    """Fixed set of Gaussians: the hooks do nothing."""

    def reset_stats(self, model: Any) -> None:
        pass

    def state_names(self) -> list[str]:
        """The fields that hold running state: those the config does not set (``init=False``)."""
        return [f.name for f in fields(self) if not f.init]

    def state_dict(self) -> dict[str, Any]:
        """Copies of the running state, for the geometry's checkpoint."""
        return {name: _state_value(getattr(self, name)) for name in self.state_names()}

    def load_state_dict(self, state: dict[str, Any], model: Any) -> None:
        """Restore what :meth:`state_dict` returned, on ``model``'s device; names this strategy lacks are ignored."""
        device = model.xyz.device
        for name in self.state_names():
            if name in state:
                setattr(self, name, _to_device(state[name], device))

    def step_post_backward(self, model: Any, render_out: dict, step: int) -> None:
        pass

    def step_post_optimizer(self, model: Any, optimizer: torch.optim.Optimizer | None, step: int) -> None:
        pass


@register_strategy("default")
@dataclass
class DefaultStrategy(NoStrategy):
    """3DGS adaptive density control (clone / split / prune / opacity reset)."""

    densify_from_iter: int = 100
    densify_until_iter: int = 3000
    densification_interval: int = 100
    densify_grad_threshold: float = 0.0002
    percent_dense: float = 0.01
    densify_extent: float = 1.0
    split_n: int = 2
    opacity_reset_interval: int = 3000
    opacity_reset_value: float = 0.01
    prune_opacity_threshold: float = 0.005
    prune_world_size: float = 0.1
    max_screen_size: float = 20.0
    max_num: int = 1_000_000

    grad_accum: Tensor | None = field(default=None, init=False, repr=False)  # [N] summed view-space grad norms
    denom: Tensor | None = field(default=None, init=False, repr=False)  # [N] views that saw each Gaussian
    max_radii: Tensor | None = field(default=None, init=False, repr=False)  # [N] largest 2D radius seen (px)

    def reset_stats(self, model: Any) -> None:
        n, dev = model.xyz.shape[0], model.xyz.device
        self.grad_accum = torch.zeros(n, device=dev)
        self.denom = torch.zeros(n, device=dev)
        self.max_radii = torch.zeros(n, device=dev)

    STAT_NAMES = ("grad_accum", "denom", "max_radii")

    def _stats_ok(self, model: Any) -> bool:
        """Whether the statistics describe ``model``'s current Gaussians (moved to its device if needed)."""
        n, dev = model.xyz.shape[0], model.xyz.device
        stats = [getattr(self, name) for name in self.STAT_NAMES]
        if any(t is None or t.shape != (n,) for t in stats):
            return False
        if any(t.device != dev for t in stats):
            # Loaded from a checkpoint before the model moved to its device: the numbers still hold.
            for name, t in zip(self.STAT_NAMES, stats):
                setattr(self, name, t.to(dev))
        return True

    def load_state_dict(self, state: dict[str, Any], model: Any) -> None:
        super().load_state_dict(state, model)
        n = model.xyz.shape[0]
        for name in self.STAT_NAMES:
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (n,):
                raise ValueError(
                    f"gaussian-splatting: the checkpoint's densification statistic {name!r} covers {t.shape[0]} "
                    f"Gaussians but the checkpoint holds {n}; the checkpoint is inconsistent"
                )

    def step_post_backward(self, model: Any, render_out: dict, step: int) -> None:
        if step >= self.densify_until_iter:
            return
        vs = render_out.get("viewspace_points")
        if vs is None or vs.grad is None:
            return
        if not self._stats_ok(model):
            self.reset_stats(model)
        grad = vs.grad.detach()  # [B, N, 2] or [N, 2]
        vis = render_out["visibility_filter"]
        radii = render_out["radii"]
        if grad.ndim == 2:
            grad, vis, radii = grad[None], vis[None], radii[None]
        if grad.shape[1] != model.xyz.shape[0]:
            return  # rendered before the last densification; its statistics no longer line up
        scale = render_out.get("viewspace_grad_scale")
        if scale is not None:
            grad = grad * torch.as_tensor(scale, dtype=grad.dtype, device=grad.device)
        vis = vis.to(grad.device).bool()
        norm = grad.norm(dim=-1)  # [B, N]
        self.grad_accum += (norm * vis).sum(0).to(self.grad_accum)
        self.denom += vis.sum(0).to(self.denom)
        r = torch.where(vis, radii.to(grad.device).to(self.max_radii.dtype), torch.zeros_like(norm))
        self.max_radii = torch.maximum(self.max_radii, r.amax(0))

    def step_post_optimizer(self, model: Any, optimizer: torch.optim.Optimizer | None, step: int) -> None:
        if step >= self.densify_until_iter:
            return
        if step > self.densify_from_iter and self.densification_interval > 0 and step % self.densification_interval == 0:
            self.densify_and_prune(model, optimizer, step)
        if self.opacity_reset_interval > 0 and step > 0 and step % self.opacity_reset_interval == 0:
            self.reset_opacity(model, optimizer)

    # -- operations (public so tests and systems may call them directly) --------------------------

    @torch.no_grad()
    def densify_and_prune(self, model: Any, optimizer: torch.optim.Optimizer | None, step: int) -> None:
        if not self._stats_ok(model):
            self.reset_stats(model)
        self.densify(model, optimizer)
        after_reset = self.opacity_reset_interval <= 0 or step > self.opacity_reset_interval
        self.prune(model, optimizer, screen_and_world=after_reset)
        self.reset_stats(model)

    @torch.no_grad()
    def densify(self, model: Any, optimizer: torch.optim.Optimizer | None) -> None:
        """Clone small and split large Gaussians whose mean view-space gradient is above the threshold."""
        n = model.xyz.shape[0]
        grads = self.grad_accum / self.denom.clamp_min(1.0)  # [N]
        max_scale = model.get_scaling.max(dim=1).values
        cand = grads >= self.densify_grad_threshold
        small = max_scale <= self.percent_dense * self.densify_extent
        clone, split = cand & small, cand & ~small
        budget = self.max_num - n
        cost = clone.long() + split.long() * (self.split_n - 1)
        if int(cost.sum()) > budget:
            # Over the cap: keep the candidates with the largest gradients that fit.
            order = torch.argsort(torch.where(cand, grads, torch.full_like(grads, -1.0)), descending=True)
            fits = torch.cumsum(cost[order], 0) <= max(budget, 0)
            chosen = torch.zeros_like(cand)
            chosen[order[fits]] = True
            clone, split = clone & chosen, split & chosen
        if not (clone.any() or split.any()):
            return
        ns = self.split_n
        extra: dict[str, Tensor] = {}
        s_split = model.get_scaling[split]  # [S, 3]
        rots = quat_to_rotmat(model.rotation[split])  # [S, 3, 3]
        offs = torch.randn(ns, *s_split.shape, device=s_split.device) * s_split[None]  # [ns, S, 3]
        new_xyz = (rots[None] @ offs[..., None]).squeeze(-1) + model.xyz[split][None]
        for name in PARAM_NAMES:
            p = getattr(model, name).detach()
            if name == "xyz":
                child = new_xyz.reshape(-1, 3)
            elif name == "scaling":
                child = torch.log(s_split / (0.8 * ns)).repeat(ns, 1)
            else:
                child = p[split].repeat(ns, *([1] * (p.ndim - 1)))
            extra[name] = torch.cat([p[clone], child], 0)
        keep = ~split
        radii_keep = self.max_radii[keep]
        n_new = extra["xyz"].shape[0]
        append_rows(model, optimizer, extra, keep=keep)
        # New Gaussians start with no statistics; the survivors keep theirs for the prune below.
        self.max_radii = torch.cat([radii_keep, self.max_radii.new_zeros(n_new)])
        self.grad_accum = self.grad_accum.new_zeros(model.xyz.shape[0])
        self.denom = self.denom.new_zeros(model.xyz.shape[0])

    @torch.no_grad()
    def prune(self, model: Any, optimizer: torch.optim.Optimizer | None, screen_and_world: bool = True) -> None:
        """Remove nearly transparent Gaussians and, when asked, those too large on screen or in the world."""
        if not self._stats_ok(model):
            self.reset_stats(model)
        op = model.get_opacity.squeeze(-1)
        bad = op < self.prune_opacity_threshold
        if screen_and_world:
            if self.max_screen_size > 0:
                bad |= self.max_radii > self.max_screen_size
            if self.prune_world_size > 0:
                bad |= model.get_scaling.max(dim=1).values > self.prune_world_size * self.densify_extent
        if bad.all():
            bad[op.argmax()] = False  # an empty set cannot be trained back; keep the most opaque
        if bad.any():
            keep = ~bad
            self.max_radii = self.max_radii[keep]
            self.grad_accum = self.grad_accum[keep]
            self.denom = self.denom[keep]
            keep_rows(model, optimizer, keep)

    @torch.no_grad()
    def reset_opacity(self, model: Any, optimizer: torch.optim.Optimizer | None) -> None:
        """Clamp opacities to ``opacity_reset_value`` and zero their optimizer state."""
        v = torch.tensor(self.opacity_reset_value, device=model.opacity.device)
        ceiling = torch.log(v / (1 - v))
        update_params(model, optimizer, lambda n, t: torch.minimum(t, ceiling), lambda n, s: torch.zeros_like(s),
                      names=("opacity",))


__all__ = [
    "PARAM_NAMES",
    "STRATEGIES",
    "register_strategy",
    "build_strategy",
    "replace_in_optimizer",
    "update_params",
    "keep_rows",
    "append_rows",
    "NoStrategy",
    "DefaultStrategy",
]
