"""``lift3d app`` / ``python -m lift3d.app``: serve the web page (see :mod:`lift3d.app`)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from lift3d.launch import REPO_ROOT

    p = argparse.ArgumentParser(prog="lift3d app", description="lift3d's web page: prompt or photo in, a mesh out.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--outputs", default="outputs",
                   help="where trials go, as launch.py's exp_root_dir (default outputs)")
    p.add_argument("--configs", default=str(REPO_ROOT / "configs"),
                   help="recipe folder: its *.yaml (real weights) and tiny/*.yaml (toy world)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest image the page accepts (default 20)")
    p.add_argument("--max-active", type=int, default=1,
                   help="runs at once per device; the rest wait in line (default 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if importlib.util.find_spec("gradio") is None:
        print('error: the web app needs gradio: pip install "lift3d[app]" (or make setup, which installs it)',
              file=sys.stderr)
        return 2
    if args.max_active < 1:
        print(f"error: --max-active {args.max_active}: use 1 or more", file=sys.stderr)
        return 2
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from lift3d.app.page import launch
    from lift3d.app.recipes import RecipeBook
    from lift3d.app.runs import RunManager

    configs = Path(args.configs)
    if not (configs / "tiny").is_dir():
        print(f"error: --configs {configs}: no tiny/ recipes there; point it at lift3d's configs folder",
              file=sys.stderr)
        return 2
    manager = RunManager(args.outputs, max_active=args.max_active)
    book = RecipeBook(configs)
    print(f"[lift3d app] trials go to {manager.root}; serving http://{args.host}:{args.port}", flush=True)
    try:
        launch(manager, book, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb)
    except KeyboardInterrupt:
        pass
    finally:
        manager.close()
    live = [r for r in manager.runs() if r.status in ("running", "stopping")]
    if live:
        print(f"[lift3d app] {len(live)} run(s) go on; `lift3d app` again reattaches to them", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
