"""The web app's run manager: queue, start, watch, stop and reattach training runs (no gradio here).

Each run is an ordinary ``launch.py --train`` trial, started as its own process
(:mod:`lift3d.app.child`) in a new session, so it outlives the page and the server that started
it. Everything the manager knows is on disk, under ``<root>/.app/runs/<run id>/``:

* ``state.json``: what was asked (config, overrides, device), the status
  (queued, running, stopping, done, stopped, failed, cancelled), the process id, the trial folder;
* ``output.log``: the process's stdout and stderr (its ``[lift3d] trial folder:`` line names the trial);
* ``rc``: the exit code, written by the process itself as it ends.

A manager started later (a restarted server) reads these and reattaches: a live process is
watched again, a finished one is settled from its ``rc``, queued runs keep their places.
Progress comes from what the run writes into its trial: ``logs/progress.json`` (stage, step,
steps/s, loss terms; :mod:`lift3d.utils.progress`), ``save/it<N>-val/`` grids, the turntable and
the export. Stop sends SIGINT, the launcher's Ctrl-C: the run stops at the end of its step and
saves ``ckpts/last.ckpt``. Input is checked before a run is queued by the launcher itself
(``--dry-run`` in this process), so the page shows the command line's ``error:`` lines.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

#: Statuses of a run that has not ended.
LIVE = ("queued", "running", "stopping")
#: Exit code of a run stopped by SIGINT (the launcher's own code for an interrupted run).
INTERRUPTED = 130
APP_DIR = ".app"


class RunInputError(ValueError):
    """The launcher refused the run before it started; the message is its ``error:`` line(s)."""


@dataclass
class Run:
    id: str
    config: str
    overrides: list[str]
    device: str = "auto"
    status: str = "queued"
    created: float = 0.0
    started: Optional[float] = None
    ended: Optional[float] = None
    pid: Optional[int] = None
    returncode: Optional[int] = None
    trial: Optional[str] = None
    message: str = ""
    label: str = ""

    @property
    def launch_args(self) -> list[str]:
        args = ["--config", self.config, "--train"]
        if self.device != "auto":
            args += ["--device", self.device]
        return args + list(self.overrides)

    @property
    def command(self) -> str:
        """The same run from a shell."""
        return shlex.join(["python", "launch.py", *self.launch_args])


def _load_run(path: Path) -> Optional[Run]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        known = set(Run.__dataclass_fields__)
        return Run(**{k: v for k, v in data.items() if k in known})
    except (OSError, ValueError, TypeError):
        return None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def process_alive(pid: Optional[int], marker: str) -> bool:
    """Whether process ``pid`` runs and is the one started for this run (its command line holds
    ``marker``, so a recycled pid is not mistaken for it). A zombie counts as ended."""
    if not pid:
        return False
    proc = Path(f"/proc/{pid}/cmdline")
    if Path("/proc/self").exists():
        try:
            return marker.encode() in proc.read_bytes()
        except OSError:
            return False
    try:  # no /proc (macOS): the pid alone
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


_DRY_LOCK = threading.Lock()


def check_launch(launch_args: Sequence[str]) -> None:
    """Run the launcher's own checks (``--dry-run``) in this process; a :class:`RunInputError` holding
    its ``error:`` line when it refuses. Nothing is written and nothing trained."""
    from lift3d.config import ConfigError
    from lift3d.launch import run
    from lift3d.registry import PluginImportError, RegistryError

    out = io.StringIO()
    with _DRY_LOCK, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            run([*launch_args, "--dry-run"])
        except (ConfigError, RegistryError, PluginImportError) as exc:
            raise RunInputError(f"error: {exc}") from None
        except SystemExit as exc:  # argparse: its usage line and message are in ``out``
            lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
            raise RunInputError("\n".join(lines[-2:]) or f"error: bad arguments (exit {exc.code})") from None


def _latest(folder: Path, pattern: str) -> Optional[Path]:
    """The ``it<N>...`` entry of ``folder`` matching ``pattern`` with the largest N."""
    best: tuple[int, Path] | None = None
    rx = re.compile(pattern)
    if not folder.is_dir():
        return None
    for p in folder.iterdir():
        m = rx.fullmatch(p.name)
        if m and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), p)
    return best[1] if best else None


def trial_outputs(trial: Path) -> dict[str, Any]:
    """What a trial has produced so far: the newest validation folder, turntable video and export."""
    save = trial / "save"
    out: dict[str, Any] = {"val_dir": None, "video": None, "export_dir": None, "glb": None, "obj": None,
                           "gaussian_ply": None}
    val = _latest(save, r"it(\d+)-val")
    if val is not None and any(val.glob("*.png")):
        out["val_dir"] = val
    out["video"] = _latest(save, r"it(\d+)-test\.mp4")
    exp = _latest(save, r"it(\d+)-export")
    if exp is not None:
        out["export_dir"] = exp
        for key, name in (("glb", "model.glb"), ("obj", "model.obj")):
            if (exp / name).is_file():
                out[key] = exp / name
        plys = sorted(exp.glob("*_gaussians.ply"))
        out["gaussian_ply"] = plys[0] if plys else None
    return out


def read_progress(trial: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads((trial / "logs" / "progress.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class RunManager:
    """Runs launched from the web app, one at a time per device (``max_active``), first come first served.

    Args:
        root: where trials go (the runs' ``exp_root_dir``); the manager's own files are in ``root/.app``.
        entry: the command that starts a run (before ``--rc-file F -- LAUNCH_ARGS``); default
            ``python -m lift3d.app.child``. Tests put a stand-in here.
        check: the input check before queueing (default :func:`check_launch`); None skips it.
        poll_s: how often the background thread settles ended runs and starts queued ones
            (0: no thread; call :meth:`poll` yourself).
    """

    def __init__(self, root: str | Path, *, entry: Optional[Sequence[str]] = None,
                 check: Optional[Callable[[Sequence[str]], None]] = check_launch, max_active: int = 1,
                 poll_s: float = 0.5, cwd: Optional[str | Path] = None):
        self.root = Path(root).expanduser().resolve()
        self.runs_dir = self.root / APP_DIR / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.entry = list(entry) if entry is not None else [sys.executable, "-m", "lift3d.app.child"]
        self.check = check
        self.max_active = max_active
        self.cwd = Path(cwd).resolve() if cwd is not None else Path.cwd()
        self._lock = threading.RLock()
        self._procs: dict[str, subprocess.Popen] = {}
        self._runs: dict[str, Run] = {}
        for state in sorted(self.runs_dir.glob("*/state.json")):
            run = _load_run(state)
            if run is not None:
                self._runs[run.id] = run
        self.poll()  # reattach: settle what ended while no server watched, start what waits
        self._stop_event = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if poll_s > 0:
            self._thread = threading.Thread(target=self._loop, args=(poll_s,), name="lift3d-runs", daemon=True)
            self._thread.start()

    # -- files ----------------------------------------------------------------------------------

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    def _save(self, run: Run) -> None:
        _write_json(self.run_dir(run.id) / "state.json", asdict(run))

    def log_path(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "output.log"

    def log_tail(self, run_id: str, n_bytes: int = 4000) -> str:
        """The end of a run's output, progress-bar redraws reduced to their last state."""
        path = self.log_path(run_id)
        try:
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - n_bytes))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        lines = [ln.rsplit("\r", 1)[-1] for ln in text.replace("\r\n", "\n").split("\n")]
        return "\n".join(ln for ln in lines if ln.strip())

    def _find_trial(self, run: Run) -> Optional[str]:
        try:
            with open(self.log_path(run.id), "rb") as f:
                head = f.read(256 * 1024).decode("utf-8", "replace")
        except OSError:
            return None
        m = re.search(r"^\[lift3d\] trial folder: (.+?)\s*$", head, re.M)
        return m.group(1) if m else None

    # -- the queue ------------------------------------------------------------------------------

    def submit(self, config: str | Path, overrides: Sequence[str] = (), *, device: str = "auto",
               label: str = "", input_file: Optional[str | Path] = None) -> Run:
        """Check the run as the launcher would and queue it; :class:`RunInputError` when refused.

        ``input_file``: an uploaded file already copied into place (see :meth:`new_upload_path`),
        named by the caller in ``overrides`` (``image=PATH``); removed when the run is refused.
        """
        run_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        overrides = [*overrides, f"exp_root_dir={self.root}"]
        run = Run(id=run_id, config=str(Path(config).resolve()), overrides=list(overrides), device=device,
                  created=time.time(), label=label)
        if self.check is not None:
            try:
                self.check(run.launch_args)
            except RunInputError:
                if input_file is not None:
                    Path(input_file).unlink(missing_ok=True)
                raise
        self.run_dir(run_id).mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._runs[run_id] = run
            self._save(run)
        self.poll()
        return run

    def new_upload_path(self, suffix: str) -> Path:
        """A fresh path for an uploaded input under ``root/.app/uploads`` (kept: a resumed run reads it again)."""
        folder = self.root / APP_DIR / "uploads"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}{suffix}"

    def resume(self, run_or_trial: str) -> Run:
        """Queue the continuation of a stopped run (or a trial folder) from its ``ckpts/last.ckpt``, as
        ``launch.py --config <trial>/configs/parsed.yaml --train resume=<trial>/ckpts/last.ckpt`` does."""
        with self._lock:
            run = self._runs.get(run_or_trial)
        trial = Path(run.trial) if run is not None and run.trial else Path(run_or_trial)
        ckpt = trial / "ckpts" / "last.ckpt"
        if not ckpt.is_file():
            raise RunInputError(f"error: {trial} has no checkpoint to continue from ({ckpt} does not exist)")
        return self.submit(trial / "configs" / "parsed.yaml", [f"resume={ckpt}"],
                           device=run.device if run is not None else "auto",
                           label=(run.label if run is not None else trial.name) + " (resumed)")

    def stop(self, run_id: str) -> Run:
        """Cancel a queued run, or stop a running one as Ctrl-C does (a checkpoint at the end of the step).
        Stopping a run already stopping does nothing: a second SIGINT would abort without saving."""
        with self._lock:
            run = self._runs[run_id]
            if run.status == "queued":
                run.status, run.ended, run.message = "cancelled", time.time(), "cancelled before it started"
                self._save(run)
            elif run.status == "running" and run.pid:
                if process_alive(run.pid, str(self.run_dir(run_id))):
                    os.kill(run.pid, signal.SIGINT)
                run.status = "stopping"
                self._save(run)
            return run

    def poll(self) -> None:
        """Settle runs whose process has ended, then start queued runs where their device is free."""
        with self._lock:
            for run in self._runs.values():
                if run.status in ("running", "stopping"):
                    if run.trial is None:
                        run.trial = self._find_trial(run)
                        if run.trial is not None:
                            self._save(run)
                    if not self._running(run):
                        self._settle(run)
            busy: dict[str, int] = {}
            for run in self._runs.values():
                if run.status in ("running", "stopping"):
                    busy[run.device] = busy.get(run.device, 0) + 1
            for run in sorted(self._runs.values(), key=lambda r: (r.created, r.id)):
                if run.status == "queued" and busy.get(run.device, 0) < self.max_active:
                    self._start(run)
                    busy[run.device] = busy.get(run.device, 0) + 1

    def _running(self, run: Run) -> bool:
        proc = self._procs.get(run.id)
        if proc is not None:
            return proc.poll() is None
        return process_alive(run.pid, str(self.run_dir(run.id)))

    def _start(self, run: Run) -> None:
        folder = self.run_dir(run.id)
        try:  # a second server on the same folder must not start the same run again
            os.close(os.open(folder / "claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            mine = _load_run(folder / "state.json")
            if mine is not None:
                self._runs[run.id] = mine
            return
        rc = folder / "rc"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(folder / "output.log", "ab") as log:
            proc = subprocess.Popen([*self.entry, "--rc-file", str(rc), "--", *run.launch_args], cwd=self.cwd,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)  # its own session: a Ctrl-C to the server spares it
        self._procs[run.id] = proc
        run.status, run.pid, run.started = "running", proc.pid, time.time()
        self._save(run)

    def _settle(self, run: Run) -> None:
        proc = self._procs.pop(run.id, None)
        code: Optional[int] = None
        try:
            code = int((self.run_dir(run.id) / "rc").read_text().strip())
        except (OSError, ValueError):
            if proc is not None:
                code = proc.returncode
        if run.trial is None:
            run.trial = self._find_trial(run)
        run.returncode, run.ended = code, time.time()
        trial = Path(run.trial) if run.trial else None
        ckpt = trial / "ckpts" / "last.ckpt" if trial is not None else None
        if code == 0:
            run.status, run.message = "done", "finished"
        elif code == INTERRUPTED or (run.status == "stopping" and code is not None and code != 2):
            # Asked to stop: 130 from the launcher's own Ctrl-C path; a stop that lands while Lightning
            # sets up (before the launcher's handler is in place) ends with Lightning's own exit code.
            run.status = "stopped"
            if ckpt is not None and ckpt.is_file():
                step = (read_progress(trial) or {}).get("step")
                resume = shlex.join(["python", "launch.py", "--config", str(trial / "configs" / "parsed.yaml"),
                                     "--train", f"resume={ckpt}"])
                run.message = (f"stopped{f' at step {step}' if step is not None else ''}; saved {ckpt}. "
                               f"Continue with: {resume}")
            else:
                run.message = "stopped before training began; nothing was saved"
        else:
            run.status = "failed"
            tail = self.log_tail(run.id, 16000).splitlines()
            errors = [ln for ln in tail if ln.startswith("error:")]
            if errors:
                run.message = "\n".join(errors[-3:])
            elif code is None:
                run.message = "the run's process ended without an exit status (killed?)\n" + "\n".join(tail[-8:])
            elif code < 0:
                name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
                run.message = f"the run's process was killed ({name})\n" + "\n".join(tail[-8:])
            else:
                run.message = f"exit status {code}\n" + "\n".join(tail[-12:])
        self._save(run)

    def _loop(self, poll_s: float) -> None:
        while not self._stop_event.wait(poll_s):
            try:
                self.poll()
            except Exception as exc:  # keep watching: one bad state file must not stop the queue
                print(f"[lift3d app] run manager: {type(exc).__name__}: {exc}", file=sys.stderr)

    def close(self) -> None:
        """Stop watching (the runs themselves go on; a later manager reattaches)."""
        if self._thread is not None:
            self._stop_event.set()
            self._thread.join(5)
            self._thread = None

    # -- reading --------------------------------------------------------------------------------

    def get(self, run_id: str) -> Run:
        with self._lock:
            return self._runs[run_id]

    def runs(self) -> list[Run]:
        """Every run this root has seen, newest first."""
        with self._lock:
            return sorted(self._runs.values(), key=lambda r: (r.created, r.id), reverse=True)

    def queue(self) -> list[Run]:
        """Queued runs in the order they will start."""
        with self._lock:
            return sorted((r for r in self._runs.values() if r.status == "queued"), key=lambda r: (r.created, r.id))

    def current(self) -> Optional[Run]:
        """The run a page that opens should show: a running one, else the next queued, else the newest."""
        runs = self.runs()
        active = sorted((r for r in runs if r.status in ("running", "stopping")), key=lambda r: (r.started or 0, r.id))
        if active:
            return active[0]  # several devices: the one running longest
        waiting = self.queue()
        if waiting:
            return waiting[0]
        return runs[0] if runs else None

    def trials(self) -> list[Path]:
        """Trial folders under ``root`` (from the page or the command line), newest first."""
        found = []
        from lift3d.launch import is_trial_dir

        for cfg_dir in self.root.iterdir() if self.root.is_dir() else []:
            if cfg_dir.name.startswith(".") or not cfg_dir.is_dir():
                continue
            for trial in cfg_dir.iterdir():
                if is_trial_dir(trial):
                    found.append(trial)
        return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)

    def snapshot(self, run_id: Optional[str] = None, trial: Optional[str | Path] = None) -> dict[str, Any]:
        """Everything a page shows about a run (or a trial folder): status, progress, newest outputs."""
        run = self.get(run_id) if run_id else None
        if run is not None and run.trial:
            trial = run.trial
        t = Path(trial) if trial else None
        prog = read_progress(t) if t is not None else None
        outs = trial_outputs(t) if t is not None else {}
        snap: dict[str, Any] = {"run": asdict(run) if run else None, "trial": str(t) if t else None,
                                "progress": prog, **outs}
        status = run.status if run is not None else ("done" if outs.get("export_dir") else "trial")
        snap["status"] = status
        phase = None
        if status in ("running", "stopping"):
            p = (prog or {}).get("phase")
            phase = {None: "starting", "train": "training", "validate": "validating",
                     "trained": "rendering the turntable", "test": "rendering the turntable",
                     "tested": "exporting"}.get(p, p)
            if status == "stopping":
                phase = "stopping: saving a checkpoint"
        elif status == "queued" and run is not None:
            ahead = [r.id for r in self.queue()]
            phase = f"queued ({ahead.index(run.id) + 1} in line)" if run.id in ahead else "queued"
        snap["phase"] = phase
        snap["zip"] = self.obj_zip(outs["export_dir"]) if outs.get("obj") else None
        if run is not None:
            snap["command"] = run.command
        return snap

    def obj_zip(self, export_dir: Path) -> Optional[Path]:
        """``model.obj`` + ``model.mtl`` + textures of an export, zipped once into the app's cache."""
        export_dir = Path(export_dir)
        files = sorted(p for p in export_dir.iterdir() if p.suffix.lower() in (".obj", ".mtl", ".png"))
        if not files:
            return None
        trial = export_dir.parent.parent
        folder = self.root / APP_DIR / "downloads" / trial.parent.name / trial.name
        path = folder / f"{trial.parent.name}-{export_dir.name}-obj.zip"
        if path.is_file() and path.stat().st_mtime > max(p.stat().st_mtime for p in files):
            return path
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for p in files:
                z.write(p, p.name)
        os.replace(tmp, path)
        return path


def validation_grid(val_dir: Path, out_path: Path) -> Optional[Path]:
    """The views of a validation folder side by side in one PNG (each view is already an
    rgb | normal | opacity strip, stacked here top to bottom), cached at ``out_path``."""
    import imageio.v3 as iio
    import numpy as np

    views = sorted(val_dir.glob("*.png"), key=lambda p: (len(p.stem), p.stem))
    if not views:
        return None
    if out_path.is_file() and out_path.stat().st_mtime > max(p.stat().st_mtime for p in views):
        return out_path
    imgs = []
    for p in views:
        try:
            a = np.asarray(iio.imread(p))
        except Exception:  # a file being written: next time
            return out_path if out_path.is_file() else None
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        imgs.append(a[:, :, :3])
    width = max(a.shape[1] for a in imgs)
    imgs = [np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0))) for a in imgs]
    grid = np.concatenate(imgs, axis=0)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    iio.imwrite(tmp, grid, extension=".png")
    os.replace(tmp, out_path)
    return out_path


__all__ = ["Run", "RunManager", "RunInputError", "check_launch", "trial_outputs", "read_progress",
           "validation_grid", "process_alive", "LIVE"]
