"""Checkpoints that are never half-written, a clean Ctrl-C, and the progress bar.

* :class:`AtomicCheckpointIO` writes to a temporary file in the same folder, fsyncs, then renames
  over the target, so a crash mid-write leaves the previous checkpoint intact. It loads with
  ``torch.load(weights_only=True)``: a checkpoint from elsewhere cannot run code.
* :class:`LastCheckpoint` saves ``ckpts/last.ckpt`` every N steps and at the end. The first Ctrl-C
  asks training to stop at the end of the current step and saves there (a step boundary, so the
  optimizer state is consistent); a second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, TQDMProgressBar


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None) -> dict[str, Any]:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


class LastCheckpoint(Callback):
    """Keeps ``<dir>/last.ckpt`` current; handles the first Ctrl-C gracefully."""

    def __init__(self, dirpath: str | os.PathLike, every_n_train_steps: int = 200, keep_all: bool = False):
        self.dirpath = Path(dirpath)
        self.every = every_n_train_steps
        self.keep_all = keep_all
        self.interrupted = False
        self._stop_requested = False
        self._old_handler: Any = None

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path:
        path = self.last_path
        trainer.save_checkpoint(path, weights_only=False)  # the optimiser state too, for resuming
        if self.keep_all and trainer.is_global_zero:
            shutil.copyfile(path, self.dirpath / f"step={trainer.global_step}.ckpt")
        pl_module.last_checkpoint = str(path)
        return path

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._stop_requested:  # second Ctrl-C: stop now
            signal.signal(signal.SIGINT, self._old_handler or signal.default_int_handler)
            raise KeyboardInterrupt
        self._stop_requested = True
        print("\n[lift3d] Ctrl-C: stopping after this step and saving last.ckpt (Ctrl-C again to abort now)")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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
            print(f"[lift3d] saved {path} at step {trainer.global_step}")
        elif self.every and trainer.global_step % self.every == 0:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.interrupted:
            self.save(trainer, pl_module)
        if self._old_handler is not None:
            signal.signal(signal.SIGINT, self._old_handler)
            self._old_handler = None


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
