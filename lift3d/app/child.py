"""The process of one web-app run: ``launch.py`` itself, plus an exit status left on disk.

``python -m lift3d.app.child --rc-file RUN/rc -- --config X.yaml --train prompt=...`` sets
``sys.argv`` as ``python launch.py --config X.yaml --train prompt=...`` would and calls the same
:func:`lift3d.launch.main`, so a run from the page is an ordinary trial (thread choice, Ctrl-C
checkpoint, error lines and exit codes included). The only addition: the exit code is written to
the rc file, so a web server started after this process (it outlives the server that launched it)
can still tell how the run ended.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else 1


def write_rc(path: Path, code: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(f"{code}\n", encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[0] != "--rc-file" or args[2] != "--":
        print("usage: python -m lift3d.app.child --rc-file PATH -- LAUNCH_ARGS...", file=sys.stderr)
        return 2
    rc_file = Path(args[1])
    sys.argv = ["launch.py", *args[3:]]
    code = 1
    try:
        from lift3d.launch import main as launch_main

        launch_main()
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc)
    except KeyboardInterrupt:
        # Stop before training began (imports, checks) or while rendering/exporting after it:
        # Ctrl-C's exit status, as the shell would report it.
        print("[lift3d] stopped", file=sys.stderr, flush=True)
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a late Stop must not lose the status
        try:
            write_rc(rc_file, code)
        except OSError as exc:
            print(f"[lift3d] could not write {rc_file}: {exc}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
