"""Command-line entry point: ``python launch.py --config X.yaml --train [key=value ...]``.

Modes: --train (fit, then test renders and export), --validate, --test (turntable frames and an
mp4), --export (mesh / PLY from a checkpoint). Each run lives in a trial folder
``<exp_root_dir>/<config name>/<prompt slug>@<timestamp>/`` with configs/, ckpts/, save/, logs/.
"""

from __future__ import annotations

import argparse
import errno
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

    def check(self, prov: Any = None) -> None:
        """Values Lightning would only reject (with a traceback) after the trial folder exists."""
        where = (lambda k: prov.describe(f"trainer.{k}")) if prov is not None else (lambda k: "")
        if self.max_steps < 1:
            raise ConfigError(f"config key 'trainer.max_steps'{where('max_steps')} is {self.max_steps}: a run needs "
                              "at least 1 step (to render or export a trained model, use --test/--export with resume=)")
        if self.val_check_interval is not None and self.val_check_interval < 1:
            raise ConfigError(f"config key 'trainer.val_check_interval'{where('val_check_interval')} is "
                              f"{self.val_check_interval}: use a positive step count, or null for no validation")
        if self.log_every_n_steps < 1:
            raise ConfigError(f"config key 'trainer.log_every_n_steps'{where('log_every_n_steps')} is "
                              f"{self.log_every_n_steps}: use a positive step count")
        if self.num_sanity_val_steps < 0:
            raise ConfigError(f"config key 'trainer.num_sanity_val_steps'{where('num_sanity_val_steps')} is "
                              f"{self.num_sanity_val_steps}: use 0 or more")
        if str(self.precision) not in PRECISIONS:
            raise ConfigError(f"config key 'trainer.precision'{where('precision')} is {self.precision!r}; "
                              f"valid: {', '.join(PRECISIONS)}")


#: Lightning precision strings lift3d accepts (the short aliases Lightning also takes are left out).
PRECISIONS = ("32-true", "64-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true")


@dataclass
class CheckpointConfig:
    every_n_train_steps: int = 200
    """Write ckpts/last.ckpt this often (and at the end, and on Ctrl-C)."""
    keep_all: bool = False
    """Also keep ckpts/step=N.ckpt for every save (a hard link to last.ckpt where the file system
    allows, else an atomic copy)."""

    def check(self, prov: Any = None) -> None:
        if self.every_n_train_steps < 0:
            where = prov.describe("checkpoint.every_n_train_steps") if prov is not None else ""
            raise ConfigError(f"config key 'checkpoint.every_n_train_steps'{where} is {self.every_n_train_steps}: "
                              "use a positive step count, or 0 to save only at the end and on Ctrl-C")


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
    sd_model: str = ""
    """Stable Diffusion weights (a folder or a Hugging Face id) for recipes that interpolate ``${sd_model}``."""
    if_model: str = ""
    """DeepFloyd IF stage I weights (a folder or a Hugging Face id) for recipes that interpolate ``${if_model}``."""
    mvdream_model: str = ""
    """MVDream's checkpoint (a file, a folder holding it, or a Hugging Face id) for recipes that
    interpolate ``${mvdream_model}``."""
    zero123_model: str = ""
    """Zero123 / Stable Zero123 weights (a diffusers-format folder, a Hugging Face id, or an original
    checkpoint file) for recipes that interpolate ``${zero123_model}``."""
    zero123pp_model: str = ""
    """Zero123++ weights (a folder in the published diffusers layout or a Hugging Face id) for recipes
    that interpolate ``${zero123pp_model}``."""
    syncdreamer_model: str = ""
    """SyncDreamer's weights (``syncdreamer-pretrain.ckpt``, a .safetensors of its keys, or a folder holding
    one) for recipes that interpolate ``${syncdreamer_model}``."""
    point_e_model: str = ""
    """Point-E's weights for recipes that interpolate ``${point_e_model}``: a folder holding the published
    ``base_40m_textvec.pt`` (and ``upsample_40m.pt`` where a recipe samples its initial cloud with the
    upsampler), as Point-E's own ``point_e_model_cache/`` does, or the base model's file."""
    clip_model: str = ""
    """CLIP ViT-L/14 (a transformers folder or a Hugging Face id) for recipes that interpolate
    ``${clip_model}``: Point-E's text encoder."""
    viewdiff_weights: str = ""
    """Trained ViewDiff layers (a safetensors file written by ``python -m lift3d.priors.viewdiff train``)
    for recipes that interpolate ``${viewdiff_weights}``."""
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
    """The trial folder a run of ``cfg`` started at ``timestamp`` asks for (see :func:`create_trial_dir`)."""
    root = Path(cfg.exp_root_dir).expanduser().resolve()
    base = prompt_slug(cfg.tag) if cfg.tag else prompt_slug(cfg.prompt)
    folder = f"{base}@{timestamp}" if cfg.use_timestamp else base
    path = (root / prompt_slug(cfg.name or "default") / folder).resolve()
    if root not in path.parents:  # belt and braces: the slug rules already guarantee this
        raise ConfigError(f"trial folder {path} would leave exp_root_dir {root}")
    return path


def create_trial_dir(wanted: Path, max_tries: int = 10000) -> Path:
    """Create a new, empty trial folder at ``wanted`` or, when that exists, at ``wanted-2``, ``-3``, ...

    Each candidate is made with an exclusive ``mkdir``, so two runs started in the same second (or
    two runs with ``use_timestamp=false``) never share a folder, whatever the concurrency.
    """
    try:
        wanted.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"exp_root_dir: cannot create {wanted.parent}: {exc.strerror or exc}; "
                          "set exp_root_dir= to a writable folder") from None
    if not wanted.parent.is_dir():
        raise ConfigError(f"exp_root_dir: {wanted.parent} is not a folder; set exp_root_dir= to a writable folder")
    for k in range(1, max_tries + 1):
        path = wanted if k == 1 else wanted.with_name(f"{wanted.name}-{k}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise ConfigError(f"exp_root_dir: cannot create the trial folder {path}: {exc.strerror or exc}; "
                              "set exp_root_dir= to a writable folder") from None
        return path
    raise ConfigError(f"exp_root_dir: {max_tries} trial folders named {wanted.name}[-N] exist already in {wanted.parent}")


def is_trial_dir(path: Path | None) -> bool:
    """Whether ``path`` is a lift3d trial folder (one a run made: ``configs/parsed.yaml`` and ``ckpts/``)."""
    return path is not None and (path / "configs" / "parsed.yaml").is_file() and (path / "ckpts").is_dir()


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def check_overrides(overrides: list[str]) -> None:
    """Command-line overrides: ``key=value``, printable (a control character is nearly always a paste error)."""
    for ov in overrides:
        bad = _CONTROL.search(ov)
        if bad:
            raise ConfigError(f"command-line override {ov!r} contains the control character {bad.group()!r} "
                              f"at position {bad.start()}; retype it without it")
        if "=" not in ov:
            raise ConfigError(f"command-line argument {ov!r} is not an override; overrides look like key=value "
                              "(e.g. prompt=\"a red cube\"), flags start with --")


def check_config_file(path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc})") from None
    if not any(line.strip() and not line.lstrip().startswith("#") for line in text.splitlines()):
        raise ConfigError(f"--config {path}: the file is empty (only blank lines or comments); a recipe sets at "
                          "least system_type / system (see configs/tiny/*.yaml), or extends one")


def load_checkpoint_file(path: Path, key: str = "resume") -> dict[str, Any]:
    """A lift3d checkpoint, loaded with ``weights_only=True``; anything else is a ConfigError naming the file."""
    from lift3d.utils.checkpoint import AtomicCheckpointIO

    if not path.is_file():
        raise ConfigError(f"{key}={path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise ConfigError(f"{key}={path}: the file is empty (an interrupted copy or download?)")
    try:
        state = AtomicCheckpointIO().load_checkpoint(path)
    except Exception as exc:  # truncated zip, random bytes, a pickle that needs code to load, ...
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{key}={path}: not a readable checkpoint ({type(exc).__name__}: {msg[:200]}); "
                          "it may be truncated or not a lift3d checkpoint. lift3d loads checkpoints with "
                          "weights_only=True and never unpickles code") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        what = f"a dict with keys {sorted(map(str, state))[:8]}" if isinstance(state, dict) else type(state).__name__
        raise ConfigError(f"{key}={path}: not a lift3d checkpoint (it holds {what}, not a Lightning checkpoint "
                          "with 'state_dict'); resume takes a ckpts/*.ckpt file written by a lift3d run")
    return state


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
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, data, checkpoint and prompt as the run would, then stop: nothing is written")
    p.add_argument("--threads", default=None, metavar="N|auto",
                   help="torch CPU threads: a count, or auto (from the command line, the default: OMP_NUM_THREADS "
                        "if set, else the cores other processes leave free)")
    return p


def pick_accelerator(device: str) -> str:
    import torch

    if device != "auto":
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but torch sees no CUDA device (use --device cpu or auto)")
        if device == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError("--device mps was asked for but MPS is not available (use --device cpu or auto)")
        return "gpu" if device == "cuda" else device
    from lift3d.utils.devices import best_device

    kind = best_device().type
    return "gpu" if kind == "cuda" else kind


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
    system.check_checkpoint(load_checkpoint_file(ckpt, key="ckpt"), f"ckpt={ckpt}")
    return system.eval()


def _checkpoint_trial_dir(ckpt: Path) -> Path | None:
    return ckpt.parent.parent if ckpt.parent.name == "ckpts" else None


def _quiet_lightning(verbose: bool) -> None:
    """Keep lift3d's own lines readable: Lightning's info chatter and one upstream deprecation go."""
    import logging
    import warnings

    if verbose:
        return
    # Lightning sets its loggers' levels when imported, so this runs after the import.
    for name in list(logging.root.manager.loggerDict) + ["lightning", "lightning.pytorch", "lightning.fabric"]:
        if name.split(".")[0] in ("lightning", "lightning_fabric", "pytorch_lightning"):
            logging.getLogger(name).setLevel(logging.WARNING)
    # Raised inside Lightning's own pytree helper on current torch; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


class RunIOError(RuntimeError):
    """The disk failed under a run (full, read-only, ...); the message says which checkpoint is intact."""


def _io_failure(exc: OSError, ckpt_dir: Path) -> RunIOError:
    last = ckpt_dir / "last.ckpt"
    if last.is_file():
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last.stat().st_mtime))
        intact = (f"{last} (written {when}) is intact: checkpoints are written to a temporary file and renamed, "
                  f"so continue with resume={last} once there is room")
    else:
        intact = "no checkpoint had been written yet"
    what = "the disk is full" if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)) else exc.strerror or str(exc)
    where = f" while writing {exc.filename}" if exc.filename else ""
    return RunIOError(f"{what}{where}; {intact}")


def _record_configs(trial: Path, raw: Any, data: dict, args: argparse.Namespace, extras: list[str],
                    new_trial: bool, resume: Path | None, step: int | None) -> Path:
    """Write the configs a run used. A new trial gets raw.yaml and parsed.yaml; a run that continues or
    reads an existing trial never rewrites them and adds ``configs/history/NNN-<mode>.yaml`` instead."""
    from omegaconf import OmegaConf

    from lift3d.utils.io import atomic_path

    conf = trial / "configs"
    conf.mkdir(parents=True, exist_ok=True)
    parsed = dict(data)
    parsed["resume"] = None
    if new_trial:
        for name, text in (("raw.yaml", OmegaConf.to_yaml(raw, resolve=False)),
                           ("parsed.yaml", OmegaConf.to_yaml(OmegaConf.create(parsed)))):
            with atomic_path(conf / name) as tmp:
                tmp.write_text(text, encoding="utf-8")
    mode = next(m for m in ("train", "validate", "test", "export") if getattr(args, m))
    record = {
        "mode": mode,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "config_file": str(Path(args.config).resolve()),
        "overrides": list(extras),
        "resume": str(resume.resolve()) if resume is not None else None,
        "resume_step": step,
        "parsed": parsed,
    }
    hist = conf / "history"
    hist.mkdir(exist_ok=True)
    for k in range(1, 100000):
        path = hist / f"{k:03d}-{mode}.yaml"
        try:
            with open(path, "x", encoding="utf-8") as f:
                f.write(OmegaConf.to_yaml(OmegaConf.create(record)))
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"{hist}: too many history records")


def run(argv: list[str] | None = None, threads: Optional[int] = None) -> int:
    """One launch. ``threads``: the count :func:`main` chose before torch loaded (None: leave torch's)."""
    args, extras = build_parser().parse_known_args(argv)
    bad = [e for e in extras if e.startswith("-")]
    if bad:
        raise ConfigError(f"unknown flag(s): {' '.join(bad)}; see --help (overrides look like key=value)")
    check_overrides(extras)
    check_config_file(args.config)
    if threads is not None:
        from lift3d.utils.threads import apply_threads, thread_note

        apply_threads(threads)
        print(f"[lift3d] {thread_note()}", flush=True)

    from lift3d.registry import find, load_plugins

    roots = {Path.cwd().resolve(), REPO_ROOT}
    for root in sorted(roots):
        load_plugins(root)

    cfg, raw, prov = load_experiment(args.config, extras, args.seed)
    cfg.trainer.check(prov)
    cfg.checkpoint.check(prov)

    import lightning.pytorch as pl

    from lift3d.utils.checkpoint import AtomicCheckpointIO, LastCheckpoint, Lift3DProgressBar
    from lift3d.utils.progress import ProgressFile

    _quiet_lightning(args.verbose)
    # Everything is checked before anything is written: a bad config, prompt, image or checkpoint
    # leaves no folder behind, and a checkpoint that does not fit the config changes nothing.
    resume = Path(cfg.resume).expanduser() if cfg.resume else None
    if not args.train and resume is None:
        raise ConfigError("--validate, --test and --export load a checkpoint: add resume=path/to/ckpts/last.ckpt")
    state = load_checkpoint_file(resume) if resume is not None else None
    ckpt_trial = _checkpoint_trial_dir(resume) if resume is not None else None
    if not is_trial_dir(ckpt_trial):
        ckpt_trial = None  # a checkpoint from elsewhere: this run gets its own trial folder

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    system = find(cfg.system_type, "system")(cfg.system, cfg_key="system", prov=prov, seed=cfg.seed)
    system.verbose = args.verbose
    if args.train:
        # Before the data: a recipe missing its weights (an image-to-3D one too) says so first.
        system.check_weights()
    stage_plan = [(start, dict(st.data)) for start, st in zip(system.stage_starts(), system.cfg.stages)]
    dm = find(cfg.data_type, "data")(cfg.data, cfg_key="data", prov=prov, seed=cfg.seed, stage_plan=stage_plan)
    if args.train:
        system.check_training(dm)
    if state is not None:
        system.check_checkpoint(state, f"resume={resume}")
    max_steps = system.total_steps or cfg.trainer.max_steps
    if args.dry_run:
        mode = next(m for m in ("train", "validate", "test", "export") if getattr(args, m))
        print(f"[lift3d] dry run OK: {args.config} --{mode} ({cfg.system_type}, {len(system.stages)} stage(s), "
              f"{max_steps} steps); nothing was written")
        return 0

    if ckpt_trial is not None:
        trial = ckpt_trial
    else:
        trial = create_trial_dir(trial_dir_for(cfg, time.strftime("%Y%m%d-%H%M%S")))
    system.save_dir = trial / "save"
    for sub in ("configs", "ckpts", "save", "logs"):
        (trial / sub).mkdir(parents=True, exist_ok=True)
    data = resolve(raw, prov)
    data["name"] = cfg.name
    _record_configs(trial, raw, data, args, extras, new_trial=ckpt_trial is None, resume=resume,
                    step=int(state.get("global_step", 0)) if state is not None else None)

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
        callbacks=[ckpt_cb, ProgressFile(trial / "logs" / "progress.json")]
        + ([Lift3DProgressBar(verbose=args.verbose)] if cfg.trainer.enable_progress_bar else []),
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
    try:
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
            system.eval()
            _export(system, trial)
    except OSError as exc:
        raise _io_failure(exc, trial / "ckpts") from exc
    return 0


def _export(system: Any, trial: Path) -> None:
    out = system.export(trial / "save" / f"it{system.output_step}-export")
    for kind, path in out.items():
        print(f"[lift3d] exported {kind}: {path}")


def choose_launch_threads(argv: list[str] | None) -> Optional[int]:
    """The torch thread count for this launch, chosen before torch is imported (see
    :mod:`lift3d.utils.threads`): from the command line (``argv`` None) always, ``--threads`` or
    auto; when called in-process with an explicit ``argv``, only if it has ``--threads`` (a
    program that embeds lift3d keeps its own settings otherwise)."""
    from lift3d.utils import threads as th

    words = sys.argv[1:] if argv is None else argv
    req = th.requested_threads(words)
    if argv is not None and req is None:
        return None
    try:
        th.parse_requested(req)
    except ValueError as exc:
        raise ConfigError(f"--threads {req!r}: {exc}") from None
    # OpenMP's spin is read when torch loads; once it is loaded, setting it only misleads the log.
    spin = th.SPIN_COUNT if "torch" not in sys.modules else None
    return th.prepare_threads(req, spin_count=spin, govern=argv is None)


def main(argv: list[str] | None = None) -> None:
    try:
        threads = choose_launch_threads(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    from lift3d.exporters.base import IncompleteExportError
    from lift3d.geometry.base import IsosurfaceError
    from lift3d.registry import PluginImportError, RegistryError
    from lift3d.systems.base import NonFiniteLossError

    verbose = "--verbose" in (argv if argv is not None else sys.argv[1:])
    try:
        code = run(argv, threads)
    except (ConfigError, RegistryError, PluginImportError) as exc:
        if verbose:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except (NonFiniteLossError, IsosurfaceError, IncompleteExportError, RunIOError) as exc:
        if verbose:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()

__all__ = ["main", "run", "prompt_slug", "trial_dir_for", "ExperimentConfig", "load_experiment"]
