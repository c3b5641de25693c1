"""Configs: YAML with ``extends:`` inheritance, CLI overrides, strict typed parsing, schedules.

A config file is YAML read by omegaconf (so ``${a.b}`` interpolation and the resolvers below
work). ``extends: base.yaml`` (or a list) merges the named files first, paths relative to the
file that names them; command-line ``key=value`` overrides come last. A file or the command line
that names a different ``<slot>_type`` starts ``<slot>`` afresh instead of merging into the
inherited one (see "Layers" below). Every registered class nests a ``Config`` dataclass;
:func:`parse_structured` turns a mapping into it strictly: an unknown key or a wrong type is a
:class:`ConfigError` that names the key path, the file that set it, and what would be valid.

Any field annotated :data:`Scheduled` (or :data:`ScheduledInt`) may be a number or a schedule of
the global step:

* ``[start_step, start_value, end_value, end_step]``: constant, then linear, then constant;
* ``[[step0, value0], [step1, value1], ...]``: piecewise linear through the points;
* ``{points: [[step, value], ...], interp: linear | step | exp}``: ``step`` holds each value
  until the next point, ``exp`` interpolates geometrically (learning rates).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from omegaconf import DictConfig, ListConfig, OmegaConf

CLI_SOURCE = "the command line"


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key, the file and what is valid."""


# ---------------------------------------------------------------------------------------------
# Resolvers recipes use inside ${...}


def _register_resolvers() -> None:
    resolvers = {
        "add": lambda a, b: a + b,
        "sub": lambda a, b: a - b,
        "mul": lambda a, b: a * b,
        "div": lambda a, b: a / b,
        "idiv": lambda a, b: a // b,
        "min": lambda a, b: min(a, b),
        "max": lambda a, b: max(a, b),
        # rate r such that lr * r**n == lr * factor, for ExponentialLR over n steps
        "exp_decay_rate": lambda factor, n: factor ** (1.0 / n),
        "basename": lambda p: Path(p).name,
        "rmspace": lambda s, sub="_": str(s).replace(" ", sub),
    }
    register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            register(name, fn)


_register_resolvers()


# ---------------------------------------------------------------------------------------------
# Schedules


class Scheduled(float):
    """Annotation marker: a float field that may also be a schedule of the global step."""


class ScheduledInt(int):
    """Annotation marker: an int field that may also be a schedule (values are rounded)."""


class Schedule:
    """A value that changes with the global step (see the module docstring for the YAML forms)."""

    INTERPS = ("linear", "step", "exp")

    def __init__(self, points: list[tuple[int, float]], interp: str = "linear", integer: bool = False):
        if interp not in self.INTERPS:
            raise ConfigError(f"schedule interp {interp!r} is not one of {', '.join(self.INTERPS)}")
        if not points:
            raise ConfigError("a schedule needs at least one [step, value] point")
        steps = [p[0] for p in points]
        if any(b < a for a, b in zip(steps, steps[1:])):
            raise ConfigError(f"schedule steps must not decrease: {steps}")
        if interp == "exp" and any(v <= 0 for _, v in points):
            raise ConfigError("an 'exp' schedule needs positive values")
        self.points = [(int(s), float(v)) for s, v in points]
        self.interp = interp
        self.integer = integer

    def __call__(self, step: int) -> float:
        pts = self.points
        if step <= pts[0][0]:
            v = pts[0][1]
        elif step >= pts[-1][0]:
            v = pts[-1][1]
        else:
            for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
                if s0 <= step < s1:
                    break
            t = (step - s0) / max(s1 - s0, 1)
            if self.interp == "step":
                v = v0
            elif self.interp == "exp":
                v = math.exp(math.log(v0) + t * (math.log(v1) - math.log(v0)))
            else:
                v = v0 + t * (v1 - v0)
        return int(round(v)) if self.integer else v

    def to_yaml(self) -> Any:
        return {"points": [list(p) for p in self.points], "interp": self.interp}

    def __repr__(self) -> str:
        return f"Schedule({self.points}, interp={self.interp!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and (self.points, self.interp) == (other.points, other.interp)

    @classmethod
    def parse(cls, value: Any, integer: bool = False) -> "float | int | Schedule":
        """A number stays a number; the list and dict forms become a Schedule. Raises ValueError."""
        num = (int, float)
        if isinstance(value, bool):
            raise ValueError("expected a number or a schedule, got a bool")
        if isinstance(value, num):
            return int(value) if integer else float(value)
        if isinstance(value, Schedule):
            return value
        interp = "linear"
        if isinstance(value, dict):
            extra = set(value) - {"points", "interp"}
            if extra or "points" not in value:
                raise ValueError("a schedule mapping has keys 'points' (list of [step, value]) and 'interp'")
            interp = value.get("interp", "linear")
            value = value["points"]
        if isinstance(value, (list, tuple)):
            if len(value) == 4 and all(isinstance(v, num) and not isinstance(v, bool) for v in value):
                s0, v0, v1, s1 = value
                if s1 < s0:
                    raise ValueError(f"schedule [start_step, start_value, end_value, end_step] has end < start: {value}")
                return cls([(s0, v0), (s1, v1)], interp, integer)
            if value and all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, num) for x in p) for p in value
            ):
                return cls([tuple(p) for p in value], interp, integer)
        raise ValueError(
            "expected a number or a schedule: [start_step, start_value, end_value, end_step], "
            "[[step, value], ...] or {points: [[step, value], ...], interp: linear|step|exp}"
        )


def C(value: Any, global_step: int) -> Any:
    """The value of a (possibly scheduled) config field at ``global_step``."""
    return value(global_step) if isinstance(value, Schedule) else value


# ---------------------------------------------------------------------------------------------
# Loading YAML with provenance


class Provenance:
    """Which file set each key path; longest-prefix lookup so errors can name the file."""

    def __init__(self) -> None:
        self._src: dict[str, str] = {}
        self._via: dict[str, str] = {}  # key -> the key its value interpolates (``prompt: ${prompt}``)

    def record(self, node: Any, source: str, prefix: str = "", leaves_only: bool = False) -> None:
        """Note ``source`` for every key path in ``node``; with ``leaves_only`` (command-line
        overrides) the dicts on the way keep the file that made them."""
        is_dict = isinstance(node, (dict, DictConfig))
        if prefix and not (leaves_only and is_dict):
            self._src[prefix] = source
        if is_dict:
            for k, v in node.items():
                self.record(v, source, f"{prefix}.{k}" if prefix else str(k), leaves_only)

    def forget(self, key_path: str) -> None:
        """Drop what is known about ``key_path`` and everything under it (a slot started afresh)."""
        key_path = _dotted(key_path)
        for k in [k for k in self._src if k == key_path or k.startswith(key_path + ".")]:
            del self._src[k]

    def set(self, key_path: str, source: str) -> None:
        self._src[_dotted(key_path)] = source

    def update(self, other: "Provenance") -> None:
        """Take ``other``'s entries over these (``other`` is a later layer)."""
        self._src.update(other._src)

    def source(self, key_path: str) -> str | None:
        # File-set list items (stages[1]) are recorded at the list's key, command-line ones at
        # their index (stages.1), which the longest-prefix walk reaches either way.
        parts = _dotted(key_path).split(".")
        for n in range(len(parts), 0, -1):
            src = self._src.get(".".join(parts[:n]))
            if src is not None:
                return src
        return None

    def describe(self, key_path: str) -> str:
        src = self.source(key_path)
        via = self._via.get(_dotted(key_path))
        if src and via is not None:  # ``prompt: ${prompt}``: name where the value itself came from
            target_src = self.source(via)
            if target_src and target_src != src:
                return f" (set in {src} to ${{{via}}}, which is set in {target_src})"
        return f" (set in {src})" if src else ""

    def note_interpolations(self, cfg: Any, prefix: str = "") -> None:
        """Remember keys whose value is exactly ``${other.key}``, so errors can follow them."""
        if isinstance(cfg, DictConfig):
            items = [(str(k), cfg._get_node(k)) for k in cfg.keys()]
        elif isinstance(cfg, ListConfig):
            items = [(str(i), cfg._get_node(i)) for i in range(len(cfg))]
        else:
            return
        for k, node in items:
            path = f"{prefix}.{k}" if prefix else k
            if isinstance(node, (DictConfig, ListConfig)):
                self.note_interpolations(node, path)
                continue
            raw = node._value() if hasattr(node, "_value") else None
            m = re.fullmatch(r"\$\{([A-Za-z_][\w.]*)\}", raw) if isinstance(raw, str) else None
            if m:
                self._via[path] = m.group(1)


def _dotted(key_path: str) -> str:
    """``stages[1].geometry`` -> ``stages.1.geometry``: one spelling for list indices."""
    return re.sub(r"\[(\d+)\]", r".\1", key_path)


# ---------------------------------------------------------------------------------------------
# Layers, and a slot whose type a later layer changes
#
# A config is a stack of layers: the files of an ``extends`` chain, bases first (a list of bases
# in its order), then the file itself, then the command line. Layers merge key by key, with one
# exception, the rule Hydra users know from config groups: a ``<slot>_type`` key names which
# class reads the ``<slot>`` mapping beside it, so when a later layer names a different type than
# the layers below it, the inherited ``<slot>`` settings are dropped and the slot starts from the
# later layer's own ``<slot>:`` block (or from empty). Settings written for one guidance would
# otherwise land in another's strict Config as unknown keys. Naming the same type again keeps them,
# and a ``null`` type (a stage that inherits) names nothing, so it keeps them too. The rule holds for
# every pair at any depth (``data_type``/``data``, ``system_type``/``system``, the system's slots,
# ``system.guidances.<name>.guidance_type``/``guidance``, inside a stage), and the command line counts
# as one layer: ``system.guidance_type=X`` clears the inherited ``system.guidance`` whatever order the
# overrides come in, and ``system.guidance.k=v`` / ``system.guidance={...}`` then fill it.


def _slot_of(key: Any) -> str | None:
    """``guidance`` for ``guidance_type``; None for a key that is not a type key."""
    if isinstance(key, str) and key.endswith("_type") and len(key) > len("_type"):
        return key[: -len("_type")]
    return None


def _select(cfg: DictConfig, key: str) -> Any:
    """The resolved value at ``key``, or a sentinel when it cannot be resolved here."""
    try:
        return OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
    except Exception:  # an interpolation that a later layer completes
        return _UNRESOLVED


_UNRESOLVED = object()


def _type_changed(old: Any, new: Any, key: str, before: DictConfig, after: Any) -> bool:
    """Whether a layer that writes ``new`` at type key ``key`` changes the type ``old`` below it.

    ``after`` (the config with the layer applied, or a function making it) is only needed when
    one side is an interpolation: then the resolved values are compared.
    """
    if old is None or new is None or old == new:
        return False
    if any(isinstance(v, str) and "${" in v for v in (old, new)):
        after_cfg = after() if callable(after) else after
        old_v, new_v = _select(before, key), _select(after_cfg, key)
        if old_v is not _UNRESOLVED and new_v is not _UNRESOLVED:
            return old_v is not None and new_v is not None and old_v != new_v
    return True


def _child(node: Any, key: Any) -> Any:
    """``node[key]`` in plain data; a list is indexed by a digit key (``stages.1`` on the command line)."""
    if isinstance(node, dict):
        return node.get(key)
    if isinstance(node, list) and str(key).isdigit() and int(key) < len(node):
        return node[int(key)]
    return None


def _retyped_slots(base: Any, layer: dict, before: DictConfig, after: Any, prefix: str = "") -> list[str]:
    """Key paths of the ``<slot>`` mappings in ``base`` whose ``<slot>_type`` ``layer`` changes
    (``base`` and ``layer`` are plain data; outer slots come first and hide the ones inside)."""
    found = []
    for k, v in layer.items():
        slot = _slot_of(k)
        path = f"{prefix}.{k}" if prefix else str(k)
        if slot is not None and isinstance(base, dict) and k in base and isinstance(base.get(slot), dict) \
                and _type_changed(base[k], v, path, before, after):
            found.append(f"{prefix}.{slot}" if prefix else slot)
    for k, v in layer.items():
        path = f"{prefix}.{k}" if prefix else str(k)
        sub = _child(base, k)
        if isinstance(v, dict) and isinstance(sub, (dict, list)) and path not in found:
            found += _retyped_slots(sub, v, before, after, path)
    return found


def _clear_slots(data: Any, paths: list[str]) -> None:
    """Set each ``<slot>`` at ``paths`` (found by :func:`_retyped_slots`) to an empty mapping."""
    for path in paths:
        *parents, slot = path.split(".")
        node = data
        for part in parents:
            node = _child(node, part)
        node[slot] = {}


def _merge_layer(base: DictConfig, base_prov: Provenance, layer: DictConfig,
                 layer_prov: Provenance) -> tuple[DictConfig, Provenance]:
    """``layer`` over ``base``, slots it retypes started afresh; provenance follows the same rule."""
    base_data = OmegaConf.to_container(base, resolve=False)
    layer_data = OmegaConf.to_container(layer, resolve=False)
    resets = _retyped_slots(base_data, layer_data, base, lambda: OmegaConf.merge(base, layer))  # type: ignore[arg-type]
    _clear_slots(base_data, resets)
    for path in resets:
        base_prov.forget(path)
        base_prov.set(path, layer_prov.source(f"{path}_type") or "")
    base_prov.update(layer_prov)
    merged = OmegaConf.merge(OmegaConf.create(base_data), layer) if resets else OmegaConf.merge(base, layer)
    return merged, base_prov  # type: ignore[return-value]


def _load_file(path: Path, chain: tuple[Path, ...]) -> tuple[DictConfig, Provenance]:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in chain + (path,))
        raise ConfigError(f"config 'extends' makes a cycle: {cycle}")
    if not path.is_file():
        who = f" (named by 'extends' in {chain[-1]})" if chain else ""
        raise ConfigError(f"config file {path} does not exist{who}")
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml errors carry line numbers; keep them
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(node, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at the top, got a list")
    ext = node.pop("extends", None) if "extends" in node else None
    merged: DictConfig = OmegaConf.create({})
    prov = Provenance()
    if ext is not None:
        bases = [ext] if isinstance(ext, str) else list(ext) if isinstance(ext, ListConfig) else None
        if bases is None or not all(isinstance(b, str) for b in bases):
            raise ConfigError(f"'extends' in {path} must be a file path or a list of paths, got {ext!r}")
        for base in bases:
            merged, prov = _merge_layer(merged, prov, *_load_file(path.parent / base, chain + (path,)))
    own = Provenance()
    own.record(OmegaConf.to_container(node, resolve=False), str(path))
    return _merge_layer(merged, prov, node, own)


# Shorthand CLI keys that set a top-level field (the recipe interpolates them where needed).
SHORTHANDS = ("prompt", "image", "tag", "seed", "resume", "exp_root_dir", "name")


def parse_overrides(overrides: list[str]) -> DictConfig:
    """``a.b.c=value`` strings to a config; values are parsed as YAML (``x=1e-3``, ``l=[1,2]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command-line override {item!r} must look like key=value (e.g. prompt=\"a red cube\")")
        key = item.split("=", 1)[0]
        if not key or key.startswith(".") or key.endswith("."):
            raise ConfigError(f"command-line override {item!r} has an empty key")
    return OmegaConf.from_dotlist(list(overrides))


def load_config(path: str | Path, overrides: list[str] | None = None) -> tuple[DictConfig, Provenance]:
    """Load ``path`` with its ``extends`` chain and apply ``key=value`` overrides (unresolved).

    Each later layer that names a different ``<slot>_type`` starts ``<slot>`` afresh (see
    :func:`_merge_layer`); the overrides are one layer.
    """
    cfg, prov = _load_file(Path(path), ())
    if overrides:
        # A shell turns prompt="" into `prompt=`, which YAML reads as null: for the prompt (a string
        # always) it means the empty prompt, as written.
        overrides = ["prompt=''" if o == "prompt=" else o for o in overrides]
        cli = parse_overrides(overrides)
        values = [(item.split("=", 1)[0], _override_value(item)) for item in overrides]

        def with_overrides() -> DictConfig:  # only asked for when a type is an interpolation
            trial = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
            for key, value in values:
                _apply_override(trial, key, value)  # type: ignore[arg-type]
            return trial  # type: ignore[return-value]

        data = OmegaConf.to_container(cfg, resolve=False)
        resets = _retyped_slots(data, OmegaConf.to_container(cli, resolve=False), cfg, with_overrides)
        if resets:
            _clear_slots(data, resets)
            cfg = OmegaConf.create(data)
        for slot_path in resets:
            prov.forget(slot_path)
            prov.set(slot_path, CLI_SOURCE)
        for key, value in values:
            _apply_override(cfg, key, value)
        prov.record(OmegaConf.to_container(cli, resolve=False), CLI_SOURCE, leaves_only=True)
    return cfg, prov


def _override_value(item: str) -> Any:
    """The value of ``key=value``, parsed as YAML the way ``from_dotlist`` does."""
    return OmegaConf.to_container(OmegaConf.from_dotlist([f"v={item.split('=', 1)[1]}"]), resolve=False)["v"]


def _apply_override(cfg: DictConfig, key: str, value: Any) -> None:
    """Set ``key`` to ``value``, merging dicts into dicts. A part of ``key`` that meets a list is its
    index (``system.stages.1.steps=300``); an index past the end is an error naming the list."""
    parts = key.split(".")
    node: Any = cfg
    for i, part in enumerate(parts):
        if isinstance(node, ListConfig):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"command-line override {key!r}: {'.'.join(parts[:i])} is a list of {len(node)} "
                                  f"items, so the part after it must be an index 0..{len(node) - 1}, not {part!r}")
            node = node._get_node(int(part))
        elif isinstance(node, DictConfig) and part in node:
            node = node._get_node(part)
        else:
            digits = [j for j in range(i, len(parts)) if parts[j].isdigit()]
            if digits:  # an index into a list no layer made: OmegaConf would make a dict {'0': ...}
                j = digits[0]
                raise ConfigError(
                    f"command-line override {key!r}: {'.'.join(parts[:j])!r} is not set in the config, so "
                    f"there is no list whose item {parts[j]} it could change; set the whole list instead "
                    f"(e.g. {'.'.join(parts[:j])}=[{{...}}, {{...}}])")
            break
    OmegaConf.update(cfg, key, value, merge=True)


def resolve(cfg: DictConfig, prov: Provenance | None = None) -> dict:
    """Resolve interpolations into a plain dict, turning resolver errors into ConfigErrors."""
    if prov is not None:
        prov.note_interpolations(cfg)
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except Exception as exc:
        key = getattr(exc, "full_key", "") or ""
        where = prov.describe(key) if (prov and key) else ""
        raise ConfigError(f"cannot resolve config key '{key}'{where}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Strict parsing into dataclasses


def _type_name(tp: Any) -> str:
    if tp is Scheduled:
        return "number or schedule"
    if tp is ScheduledInt:
        return "integer or schedule"
    if tp is Any:
        return "any"
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple, dict):
        args = ", ".join(_type_name(a) for a in typing.get_args(tp) if a is not Ellipsis)
        return f"{origin.__name__}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _valid_keys_msg(cls: type, bad: str) -> str:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(bad, names, n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{hint} Valid keys: {', '.join(names) if names else '(none)'}."


# A Config lists old key names in ``renamed_keys: ClassVar[dict[str, str]]`` ({old: new}); an old key
# is then an error naming the new key, its values and the file, not only "unknown key".


def _renamed_values_hint(config_cls: type, field_name: str) -> tuple[str, tuple[Any, ...]]:
    try:
        tp = typing.get_type_hints(config_cls).get(field_name)
    except Exception:  # an unresolvable annotation must not hide the real error
        return "", ()
    if typing.get_origin(tp) is Literal:
        vals = typing.get_args(tp)
        return " (one of " + ", ".join(repr(v) for v in vals) + ")", vals
    return "", ()


def check_renamed_keys(config_cls: type, cfg: Any, key: str = "", prov: Provenance | None = None,
                       owner: str = "") -> None:
    """Raise :class:`ConfigError` when mapping ``cfg`` uses a key that ``config_cls`` renamed."""
    renamed: dict[str, str] = getattr(config_cls, "renamed_keys", None) or {}
    if not renamed or cfg is None or isinstance(cfg, config_cls) or not hasattr(cfg, "keys"):
        return
    for old in list(cfg.keys()):
        if old not in renamed:
            continue
        new = renamed[old]
        sub = f"{key}.{old}" if key else str(old)
        where = prov.describe(sub) if prov else ""
        what = f" for {owner}" if owner else ""
        hint, values = _renamed_values_hint(config_cls, new)
        value = cfg[old]
        fix = f"write '{new}: {value}'" if value in values else f"use '{new}'"
        raise ConfigError(f"config key '{sub}'{where}{what} was renamed to '{new}'; {fix}{hint}.")


def parse_structured(cls: type, cfg: Any, *, key: str = "", prov: Provenance | None = None, owner: str = "") -> Any:
    """Build dataclass ``cls`` from ``cfg`` (mapping or None), strictly.

    ``key`` is the key path of ``cfg`` in the whole config, for error messages; ``owner``
    names what the config belongs to (a registry name), also for messages.
    """
    if isinstance(cfg, cls):
        return cfg
    if isinstance(cfg, (DictConfig, ListConfig)):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if cfg is None:
        cfg = {}
    check_renamed_keys(cls, cfg, key, prov, owner)
    return _convert(cls, cfg, key, prov, owner)


def _convert(tp: Any, value: Any, key: str, prov: Provenance | None, owner: str) -> Any:
    where = prov.describe(key) if prov else ""

    def fail(expected: str) -> ConfigError:
        return ConfigError(
            f"config key '{key or '<root>'}'{where}: expected {expected}, got {value!r} ({type(value).__name__})"
        )

    if tp is Any or tp is object:
        return value
    if tp is Scheduled or tp is ScheduledInt:
        try:
            return Schedule.parse(value, integer=tp is ScheduledInt)
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"config key '{key}'{where}: {exc}; got {value!r}") from None
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise fail(f"a mapping of {tp.__qualname__} fields")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        kwargs = {}
        for k, v in value.items():
            sub = f"{key}.{k}" if key else str(k)
            if k not in fields:
                what = f" for {owner}" if owner else ""
                raise ConfigError(
                    f"unknown config key '{sub}'{prov.describe(sub) if prov else ''}{what}."
                    + _valid_keys_msg(tp, str(k))
                )
            kwargs[k] = _convert(hints[k], v, sub, prov, owner)
        missing = [
            n
            for n, f in fields.items()
            if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ConfigError(
                f"config '{key or '<root>'}'{where} is missing required key(s): {', '.join(missing)}"
                + (f" for {owner}" if owner else "")
            )
        return tp(**kwargs)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, key, prov, owner)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise fail(_type_name(tp))
    if origin is Literal:
        if value in args:
            return value
        raise fail(_type_name(tp))
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise fail(_type_name(tp))
        item = args[0] if args else Any
        return [_convert(item, v, f"{key}[{i}]", prov, owner) for i, v in enumerate(value)]
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise fail(_type_name(tp))
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]", prov, owner) for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise fail(f"{len(args)} items: {_type_name(tp)}")
        its = args or [Any] * len(value)
        return tuple(_convert(a, v, f"{key}[{i}]", prov, owner) for i, (a, v) in enumerate(zip(its, value)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise fail("a mapping")
        vt = args[1] if len(args) == 2 else Any
        return {k: _convert(vt, v, f"{key}.{k}", prov, owner) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise fail("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail("a string")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise fail(_type_name(tp))


def to_yaml_data(obj: Any) -> Any:
    """A parsed config (dataclasses, schedules) back into plain YAML-able data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_yaml_data(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Schedule):
        return obj.to_yaml()
    if isinstance(obj, dict):
        return {k: to_yaml_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_yaml_data(v) for v in obj]
    return obj


def merge_dicts(base: dict | None, over: dict | None) -> dict:
    """Recursive merge of plain dicts (``over`` wins); neither argument is changed."""
    out = dict(base or {})
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = v
    return out

