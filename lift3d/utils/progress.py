"""A small machine-readable record of where a run is: ``<trial>/logs/progress.json``.

The progress bar is for people and TensorBoard's event files are flushed in bursts, so neither tells
another program (the web app in :mod:`lift3d.app`, a script watching a trial) the current step.
:class:`ProgressFile` rewrites one small JSON file, atomically, at most once a second while
training and at every phase change:

``{"phase": "train"|"validate"|"test"|"trained"|"tested", "step": int, "max_steps": int,
"stage": str|null, "stage_index": int, "n_stages": int, "steps_per_s": float|null,
"losses": {"loss": float, "loss_sds": float, ...}, "pid": int, "time": float}``

``trained`` is written when fitting ends (finished or interrupted), ``tested`` after the
turntable; the mesh export comes after that, outside the trainer. The ``test`` and ``tested``
records carry the last training losses.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback


class ProgressFile(Callback):
    """Keeps ``path`` (JSON, see the module docstring) current. Only rank zero writes."""

    def __init__(self, path: str | os.PathLike, min_interval_s: float = 1.0):
        self.path = Path(path)
        self.min_interval_s = min_interval_s
        self._last_write = 0.0
        self._rate_ref: tuple[float, int] | None = None  # (time, step) the steps/s figure is measured from
        self._rate: float | None = None
        self._last_stage: Any = None
        self._losses: dict[str, float | None] = {}  # the last training losses seen

    def _write(self, trainer: Any, pl_module: Any, phase: str) -> None:
        if not trainer.is_global_zero:
            return
        if self._rate is None and self._rate_ref is not None:
            # Steps done before any batch-end write (all inside min_interval_s) still give a figure when
            # the next write comes from another hook (a validation after the first few fast steps).
            t0, s0 = self._rate_ref
            now = time.monotonic()
            if now > t0 and trainer.global_step > s0:
                self._rate = (trainer.global_step - s0) / (now - t0)
        losses = {}
        for k, v in trainer.callback_metrics.items():
            if k.startswith("train/loss"):
                try:
                    x = float(v)
                except (TypeError, ValueError):
                    continue
                losses[k[len("train/"):]] = x if math.isfinite(x) else None
        # The test hooks see no training metrics: the record keeps the last ones (the run's final loss).
        if losses:
            self._losses = losses
        else:
            losses = self._losses
        stage = getattr(pl_module, "stage", None)
        stages = getattr(pl_module, "stages", None) or []
        record = {
            "phase": phase,
            "step": int(trainer.global_step),
            "max_steps": int(trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else None,
            "stage": getattr(stage, "name", None),
            "stage_index": int(getattr(pl_module, "stage_index", 0) or 0),
            "n_stages": len(stages),
            "steps_per_s": self._rate,
            "losses": losses,
            "pid": os.getpid(),
            "time": time.time(),
        }
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(record), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:
            # A watcher's convenience must never stop a run: the checkpoint path reports real disk trouble.
            tmp.unlink(missing_ok=True)
        self._last_write = time.monotonic()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._rate_ref = (time.monotonic(), int(trainer.global_step))
        self._last_stage = getattr(pl_module, "stage_index", None)
        self._write(trainer, pl_module, "train")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.monotonic()
        stage = getattr(pl_module, "stage_index", None)
        if now - self._last_write < self.min_interval_s and stage == self._last_stage:
            return
        if self._rate_ref is not None:
            t0, s0 = self._rate_ref
            if now > t0 and trainer.global_step > s0:
                self._rate = (trainer.global_step - s0) / (now - t0)
        # A sliding reference: the figure follows the current speed (stages differ a lot), not the mean.
        self._rate_ref = (now, int(trainer.global_step))
        self._last_stage = stage
        self._write(trainer, pl_module, "train")

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state.fn == "fit":
            self._write(trainer, pl_module, "validate")

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state.fn == "fit":
            self._write(trainer, pl_module, "train")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._write(trainer, pl_module, "trained")

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._write(trainer, pl_module, "test")

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._write(trainer, pl_module, "tested")
