"""The ``lift3d`` console script: ``lift3d app ...`` serves the web page (:mod:`lift3d.app`), anything
else is ``launch.py``'s command line (:func:`lift3d.launch.main`). It sits above both, so neither
imports the other."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    words = sys.argv[1:] if argv is None else list(argv)
    if words[:1] == ["app"]:
        from lift3d.app.__main__ import main as app_main

        sys.exit(app_main(words[1:]))
    from lift3d.launch import main as launch_main

    launch_main(argv)


if __name__ == "__main__":
    main()
