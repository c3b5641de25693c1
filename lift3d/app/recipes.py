"""Which recipes can run on this machine, for the web app's picker.

Toy-world recipes (``configs/tiny/*.yaml``) run anywhere: their priors ship with lift3d. A
real-weight recipe (``configs/*.yaml``) runs only when its weights are on this machine; that is
decided by the launcher's own start-up check (:meth:`lift3d.systems.base.BaseSystem.check_weights`,
which resolves every guidance's and prompt processor's weights through :mod:`lift3d.utils.hub`:
a local folder or the Hugging Face cache, never the network). Its message, the one ``launch.py``
prints, is kept to show next to the recipe.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

#: The toy recipe the picker selects first: the fastest to a good mesh (README, "Recipes").
DEFAULT_RECIPE = "tiny/dreamgaussian"
#: Image recipes interpolate ``${image}``; reading their facts (and checking their weights, which comes
#: before any image is read) needs some value there.
PLACEHOLDER_IMAGE = "image=input.png"


@dataclass
class Recipe:
    key: str
    """``tiny/dreamgaussian`` or ``magic3d``: the config's path under the configs folder, without ``.yaml``."""
    path: Path
    toy: bool
    description: str = ""
    needs_image: bool = False
    stage_steps: list[int] = field(default_factory=list)
    """Each stage's steps (empty: no stages, ``trainer.max_steps`` decides)."""
    max_steps: int = 0
    """Total optimizer steps of the recipe as written."""
    val_check_interval: Optional[int] = None
    guidance_scale: Optional[float] = None
    """``system.guidance.guidance_scale`` as the recipe sets it (None: the guidance has no such key)."""
    ref_camera: Optional[tuple[float, float]] = None
    """(elevation, azimuth) in degrees of the input image's camera (``data.ref_*_deg``), for image recipes
    that take it."""
    gaussian_ply: bool = False
    """The model at export time is 3D Gaussians, exported by the mesh exporter: the page asks it for the
    3DGS PLY too (``system.exporter.save_gaussian_ply=true``) when the recipe does not already."""
    missing: Optional[str] = None
    """The launcher's missing-weights message; None when the weights were found (or are toy ones)."""
    checked: bool = False
    """Whether the weights were looked for yet (toy recipes: always)."""
    error: Optional[str] = None
    """A config that cannot even be read (an ``error:`` line as the launcher prints it)."""

    @property
    def runnable(self) -> bool:
        return self.error is None and self.missing is None and (self.toy or self.checked)

    @property
    def missing_ids(self) -> list[str]:
        """The weight ids or paths the missing-weights message names (``stabilityai/stable-diffusion-2-1-base``)."""
        return re.findall(r"= '([^']+)'", self.missing or "")

    def label(self) -> str:
        kind = "image" if self.needs_image else "text"
        if self.error is not None:
            state = "cannot be read"
        elif self.toy:
            state = "toy-world prior"
        elif not self.checked:
            state = "checking weights..."
        elif self.missing:
            state = "missing " + (", ".join(self.missing_ids) or "weights")
        else:
            state = "weights found"
        return f"{self.key} ({kind}, {self.max_steps} steps; {state})"


def _read(path: Path, key: str, toy: bool) -> Recipe:
    """The recipe's facts as the launcher's config loader reads them (no module is built)."""
    from lift3d.config import ConfigError
    from lift3d.launch import load_experiment

    from omegaconf import OmegaConf

    r = Recipe(key=key, path=path, toy=toy, checked=toy)
    try:
        cfg, raw, _ = load_experiment(str(path), [PLACEHOLDER_IMAGE])
    except ConfigError as exc:
        r.error = f"error: {exc}"
        return r
    r.description = cfg.description
    r.needs_image = "${image}" in OmegaConf.to_yaml(raw, resolve=False)
    stages = cfg.system.get("stages") or []
    r.stage_steps = [int(s.get("steps", 0)) for s in stages if isinstance(s, dict)]
    r.max_steps = sum(r.stage_steps) if r.stage_steps else int(cfg.trainer.max_steps)
    r.val_check_interval = cfg.trainer.val_check_interval
    if r.needs_image and "ref_elevation_deg" in cfg.data and "ref_azimuth_deg" in cfg.data:
        r.ref_camera = (float(cfg.data["ref_elevation_deg"]), float(cfg.data["ref_azimuth_deg"]))
    geometry = cfg.system.get("geometry_type")
    for st in stages:
        if isinstance(st, dict):
            geometry = st.get("geometry_type", geometry)
    exporter = cfg.system.get("exporter") or {}
    r.gaussian_ply = (geometry == "gaussian-splatting" and cfg.system.get("exporter_type") == "mesh-exporter"
                      and not (isinstance(exporter, dict) and exporter.get("save_gaussian_ply")))
    guidance = cfg.system.get("guidance") or {}
    gs = guidance.get("guidance_scale") if isinstance(guidance, dict) else None
    r.guidance_scale = float(gs) if isinstance(gs, (int, float)) else None
    return r


def check_weights(recipe: Recipe) -> Recipe:
    """Fill ``recipe.missing`` with the launcher's own check: build the system as ``launch.py`` does and
    ask it (:meth:`check_weights`). Nothing is downloaded."""
    from lift3d.config import ConfigError
    from lift3d.launch import REPO_ROOT, load_experiment
    from lift3d.registry import RegistryError, find, load_plugins
    from lift3d.utils.hub import MissingWeightsError

    try:
        for root in sorted({Path.cwd().resolve(), REPO_ROOT}):
            load_plugins(root)
        cfg, _, prov = load_experiment(str(recipe.path), [PLACEHOLDER_IMAGE])
        system = find(cfg.system_type, "system")(cfg.system, cfg_key="system", prov=prov, seed=cfg.seed)
        system.check_weights()
        recipe.missing = None
    except MissingWeightsError as exc:
        recipe.missing = f"error: {exc}"
    except (ConfigError, RegistryError) as exc:
        recipe.error = f"error: {exc}"
    except Exception as exc:  # a plugin or module that fails to build: show it, keep the page up
        recipe.error = f"error: {type(exc).__name__}: {exc}"
    recipe.checked = True
    return recipe


class RecipeBook:
    """The recipes under ``configs_dir``: toy ones at once, real-weight ones checked in the background."""

    def __init__(self, configs_dir: str | Path, check_real: bool = True):
        self.configs_dir = Path(configs_dir).resolve()
        self._lock = threading.Lock()
        self.recipes: dict[str, Recipe] = {}
        tiny = sorted((self.configs_dir / "tiny").glob("*.yaml"))
        real = sorted(self.configs_dir.glob("*.yaml"))
        for path in tiny:
            r = _read(path, f"tiny/{path.stem}", toy=True)
            self.recipes[r.key] = r
        for path in real:
            r = _read(path, path.stem, toy=False)
            self.recipes[r.key] = r
        self._thread: Optional[threading.Thread] = None
        if check_real:
            self._thread = threading.Thread(target=self._check_all, name="lift3d-weights", daemon=True)
            self._thread.start()

    def _check_all(self) -> None:
        for r in list(self.recipes.values()):
            if not r.toy and r.error is None and not r.checked:
                check_weights(r)

    def wait(self, timeout: Optional[float] = None) -> None:
        """Until every real-weight recipe has been checked (tests, and a page that must list them all)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def ordered(self) -> list[Recipe]:
        """The default first, then the other toy recipes, then the real-weight ones (runnable before missing)."""
        rs = list(self.recipes.values())
        return sorted(rs, key=lambda r: (r.key != DEFAULT_RECIPE, not r.toy, not r.runnable, r.key))

    def get(self, key: str) -> Recipe:
        if key not in self.recipes:
            raise KeyError(f"no recipe {key!r}; known: {', '.join(self.recipes)}")
        return self.recipes[key]


def step_overrides(recipe: Recipe, steps: int) -> list[str]:
    """Overrides that make ``recipe`` run ``steps`` optimizer steps in all.

    A staged recipe keeps its stages, each scaled in proportion (at least one step each; the last
    takes the rounding); validation is scaled the same way so the page still gets its grids.
    Schedules keep their step numbers.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    out: list[str] = []
    total = recipe.max_steps or steps
    if recipe.stage_steps:
        n = len(recipe.stage_steps)
        steps = max(steps, n)
        new = [max(1, round(s * steps / total)) for s in recipe.stage_steps[:-1]]
        while sum(new) > steps - 1:  # keep one step at least for the last stage
            i = max(range(len(new)), key=lambda k: new[k])
            new[i] -= 1
        new.append(steps - sum(new))
        out += [f"system.stages.{i}.steps={s}" for i, s in enumerate(new)]
    out.append(f"trainer.max_steps={steps}")
    if recipe.val_check_interval:
        out.append(f"trainer.val_check_interval={max(1, round(recipe.val_check_interval * steps / total))}")
    return out
