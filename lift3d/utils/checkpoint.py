"""Checkpoints that are never half-written nor diverged, a clean Ctrl-C, and the progress bar.

* :class:`AtomicCheckpointIO` writes to a temporary file in the same folder, fsyncs, then renames
  over the target, so a crash mid-write leaves the previous checkpoint intact. It loads with
  ``torch.load(weights_only=True)``: a checkpoint from elsewhere cannot run code.
* :class:`LastCheckpoint` saves ``ckpts/last.ckpt`` every N steps and at the end. The first Ctrl-C
  asks training to stop at the end of the current step and saves there (a step boundary, so the
  optimizer state is consistent); a second Ctrl-C interrupts at once.
* Before each save the parameters are checked (:func:`diverged_parameter`): with a NaN, an Inf or a
  magnitude no working run reaches, ``last.ckpt`` is left as it was and :class:`NonFiniteLossError`
  names the parameter and the checkpoint that still holds good parameters.
* ``keep_all``'s ``step=N.ckpt`` is a hard link to ``last.ckpt`` (a copy through a temporary file
  where the filesystem has no links): complete or absent, never half-copied.
* A save killed mid-write (SIGKILL, power loss) leaves its ``.NAME.tmp-PID`` file behind; training
  start removes those whose process is gone (:func:`remove_stale_tmp_files`).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from torch import Tensor


class NonFiniteLossError(RuntimeError):
    """A loss term, a gradient or a parameter became NaN or Inf (or diverged); training stops instead of
    learning, or saving, garbage."""


# ---------------------------------------------------------------------------------------------
# Files written whole or not at all

#: ``.NAME.tmp-PID``: where a save by process PID writes before renaming onto NAME.
TMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def tmp_path_for(path: Path) -> Path:
    """This process's temporary file for writing ``path`` (same folder, so the rename is atomic)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable where the platform allows opening a directory (POSIX)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, named for the stale-file sweep; renamed onto ``path`` (and the
    folder fsynced) when the block succeeds, removed when it fails."""
    tmp = tmp_path_for(path)
    try:
        tmp.unlink(missing_ok=True)
        yield tmp
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _replacing(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make ``dst`` hold ``src``'s bytes, or leave it as it was.

    A hard link when the filesystem has them: instant and no extra space, and safe because
    checkpoints are only ever replaced by a rename, never rewritten in place, so a later save of
    ``src`` leaves ``dst`` alone. Otherwise a copy into a temporary file, fsynced, then renamed.
    """
    src, dst = Path(src), Path(dst)
    with _replacing(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:  # no hard links here (some network and FUSE filesystems, FAT)
            with open(src, "rb") as fi, open(tmp, "wb") as fo:
                shutil.copyfileobj(fi, fo, 16 << 20)
                fo.flush()
                os.fsync(fo.fileno())


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine; True when that cannot be told (keep its file)."""
    if pid <= 0:
        return False
    try:
        import psutil

        return bool(psutil.pid_exists(pid))
    except ImportError:
        pass
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, someone else's
        return True
    return True


def remove_stale_tmp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the ``.NAME.tmp-PID`` files in ``folder`` that no save is writing any more.

    Stale: the PID is this process (none of its saves runs while this is called) or no running
    process; a PID recycled by an unrelated process keeps its file until a later start. The
    files of live processes stay: another run may be saving into the same folder right now.
    Returns the files removed.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in sorted(folder.iterdir()):
        m = TMP_NAME.match(path.name)
        if m is None or not path.is_file():
            continue
        pid = int(m["pid"])
        if pid != os.getpid() and _pid_alive(pid):
            continue
        try:
            path.unlink()
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            continue
        removed.append(path)
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None) -> dict[str, Any]:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------
# Parameters worth saving

#: Beyond this magnitude a parameter has diverged: its square overflows float32, so any squared error
#: or norm over it is already infinite. No parameter of a working run comes anywhere near it.
DIVERGED_MAGNITUDE = math.sqrt(torch.finfo(torch.float32).max)  # about 1.8e19


def diverged_parameter(named_parameters: Iterable[tuple[str, Tensor]]) -> tuple[str, Tensor] | None:
    """The first ``(name, parameter)`` holding a NaN, an Inf or a value beyond :data:`DIVERGED_MAGNITUDE`;
    None when every parameter is fine. One reduction per parameter and one sync per device."""
    by_device: dict[torch.device, list[tuple[str, Tensor]]] = {}
    for name, p in named_parameters:
        if p.is_floating_point() and p.numel() > 0:
            by_device.setdefault(p.device, []).append((name, p))
    for items in by_device.values():
        # amax propagates NaN, so one comparison catches NaN, Inf and overflow-sized values.
        peaks = torch.stack([p.detach().abs().amax().float() for _, p in items]).tolist()
        for (name, p), peak in zip(items, peaks):
            if not peak <= DIVERGED_MAGNITUDE:
                return name, p
    return None


def saved_parameters(pl_module: Any) -> Iterable[tuple[str, Tensor]]:
    """The parameters a checkpoint of ``pl_module`` holds: its ``checkpoint_named_parameters()`` when it
    has one (a system can add state kept outside its module tree, such as a guidance's LoRA), else
    ``named_parameters()``."""
    fn = getattr(pl_module, "checkpoint_named_parameters", None)
    return fn() if callable(fn) else pl_module.named_parameters()


def describe_parameter(name: str, p: Tensor) -> str:
    """``parameter 'x' has 3 of 12 values NaN or Inf (e.g. [nan, inf])`` or ``... diverged to |x| = 1e+30``."""
    t = p.detach()
    bad = ~torch.isfinite(t)
    n_bad = int(bad.sum())
    if n_bad:
        return (f"parameter {name!r} has {n_bad} of {t.numel()} values NaN or Inf "
                f"(e.g. {t[bad].flatten()[:4].tolist()})")
    return f"parameter {name!r} diverged to |value| = {float(t.abs().amax()):.3g}"


# ---------------------------------------------------------------------------------------------
# The callback


class LastCheckpoint(Callback):
    """Keeps ``<dir>/last.ckpt`` current with good parameters; handles the first Ctrl-C gracefully.

    It remembers which checkpoint files of this run (and the one training resumed from) hold
    parameters that passed the check, by step, so an error can name one that really is good:
    :meth:`describe_good`.
    """

    def __init__(self, dirpath: str | os.PathLike, every_n_train_steps: int = 200, keep_all: bool = False):
        self.dirpath = Path(dirpath)
        self.every = every_n_train_steps
        self.keep_all = keep_all
        self.interrupted = False
        self._stop_requested = False
        self._old_handler: Any = None
        self._good: dict[Path, int] = {}  # checkpoint file -> the global step its parameters are from

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    # -- which checkpoint is good ---------------------------------------------------------------

    def good_checkpoint(self, before_step: int) -> tuple[Path, int] | None:
        """The newest checkpoint on disk from a global step below ``before_step`` whose parameters passed
        the check (``last.ckpt`` on a tie), or None."""
        found = [(step, path == self.last_path, path) for path, step in self._good.items()
                 if step < before_step and path.is_file()]
        if not found:
            return None
        step, _, path = max(found)
        return path, step

    def describe_good(self, before_step: int) -> str:
        """For error messages: the checkpoint to resume from when the parameters of global step
        ``before_step`` (or what they produced) are bad.

        A checkpoint taken at ``before_step`` itself is not good: resume is exact, so it would
        replay the same step and produce the same non-finite value.
        """
        found = self.good_checkpoint(before_step)
        if found is not None:
            return f"{found[0]} (step {found[1]})"
        last_step = self._good.get(self.last_path)
        if last_step is not None and self.last_path.is_file():
            return (f"none: {self.last_path} holds the parameters step {last_step} started from, and resuming "
                    "from it replays that step; checkpoint.keep_all=true keeps the earlier saves")
        return "none saved yet"

    # -- saving ---------------------------------------------------------------------------------

    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        """Write ``last.ckpt`` (and ``step=N.ckpt`` with keep_all) if the parameters are good.

        Diverged parameters leave the files as they were and raise :class:`NonFiniteLossError`, or,
        when the system's ``check_finite`` is off, only skip the save with a message.
        """
        path = self.last_path
        step = trainer.global_step
        bad = diverged_parameter(saved_parameters(pl_module))
        if bad is not None:
            what = describe_parameter(*bad)
            stage = getattr(getattr(pl_module, "stage", None), "name", None)
            where = f"after step {step - 1}" + (f" (stage '{stage}')" if stage else "")
            if not getattr(getattr(pl_module, "cfg", None), "check_finite", True):
                print(f"[lift3d] {what} {where}: {path} not overwritten")
                return None
            raise NonFiniteLossError(
                f"{what} {where}, so {path} was not overwritten. Training stopped. Last good checkpoint: "
                # A save of this very step that passed the check was taken from good parameters.
                f"{self.describe_good(step + 1)}. Lower the learning rate (check its schedule) or the loss "
                "weights, then resume from that checkpoint if there is one."
            )
        trainer.save_checkpoint(path, weights_only=False)  # the optimiser state too, for resuming
        self._good[path] = step
        if self.keep_all and trainer.is_global_zero:
            kept = self.dirpath / f"step={step}.ckpt"
            atomic_copy(path, kept)
            self._good[kept] = step
        pl_module.last_checkpoint = str(path)
        return path

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._stop_requested:  # second Ctrl-C: stop now
            signal.signal(signal.SIGINT, self._old_handler or signal.default_int_handler)
            raise KeyboardInterrupt
        self._stop_requested = True
        print("\n[lift3d] Ctrl-C: stopping after this step and saving last.ckpt (Ctrl-C again to abort now)")

    def _restore_sigint(self) -> None:
        if self._old_handler is not None:
            signal.signal(signal.SIGINT, self._old_handler)
            self._old_handler = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            for stale in remove_stale_tmp_files(self.dirpath):
                print(f"[lift3d] removed {stale}, left by a save that was killed mid-write")
        resumed = trainer.ckpt_path
        if resumed and diverged_parameter(saved_parameters(pl_module)) is None:
            # Its weights are loaded now: checked like our own saves, it is a checkpoint to name.
            self._good[Path(resumed)] = trainer.global_step
            if getattr(pl_module, "last_checkpoint", None) is None:
                pl_module.last_checkpoint = str(resumed)
        try:
            self._old_handler = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread
            self._old_handler = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._stop_requested:
            path = self.save(trainer, pl_module)
            self.interrupted = True
            trainer.should_stop = True
            if path is not None:
                print(f"[lift3d] saved {path} at step {trainer.global_step}")
        elif self.every and trainer.global_step % self.every == 0:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            if not self.interrupted:
                self.save(trainer, pl_module)
        finally:
            self._restore_sigint()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # on_train_end does not run after an error: give Ctrl-C back to whoever had it.
        self._restore_sigint()


class Lift3DProgressBar(TQDMProgressBar):
    """Shows the stage name next to step, loss and steps/s."""

    def __init__(self, verbose: bool = False):
        super().__init__()
        self.verbose = verbose

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        stage = getattr(pl_module, "stage", None)
        if stage is not None:
            items["stage"] = stage.name
        items["step"] = trainer.global_step
        if self.verbose:
            for k, v in trainer.callback_metrics.items():
                if k.startswith("train/loss_"):
                    items[k[len("train/"):]] = f"{float(v):.3g}"
        return items
