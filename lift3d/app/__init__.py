"""lift3d's web app: a prompt or a photo in, a run to watch, a mesh to orbit and download.

``lift3d app`` (or ``python -m lift3d.app``) serves a gradio page on 127.0.0.1. The logic lives in
:mod:`lift3d.app.runs` (the run manager: queue, processes, progress, stop, reattach) and
:mod:`lift3d.app.recipes` (which recipes can run here), neither of which imports gradio;
:mod:`lift3d.app.page` is the page over them. Needs the ``app`` extra (``pip install "lift3d[app]"``).
"""
