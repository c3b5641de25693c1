"""Training recipes: the chain of runs that makes a set of weights, as one resumable command.

A recipe is a YAML file with ``common`` (TrainConfig keys every stage shares) and ``stages`` (a
list of named TrainConfig overrides). Stage ``k`` starts from stage ``k - 1``'s final weights, so
``python -m lift3d.priors.toyworld train`` runs the packaged ``recipe.yaml`` (the shipped weights'
recipe) from scratch to the end. Each stage trains in ``{out_dir}/{stage name}``; run the same
command again after an interruption and finished stages are skipped, the interrupted one resumes
from its checkpoint. ``recipe_log.csv`` in ``out_dir`` records each stage's steps and wall time.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from lift3d.config import ConfigError, merge_dicts

PACKAGED_RECIPE = Path(__file__).with_name("recipe.yaml")
FINAL_NAME = "toyworld.safetensors"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# keys the chain sets itself: a stage's out_dir is {out_dir}/{name}, its init_from the previous stage
_CHAIN_KEYS = ("out_dir", "init_from")


def read_recipe(source: str | Path | dict | None, packaged: Path, expected: str) -> tuple[dict[str, Any], str]:
    """(the mapping, where it came from) of a recipe given as a YAML path, an already-parsed mapping or
    None (the ``packaged`` file); anything but a mapping fails, the message naming what was ``expected``."""
    from omegaconf import OmegaConf

    where = "recipe"
    if source is None or isinstance(source, (str, Path)):
        path = Path(source) if source is not None else packaged
        if not path.is_file():
            raise ConfigError(f"recipe file {path} does not exist (the packaged one: {packaged})")
        where = str(path)
        source = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(source, dict):
        raise ConfigError(f"{where}: expected {expected}, got {type(source).__name__}")
    return source, where


def load_recipe(source: str | Path | dict | None = None) -> dict[str, Any]:
    """The recipe at ``source`` (a YAML path, an already-parsed mapping, or None: the packaged one),
    checked: ``stages`` is a non-empty list of mappings with unique, path-safe names."""
    source, where = read_recipe(source, PACKAGED_RECIPE, "a mapping with 'common' and 'stages'")
    unknown = sorted(set(source) - {"common", "stages", "description"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid: common, description, stages")
    common = source.get("common") or {}
    stages = source.get("stages")
    if not isinstance(common, dict):
        raise ConfigError(f"{where}: 'common' must be a mapping of TrainConfig keys, got {common!r}")
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{where}: 'stages' must be a non-empty list of mappings, got {stages!r}")
    names: list[str] = []
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict) or "name" not in stage:
            raise ConfigError(f"{where}: stages[{i}] must be a mapping with a 'name', got {stage!r}")
        name = str(stage["name"])
        if not _SAFE_NAME.match(name):
            raise ConfigError(f"{where}: stages[{i}].name {name!r} must be a plain folder name "
                              "(letters, digits, '_', '-', '.'; not starting with '.')")
        if name in names:
            raise ConfigError(f"{where}: stage name {name!r} is used twice")
        names.append(name)
        for key in _CHAIN_KEYS:
            if key in stage and not (key == "init_from" and i == 0):
                raise ConfigError(f"{where}: stages[{i}] ({name}) sets '{key}', which the chain sets "
                                  "(out_dir: {out_dir}/{name}; init_from: the previous stage's weights)")
    for key in _CHAIN_KEYS:
        if key in common:
            raise ConfigError(f"{where}: common sets '{key}', which the chain sets per stage")
    return {"common": common, "stages": stages, "description": source.get("description", "")}


def stage_configs(recipe: dict[str, Any], overrides: dict[str, Any] | None = None,
                  out_dir: str = "outputs/toyworld-prior") -> list[tuple[str, dict[str, Any]]]:
    """(name, TrainConfig mapping) per stage: common, then the stage, then ``overrides`` (the command
    line's key=value pairs, which apply to every stage), then the chain's out_dir and init_from."""
    overrides = dict(overrides or {})
    root = Path(overrides.pop("out_dir", out_dir))
    if "init_from" in overrides:
        raise ConfigError("train.init_from cannot be given to a recipe (its first stage may set it in the "
                          "recipe file); to fine-tune one set of weights, run a single stage: --recipe none")
    out: list[tuple[str, dict[str, Any]]] = []
    previous: Path | None = None
    for stage in recipe["stages"]:
        name = str(stage["name"])
        body = {k: v for k, v in stage.items() if k != "name"}
        cfg = merge_dicts(merge_dicts(recipe["common"], body), overrides)
        cfg["out_dir"] = str(root / name)
        if previous is not None:
            cfg["init_from"] = str(previous)
        out.append((name, cfg))
        previous = root / name / FINAL_NAME
    return out


def train_recipe(recipe: str | Path | dict | None = None, overrides: dict[str, Any] | None = None,
                 progress: bool = True) -> Path:
    """Run (or resume) every stage of ``recipe``; returns the last stage's final weights, or, when a
    stage stopped early (``stop_after``), that stage's partial weights."""
    from lift3d.config import parse_structured
    from lift3d.priors.toyworld.train import TrainConfig, train

    rec = load_recipe(recipe)
    stages = stage_configs(rec, overrides)
    for i, (name, cfg) in enumerate(stages):  # every stage's config is checked before any training
        parse_structured(TrainConfig, cfg, key=f"recipe.stages[{i}]")
    root = Path(stages[0][1]["out_dir"]).parent
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / "recipe_log.csv"
    if not log_path.is_file():
        log_path.write_text("stage,steps,seconds\n")
    budget = (overrides or {}).get("stop_after")  # steps this invocation may train, over all stages
    final = root
    for i, (name, cfg) in enumerate(stages):
        stage_dir = Path(cfg["out_dir"])
        done = stage_dir / FINAL_NAME
        if done.is_file() and _finished(stage_dir, int(cfg.get("steps", TrainConfig.steps))):
            print(f"[toyworld] stage {i + 1}/{len(stages)} {name}: done ({done})")
            final = done
            continue
        if budget is not None and budget <= 0:
            print(f"[toyworld] stop_after reached before stage {name}; run the same command again to continue")
            return final
        print(f"[toyworld] stage {i + 1}/{len(stages)} {name}: {cfg.get('steps', TrainConfig.steps)} steps "
              f"in {stage_dir}")
        t0, before = time.time(), _ckpt_step(stage_dir)
        final = train({**cfg, "stop_after": budget}, progress=progress)
        after = _ckpt_step(stage_dir)
        with open(log_path, "a") as log:
            log.write(f"{name},{after},{time.time() - t0:.1f}\n")
        if budget is not None:
            budget -= after - before
        if final.name != FINAL_NAME:  # stop_after ended this invocation inside the stage
            print(f"[toyworld] stopped inside stage {name}; run the same command again to continue")
            return final
    return final


def is_complete(recipe: str | Path | dict | None, overrides: dict[str, Any] | None, path: Path) -> bool:
    """Whether ``path`` (what train_recipe returned) is the recipe's last stage's final weights."""
    name, cfg = stage_configs(load_recipe(recipe), overrides)[-1]
    return Path(path) == Path(cfg["out_dir"]) / FINAL_NAME


def _ckpt_step(stage_dir: Path) -> int:
    import torch

    ckpt = stage_dir / "ckpt.pt"
    if not ckpt.is_file():
        return 0
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["step"])


def _finished(stage_dir: Path, steps: int) -> bool:
    """The stage's final file records ``steps`` training steps (one asked to train longer is not done)."""
    from safetensors import safe_open

    with safe_open(str(stage_dir / FINAL_NAME), framework="pt") as f:
        meta = f.metadata() or {}
    return int(meta.get("train_steps", 0)) >= steps
