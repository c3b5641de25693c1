"""A stand-in for ``python -m lift3d.app.child`` in the run manager's tests: same command line, same
files (trial folder line, ``logs/progress.json``, validation PNGs, ``ckpts/last.ckpt``, export, rc),
same Ctrl-C behaviour (finish the step, save, exit 130), in milliseconds a step instead of a model.

Overrides it reads besides ``exp_root_dir``, ``prompt`` and ``resume``: ``fake.steps`` (30),
``fake.step_s`` (0.05), ``fake.exit=N`` (fail at start with an ``error:`` line and code N),
``fake.sigint_exit=N`` (on SIGINT, exit N at once without a checkpoint).
The checkpoint is a text file holding the step.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def main() -> int:
    args = sys.argv[1:]
    rc_file = Path(args[1])
    launch = args[3:]
    over = dict(a.split("=", 1) for a in launch if "=" in a and not a.startswith("--"))
    config = Path(launch[launch.index("--config") + 1])
    if config.name == "parsed.yaml":  # a continued run reads the settings its trial recorded
        over = {**json.loads(config.read_text()), **over}
    code = run(over)
    rc_file.write_text(f"{code}\n")
    return code


def run(over: dict[str, str]) -> int:
    if "fake.exit" in over:
        print("error: config key 'fake.exit': this run was told to fail", file=sys.stderr, flush=True)
        return int(over["fake.exit"])
    steps = int(over.get("fake.steps", 30))
    step_s = float(over.get("fake.step_s", 0.05))
    start = 0
    if over.get("resume"):
        ckpt = Path(over["resume"])
        trial = ckpt.parent.parent
        start = int(ckpt.read_text())
    else:
        base = Path(over["exp_root_dir"]) / "fake" / (over.get("prompt", "").replace(" ", "_") or "untitled")
        trial = Path(f"{base}@{time.strftime('%Y%m%d-%H%M%S')}")
        k = 1
        while True:
            try:
                trial.mkdir(parents=True)
                break
            except FileExistsError:
                k += 1
                trial = Path(f"{base}@{time.strftime('%Y%m%d-%H%M%S')}-{k}")
        for sub in ("configs", "ckpts", "save", "logs"):
            (trial / sub).mkdir()
        (trial / "configs" / "parsed.yaml").write_text(json.dumps(over))  # JSON is YAML
    print(f"[lift3d] trial folder: {trial}", flush=True)
    stop = []
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    progress = trial / "logs" / "progress.json"
    t0 = time.monotonic()
    for step in range(start + 1, steps + 1):
        time.sleep(step_s)
        stage = 0 if step <= steps * 2 // 3 else 1
        write_json(progress, {"phase": "train", "step": step, "max_steps": steps, "stage": ["coarse", "fine"][stage],
                              "stage_index": stage, "n_stages": 2, "pid": os.getpid(),
                              "steps_per_s": (step - start) / (time.monotonic() - t0), "time": time.time(),
                              "losses": {"loss": 1.0 / step, "loss_sds": 0.5 / step}})
        if step % 10 == 0:
            val = trial / "save" / f"it{step}-val"
            val.mkdir(exist_ok=True)
            for v in range(2):
                iio.imwrite(val / f"{v}.png", np.full((8, 24, 3), 40 * v + step % 200, np.uint8))
        if stop and "fake.sigint_exit" in over:  # a stop before the launcher's Ctrl-C handler is in place
            return int(over["fake.sigint_exit"])
        if stop:
            (trial / "ckpts" / "last.ckpt").write_text(str(step))
            print(f"[lift3d] interrupted: continue with resume={trial / 'ckpts' / 'last.ckpt'}", flush=True)
            return 130
    (trial / "ckpts" / "last.ckpt").write_text(str(steps))
    (trial / "save" / f"it{steps}-test.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    export = trial / "save" / f"it{steps}-export"
    export.mkdir()
    (export / "model.obj").write_text("mtllib model.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    (export / "model.mtl").write_text("newmtl m\nmap_Kd texture_kd.png\n")
    iio.imwrite(export / "texture_kd.png", np.zeros((4, 4, 3), np.uint8))
    (export / "model.glb").write_bytes(b"glTF")
    write_json(progress, {"phase": "tested", "step": steps, "max_steps": steps, "stage": "fine", "stage_index": 1,
                          "n_stages": 2, "steps_per_s": None, "losses": {}, "pid": os.getpid(), "time": time.time()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
