"""Command-line entry point: ``python launch.py --config X.yaml --train [key=value ...]``.

Modes: --train (fit, then test renders and export), --validate, --test (turntable frames and an
mp4), --export (mesh / PLY from a checkpoint). Each run lives in a trial folder
``<exp_root_dir>/<config name>/<prompt slug>@<timestamp>/`` with configs/, ckpts/, save/, logs/.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import traceback
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lift3d.config import ConfigError, load_config, parse_structured, resolve

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    """Total optimizer steps when the system has no stages (stages set it otherwise)."""
    val_check_interval: Optional[int] = 200
    """Validate every this many steps (null: never during training)."""
    log_every_n_steps: int = 10
    """How often metrics are written to the logs."""
    num_sanity_val_steps: int = 0
    """Validation batches run before training starts."""
    precision: str = "32-true"
    """Lightning precision string ('32-true', 'bf16-mixed', '16-mixed')."""
    enable_progress_bar: bool = True
    """Show the progress bar (step, stage, loss, steps/s)."""


@dataclass
class CheckpointConfig:
    every_n_train_steps: int = 200
    """Write ckpts/last.ckpt this often (and at the end, and on Ctrl-C)."""
    keep_all: bool = False
    """Also keep ckpts/step=N.ckpt for every save."""


@dataclass
class ExperimentConfig:
    name: str = ""
    """Name of the recipe: the first folder under exp_root_dir (default: the config file's stem)."""
    description: str = ""
    """Free text describing the recipe."""
    tag: str = ""
    """Trial folder name instead of the prompt slug."""
    seed: int = 0
    """Seed for initialisation, cameras and noise: the same seed gives the same run."""
    use_timestamp: bool = True
    """Append @YYYYMMDD-HHMMSS to the trial folder."""
    exp_root_dir: str = "outputs"
    """Where trial folders go."""
    prompt: str = ""
    """The text prompt (recipes interpolate ${prompt} where their prompt processor reads it)."""
    image: Optional[str] = None
    """Input image path for image-conditioned recipes."""
    resume: Optional[str] = None
    """Checkpoint to continue from (training) or to load (validate/test/export)."""
    data_type: str = "random-camera-datamodule"
    data: dict[str, Any] = field(default_factory=dict)
    system_type: str = "text-to-3d-system"
    system: dict[str, Any] = field(default_factory=dict)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# ---------------------------------------------------------------------------------------------
# Trial folder


_UNSAFE = re.compile(r'[\x00-\x1f\x7f-\x9f/\\<>:"|?*]')


def prompt_slug(text: str, max_chars: int = 64) -> str:
    """A folder-safe name for a prompt: no separators, no '..', no control characters, capped.

    Unicode letters stay readable (NFC-normalised); whitespace becomes '_'.
    """
    s = unicodedata.normalize("NFC", text or "")
    s = "".join(ch for ch in s if unicodedata.category(ch)[0] != "C")  # control, format, unassigned
    s = _UNSAFE.sub("", s)
    s = re.sub(r"\s+", "_", s.strip())
    s = re.sub(r"\.{2,}", ".", s).strip("._")
    # Cap by characters and by UTF-8 bytes (file names are limited to 255 bytes).
    s = s[:max_chars]
    while len(s.encode("utf-8")) > 180:
        s = s[:-1]
    s = s.strip("._")
    return s or "untitled"


def trial_dir_for(cfg: ExperimentConfig, timestamp: str) -> Path:
    root = Path(cfg.exp_root_dir).expanduser().resolve()
    base = prompt_slug(cfg.tag) if cfg.tag else prompt_slug(cfg.prompt)
    folder = f"{base}@{timestamp}" if cfg.use_timestamp else base
    path = (root / prompt_slug(cfg.name or "default") / folder).resolve()
    if root not in path.parents:  # belt and braces: the slug rules already guarantee this
        raise ConfigError(f"trial folder {path} would leave exp_root_dir {root}")
    return path


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch.py",
        description="lift3d: optimize a 3D asset with a 2D/multi-view diffusion prior.",
        epilog="Overrides after the flags: key.path=value, e.g. prompt=\"a red cube\" system.loss.lambda_sds=1",
    )
    p.add_argument("--config", required=True, help="recipe YAML (or a trial's configs/parsed.yaml)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", action="store_true", help="fit, then render the test turntable and export")
    mode.add_argument("--validate", action="store_true", help="render validation views from resume=CKPT")
    mode.add_argument("--test", action="store_true", help="render turntable frames and an mp4 from resume=CKPT")
    mode.add_argument("--export", action="store_true", help="export the mesh (and PLY) from resume=CKPT")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto picks cuda > mps > cpu")
    p.add_argument("--gpu", default=None, help="GPU ids, e.g. 0 or 0,1 (several: DDP)")
    p.add_argument("--seed", type=int, default=None, help="override the config's seed")
    p.add_argument("--verbose", action="store_true", help="show every loss term and full tracebacks")
    return p


def pick_accelerator(device: str) -> str:
    import torch

    if device != "auto":
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but torch sees no CUDA device (use --device cpu or auto)")
        if device == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError("--device mps was asked for but MPS is not available (use --device cpu or auto)")
        return "gpu" if device == "cuda" else device
    if torch.cuda.is_available():
        return "gpu"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_experiment(config_path: str, overrides: list[str], seed: int | None = None):
    """Load, merge, resolve and strictly parse a recipe; returns (ExperimentConfig, raw, prov)."""
    if seed is not None:
        overrides = list(overrides) + [f"seed={seed}"]
    raw, prov = load_config(config_path, overrides)
    data = resolve(raw, prov)
    if not data.get("name"):
        data["name"] = Path(config_path).stem
    cfg = parse_structured(ExperimentConfig, data, prov=prov, owner="the experiment")
    return cfg, raw, prov


def load_trained_system(ckpt: str | Path, config: str | Path | None = None, overrides: list[str] | None = None):
    """A system rebuilt from a checkpoint, in eval mode, outside any Trainer.

    ``config`` defaults to the trial's ``configs/parsed.yaml`` next to ``ckpts/``. Loads with
    ``weights_only=True`` like every checkpoint load in lift3d.
    """
    from lift3d.registry import find, load_plugins
    from lift3d.utils.checkpoint import AtomicCheckpointIO

    ckpt = Path(ckpt)
    if config is None:
        trial = _checkpoint_trial_dir(ckpt)
        if trial is None or not (trial / "configs" / "parsed.yaml").is_file():
            raise ConfigError(f"{ckpt}: not inside a trial folder with configs/parsed.yaml; pass config=")
        config = trial / "configs" / "parsed.yaml"
    for root in sorted({Path.cwd().resolve(), REPO_ROOT}):
        load_plugins(root)
    cfg, _, prov = load_experiment(str(config), list(overrides or []))
    system = find(cfg.system_type, "system")(cfg.system, cfg_key="system", prov=prov, seed=cfg.seed)
    state = AtomicCheckpointIO().load_checkpoint(ckpt)
    system.on_load_checkpoint(state)
    system.load_state_dict(state["state_dict"])
    return system.eval()


def _checkpoint_trial_dir(ckpt: Path) -> Path | None:
    return ckpt.parent.parent if ckpt.parent.name == "ckpts" else None


def run(argv: list[str] | None = None) -> int:
    args, extras = build_parser().parse_known_args(argv)
    bad = [e for e in extras if e.startswith("-")]
    if bad:
        raise ConfigError(f"unknown flag(s): {' '.join(bad)}; see --help (overrides look like key=value)")

    from lift3d.registry import find, load_plugins

    roots = {Path.cwd().resolve(), REPO_ROOT}
    for root in sorted(roots):
        load_plugins(root)

    cfg, raw, prov = load_experiment(args.config, extras, args.seed)

    import lightning.pytorch as pl
    from omegaconf import OmegaConf

    from lift3d.utils.checkpoint import AtomicCheckpointIO, LastCheckpoint, Lift3DProgressBar

    resume = Path(cfg.resume).expanduser() if cfg.resume else None
    if resume is not None and not resume.is_file():
        raise ConfigError(f"resume={cfg.resume}: no such checkpoint file")
    if not args.train and resume is None:
        raise ConfigError("--validate, --test and --export load a checkpoint: add resume=path/to/ckpts/last.ckpt")

    trial = _checkpoint_trial_dir(resume) if resume is not None else None
    if trial is None:
        trial = trial_dir_for(cfg, time.strftime("%Y%m%d-%H%M%S"))
    # Build everything before touching the disk: a config error leaves no empty trial folder.
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    system = find(cfg.system_type, "system")(cfg.system, cfg_key="system", prov=prov, seed=cfg.seed,
                                             save_dir=trial / "save")
    system.verbose = args.verbose
    stage_plan = [(start, dict(st.data)) for start, st in zip(system.stage_starts(), system.cfg.stages)]
    dm = find(cfg.data_type, "data")(cfg.data, cfg_key="data", prov=prov, seed=cfg.seed, stage_plan=stage_plan)
    if args.train:
        system.check_data(dm)

    for sub in ("configs", "ckpts", "save", "logs"):
        (trial / sub).mkdir(parents=True, exist_ok=True)
    if args.train:
        (trial / "configs" / "raw.yaml").write_text(OmegaConf.to_yaml(raw, resolve=False))
        parsed = resolve(raw, prov)
        parsed["name"] = cfg.name
        parsed["resume"] = None
        (trial / "configs" / "parsed.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(parsed)))

    accelerator = pick_accelerator(args.device)
    devices: Any = "auto"
    strategy: Any = "auto"
    if args.gpu is not None:
        ids = [int(x) for x in str(args.gpu).split(",") if x.strip()]
        devices = ids
        if len(ids) > 1:
            strategy = "ddp"
        accelerator = "gpu"
    elif accelerator == "cpu":
        devices = 1
    max_steps = system.total_steps or cfg.trainer.max_steps
    ckpt_cb = LastCheckpoint(trial / "ckpts", cfg.checkpoint.every_n_train_steps, cfg.checkpoint.keep_all)
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        from lightning.pytorch.loggers import TensorBoardLogger

        logger: Any = TensorBoardLogger(save_dir=str(trial), name="logs", version="", default_hp_metric=False)
    else:
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(save_dir=str(trial), name="logs", version="")
    val_every = cfg.trainer.val_check_interval
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        max_steps=max_steps,
        max_epochs=-1,
        check_val_every_n_epoch=None,
        val_check_interval=val_every if (val_every and val_every <= max_steps) else None,
        limit_val_batches=1.0 if (val_every and val_every <= max_steps) else 0,
        num_sanity_val_steps=cfg.trainer.num_sanity_val_steps,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        precision=cfg.trainer.precision,
        default_root_dir=str(trial),
        logger=logger,
        callbacks=[ckpt_cb] + ([Lift3DProgressBar(verbose=args.verbose)] if cfg.trainer.enable_progress_bar else []),
        enable_checkpointing=False,
        enable_progress_bar=cfg.trainer.enable_progress_bar,
        enable_model_summary=args.verbose,
        plugins=[AtomicCheckpointIO()],
        deterministic=False,
        # no_grad rather than inference_mode: inference tensors break caches keyed on tensor versions
        inference_mode=False,
    )
    ckpt_path = str(resume) if resume is not None else None
    print(f"[lift3d] trial folder: {trial}")
    if args.train:
        trainer.fit(system, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
        if ckpt_cb.interrupted:
            print(f"[lift3d] interrupted: continue with resume={ckpt_cb.last_path}")
            return 130
        trainer.test(system, datamodule=dm, verbose=False, weights_only=True)
        _export(system, trial)
    elif args.validate:
        trainer.validate(system, datamodule=dm, ckpt_path=ckpt_path, verbose=False, weights_only=True)
        print(f"[lift3d] validation images in {trial / 'save'}")
    elif args.test:
        trainer.test(system, datamodule=dm, ckpt_path=ckpt_path, verbose=False, weights_only=True)
    elif args.export:
        ckpt = AtomicCheckpointIO().load_checkpoint(resume)
        system.on_load_checkpoint(ckpt)
        system.load_state_dict(ckpt["state_dict"])
        system.eval()
        _export(system, trial, step=int(ckpt.get("global_step", 0)))
    return 0


def _export(system: Any, trial: Path, step: int | None = None) -> None:
    step = system.global_step if step is None else step
    out = system.export(trial / "save" / f"it{step}-export")
    for kind, path in out.items():
        print(f"[lift3d] exported {kind}: {path}")


def main(argv: list[str] | None = None) -> None:
    from lift3d.geometry.base import IsosurfaceError
    from lift3d.registry import PluginImportError, RegistryError
    from lift3d.systems.base import NonFiniteLossError

    verbose = "--verbose" in (argv if argv is not None else sys.argv[1:])
    try:
        code = run(argv)
    except (ConfigError, RegistryError, PluginImportError) as exc:
        if verbose:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except (NonFiniteLossError, IsosurfaceError) as exc:
        if verbose:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()

__all__ = ["main", "run", "prompt_slug", "trial_dir_for", "ExperimentConfig", "load_experiment"]
