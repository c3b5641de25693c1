"""The gradio page: a thin layer over :class:`lift3d.app.runs.RunManager` and :mod:`lift3d.app.recipes`.

Everything a run does lives in the manager (and on disk); the page only asks it and shows the
answers, once a second, so a tab can be closed and reopened, or a second tab opened, at any time.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from lift3d.app.recipes import DEFAULT_RECIPE, RecipeBook, step_overrides
from lift3d.app.runs import APP_DIR, RunInputError, RunManager, validation_grid

#: Uploads the page takes: still images that lift3d's image loader (imageio) reads. Nothing else is accepted.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_MAX_UPLOAD_MB = 20


#: Error lines and commands are long: wrap them instead of scrolling sideways.
CSS = ("#message pre, #message pre code, #status pre, #status pre code, #recipe-info pre, #recipe-info pre code "
       "{ white-space: pre-wrap !important; word-break: break-word; }")


class UploadError(ValueError):
    pass


def accept_upload(manager: RunManager, path: Optional[str], max_mb: float) -> Optional[Path]:
    """Copy an uploaded image into the app's folder after checking its type (by name; its pixels are
    read later by the launcher's own image loader, whose errors the page shows) and its size.
    Nothing uploaded is unpickled: images are decoded by imageio from the allowed formats only."""
    if not path:
        return None
    src = Path(path)
    suffix = src.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise UploadError(f"error: {src.name}: not an accepted image type; upload one of {', '.join(IMAGE_SUFFIXES)}")
    size = src.stat().st_size
    if size > max_mb * 1024 * 1024:
        raise UploadError(f"error: {src.name} is {size / 1e6:.1f} MB; the limit is {max_mb:g} MB")
    dst = manager.new_upload_path(suffix)
    shutil.copyfile(src, dst)
    return dst


def prompt_override(prompt: str) -> str:
    """``prompt=...`` that the launcher reads back as exactly ``prompt``: plain where YAML keeps it a string
    as typed, else single-quoted (``a: b``, ``#``, ``123``, ``null``, ``[x]``), with ``${`` escaped so
    that no interpolation runs."""
    from omegaconf import OmegaConf

    if prompt and "${" not in prompt and "\\" not in prompt:
        try:
            if OmegaConf.from_dotlist([f"prompt={prompt}"]).prompt == prompt:
                return f"prompt={prompt}"
        except Exception:  # not valid as a plain value: quote it
            pass
    quoted = prompt.replace("'", "''").replace("${", "\\${")
    return f"prompt='{quoted}'"


def prompt_of_override(override: str) -> str:
    """The prompt a ``prompt=...`` override (as :func:`prompt_override` writes it) stands for."""
    from omegaconf import OmegaConf

    value = OmegaConf.to_container(OmegaConf.from_dotlist([override]), resolve=False)["prompt"]
    return "" if value is None else str(value).replace("\\${", "${")


def build_overrides(recipe: Any, prompt: str, image: Optional[Path], remove_background: bool,
                    seed: Optional[float], steps: Optional[float], guidance_scale: Optional[float],
                    elevation: Optional[float] = None, azimuth: Optional[float] = None) -> list[str]:
    """The ``key=value`` overrides of a page's form, as one would type them after ``launch.py --train``."""
    out = [prompt_override(prompt)]
    if image is not None:
        out.append(f"image={image}")
        if remove_background:
            out.append("data.remove_background=auto")
        if recipe.ref_camera is not None:
            for key, value, default in (("ref_elevation_deg", elevation, recipe.ref_camera[0]),
                                        ("ref_azimuth_deg", azimuth, recipe.ref_camera[1])):
                if value not in (None, "") and float(value) != default:
                    out.append(f"data.{key}={float(value)}")
    if recipe.gaussian_ply:
        out.append("system.exporter.save_gaussian_ply=true")
    if seed is not None and seed != "":
        out.append(f"seed={int(seed)}")
    # The fields show the recipe's own values; only a changed value becomes an override.
    if steps not in (None, "") and int(steps) != recipe.max_steps:
        out += step_overrides(recipe, int(steps))
    if (guidance_scale not in (None, "") and recipe.guidance_scale is not None
            and float(guidance_scale) != recipe.guidance_scale):
        out.append(f"system.guidance.guidance_scale={float(guidance_scale)}")
    return out


def _fmt_loss(x: Any) -> str:
    return "nan" if x is None else f"{x:.4g}"


def status_markdown(snap: dict[str, Any]) -> str:
    run = snap.get("run")
    lines = []
    if run is not None:
        lines.append(f"**Run {run['id']}** ({run['label'] or Path(run['config']).stem}): **{snap['status']}**")
    elif snap.get("trial"):
        lines.append(f"**Trial** `{snap['trial']}`")
    else:
        return "No run yet: type a prompt (or upload an image), pick a recipe and press Start."
    if snap.get("phase"):
        lines.append(f"Phase: {snap['phase']}")
    prog = snap.get("progress")
    if prog:
        stage = ""
        if prog.get("stage"):
            stage = f"stage {prog['stage']} ({prog.get('stage_index', 0) + 1}/{prog.get('n_stages') or 1}), "
        rate = prog.get("steps_per_s")
        total = prog.get("max_steps")
        lines.append(f"{stage}step {prog['step']}{f' / {total}' if total else ''}"
                     + (f", {rate:.2f} steps/s" if rate else ""))
        losses = prog.get("losses") or {}
        if losses:
            lines.append("Loss: " + ", ".join(f"{k} {_fmt_loss(v)}" for k, v in sorted(losses.items())))
    if snap.get("trial") and run is not None:
        lines.append(f"Trial folder: `{snap['trial']}`")
    if run is not None and run.get("message") and snap["status"] in ("stopped", "failed", "cancelled"):
        lines.append("```\n" + run["message"] + "\n```")
    if snap.get("command"):
        lines.append(f"Same run from a shell: `{snap['command']}`")
    return "\n\n".join(lines)


def build_page(manager: RunManager, book: RecipeBook, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB):
    import gradio as gr

    rembg = importlib.util.find_spec("rembg") is not None
    cache = manager.root / APP_DIR / "cache"

    def recipe_choices() -> list[tuple[str, str]]:
        return [(r.label(), r.key) for r in book.ordered()]

    def recipe_info(key: str) -> str:
        try:
            r = book.get(key)
        except KeyError:
            return ""
        lines = [r.description or ""]
        facts = [f"{'an image (and optionally a prompt)' if r.needs_image else 'a prompt'} in",
                 f"{r.max_steps} steps" + (f" in {len(r.stage_steps)} stages" if r.stage_steps else "")]
        if r.guidance_scale is not None:
            facts.append(f"guidance scale {r.guidance_scale:g}")
        lines.append("; ".join(facts) + f". Config: `{r.path}`")
        if r.error:
            lines.append(f"```\n{r.error}\n```")
        elif r.missing:
            lines.append(f"Weights missing:\n```\n{r.missing}\n```")
        elif not r.toy and not r.checked:
            lines.append("Looking for its weights on this machine...")
        return "\n\n".join(x for x in lines if x)

    def run_choices() -> list[tuple[str, str]]:
        return [(f"{r.id}  {r.status}  {r.label}", r.id) for r in manager.runs()]

    def trial_choices() -> list[tuple[str, str]]:
        root = manager.root
        return [(str(t.relative_to(root)), str(t)) for t in manager.trials()]

    def on_load():
        cur = manager.current()
        run_id = cur.id if cur is not None else None
        # A page opened on a run shows its prompt (the last prompt= override, as the launcher reads it).
        prompts = [o for o in (cur.overrides if cur is not None else []) if o.startswith("prompt=")]
        text = prompt_of_override(prompts[-1]) if prompts else ""
        return (run_id, None, gr.Dropdown(choices=recipe_choices()),
                gr.Dropdown(choices=run_choices(), value=run_id), gr.Dropdown(choices=trial_choices(), value=None),
                {}, gr.Textbox(value=text) if text else gr.skip())

    def on_start(prompt, upload, remove_bg, recipe_key, seed, steps, guidance, elevation, azimuth, cur_run):
        try:
            recipe = book.get(recipe_key)
        except KeyError as exc:
            return cur_run, gr.skip(), f"```\nerror: {exc}\n```", gr.skip()
        try:
            image = accept_upload(manager, upload, max_upload_mb)
        except UploadError as exc:
            return cur_run, gr.skip(), f"```\n{exc}\n```", gr.skip()
        try:
            overrides = build_overrides(recipe, (prompt or "").strip(), image, bool(remove_bg), seed, steps, guidance,
                                        elevation, azimuth)
        except ValueError as exc:
            if image is not None:
                image.unlink(missing_ok=True)
            return cur_run, gr.skip(), f"```\nerror: {exc}\n```", gr.skip()
        what = (prompt or "").strip() or (Path(upload).name if upload else "")
        try:
            run = manager.submit(recipe.path, overrides, label=f"{recipe.key}: {what}", input_file=image)
        except RunInputError as exc:
            msg = str(exc)
            if image is not None:  # name the file as the person uploaded it, not the app's copy
                msg = msg.replace(str(image), Path(upload).name)
            return cur_run, gr.skip(), f"```\n{msg}\n```", gr.skip()
        state = "started" if run.status == "running" else manager.snapshot(run.id)["phase"]
        return (run.id, None, f"Run {run.id} {state}.",
                gr.Dropdown(choices=run_choices(), value=run.id))

    def on_stop(run_id):
        if not run_id:
            return "No run selected."
        run = manager.stop(run_id)
        if run.status == "stopping":
            return f"Stopping run {run.id}: it saves a checkpoint at the end of the current step."
        return f"Run {run.id}: {run.status}."

    def on_resume(run_id, trial):
        target = run_id or trial
        if not target:
            return run_id, "No run or trial selected.", gr.skip()
        try:
            run = manager.resume(target)
        except RunInputError as exc:
            return run_id, f"```\n{exc}\n```", gr.skip()
        return run.id, f"Run {run.id} continues from the checkpoint.", gr.Dropdown(choices=run_choices(), value=run.id)

    def media_update(shown: dict, key: str, path: Optional[Path], make):
        """Only send a file when it changed: re-sending restarts the video and resets the 3D view."""
        value = str(path) if path else None
        if shown.get(key, "unset") == value:
            return gr.skip()
        shown[key] = value
        return make(value)

    def on_tick(run_id, trial, shown, runs_sig, book_sig):
        shown = dict(shown or {})
        if run_id:
            try:
                snap = manager.snapshot(run_id=run_id)
            except KeyError:
                snap = {"run": None, "trial": None, "status": "unknown"}
        elif trial:
            snap = manager.snapshot(trial=trial)
        else:
            snap = {"run": None, "trial": None, "status": "none"}
        if shown.get("target") != (run_id, trial):
            shown = {"target": (run_id, trial)}
        val = None
        if snap.get("val_dir") is not None:
            vd = Path(snap["val_dir"])
            n = len(list(vd.glob("*.png")))  # in the name: a grid made while views were still being written is redone
            trial_dir = vd.parent.parent
            val = validation_grid(vd, cache / trial_dir.parent.name / trial_dir.name / f"{vd.name}-{n}.png")
        out = [
            status_markdown(snap),
            media_update(shown, "val", val, lambda v: v),
            media_update(shown, "video", snap.get("video"), lambda v: v),
            media_update(shown, "glb", snap.get("glb"), lambda v: v),
            media_update(shown, "zip", snap.get("zip"),
                         lambda v: gr.DownloadButton(value=v, interactive=v is not None)),
            media_update(shown, "glb_dl", snap.get("glb"),
                         lambda v: gr.DownloadButton(value=v, interactive=v is not None)),
            media_update(shown, "ply", snap.get("gaussian_ply"),
                         lambda v: gr.DownloadButton(value=v, interactive=v is not None,
                                                     label="Gaussian PLY" if v else "Gaussian PLY (not exported)")),
        ]
        sig = [(r.id, r.status) for r in manager.runs()]
        if sig != runs_sig:
            runs_update = gr.Dropdown(choices=run_choices(), value=run_id)
            trials_update = gr.Dropdown(choices=trial_choices(), value=trial)
        else:
            runs_update = trials_update = gr.skip()
        # Real-weight recipes are checked in the background: relabel them once they are.
        checked = sum(r.checked for r in book.recipes.values())
        recipes_update = gr.Dropdown(choices=recipe_choices()) if checked != book_sig else gr.skip()
        return [*out, shown, sig, runs_update, trials_update, checked, recipes_update]

    with gr.Blocks(title="lift3d") as page:
        run_state = gr.State(None)
        trial_state = gr.State(None)
        shown_state = gr.State({})
        runs_sig = gr.State(None)
        book_sig = gr.State(None)
        gr.Markdown("# lift3d\nA prompt or a photo in, a textured mesh out: per-prompt optimization on this machine.")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", placeholder="a red cube", elem_id="prompt")
                upload = gr.File(label=f"Image (RGBA PNG, or RGB; {', '.join(IMAGE_SUFFIXES)}; at most "
                                       f"{max_upload_mb:g} MB)", file_types=list(IMAGE_SUFFIXES), type="filepath",
                                 elem_id="image")
                remove_bg = gr.Checkbox(label="Remove the background of an RGB image (rembg)" if rembg else
                                        "Remove the background (needs rembg: pip install \"lift3d[rembg]\")",
                                        value=False, interactive=rembg, elem_id="remove-bg")
                recipe = gr.Dropdown(choices=recipe_choices(), value=DEFAULT_RECIPE, label="Recipe",
                                     elem_id="recipe")
                info = gr.Markdown(recipe_info(DEFAULT_RECIPE), elem_id="recipe-info")
                with gr.Accordion("Advanced", open=False, elem_id="advanced"):
                    seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                    first = book.get(DEFAULT_RECIPE) if DEFAULT_RECIPE in book.recipes else None
                    steps = gr.Number(label="Steps (all stages, scaled in proportion)", precision=0, minimum=1,
                                      value=first.max_steps if first else None, elem_id="steps")
                    guidance = gr.Number(label="Guidance scale", elem_id="guidance",
                                         value=first.guidance_scale if first else None)
                    cam = first.ref_camera if first is not None and first.ref_camera is not None else None
                    with gr.Row():  # image recipes only: the camera the photo was taken from
                        elevation = gr.Number(label="Image camera elevation (deg)", value=cam and cam[0],
                                              visible=cam is not None, elem_id="ref-elevation")
                        azimuth = gr.Number(label="Image camera azimuth (deg)", value=cam and cam[1],
                                            visible=cam is not None, elem_id="ref-azimuth")
                with gr.Row():
                    start = gr.Button("Start", variant="primary", elem_id="start")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    resume = gr.Button("Continue", elem_id="resume")
                message = gr.Markdown(elem_id="message")
                runs = gr.Dropdown(choices=run_choices(), label="Runs started from this page", elem_id="runs")
                trials = gr.Dropdown(choices=trial_choices(), label="Trials in the outputs folder", elem_id="trials")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="status")
                val = gr.Image(label="Latest validation views (rgb | normal | opacity)", type="filepath",
                               interactive=False, elem_id="val", height=320)
                with gr.Row():
                    video = gr.Video(label="Turntable", interactive=False, elem_id="video", height=320, loop=True,
                                     autoplay=True)
                    model = gr.Model3D(label="Model (GLB)", elem_id="model3d", height=320)
                with gr.Row():
                    dl_zip = gr.DownloadButton("OBJ + MTL + PNG (zip)", interactive=False, elem_id="dl-zip")
                    dl_glb = gr.DownloadButton("GLB", interactive=False, elem_id="dl-glb")
                    dl_ply = gr.DownloadButton("Gaussian PLY", interactive=False, elem_id="dl-ply")
        timer = gr.Timer(1.0)

        def on_recipe(key):
            try:
                r = book.get(key)
            except KeyError:
                return recipe_info(key), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            elev, azim = r.ref_camera if r.ref_camera is not None else (None, None)
            return (recipe_info(key), gr.Number(value=r.max_steps),
                    gr.Number(value=r.guidance_scale, interactive=r.guidance_scale is not None),
                    gr.Number(value=elev, visible=elev is not None),
                    gr.Number(value=azim, visible=azim is not None))

        recipe.change(on_recipe, recipe, [info, steps, guidance, elevation, azimuth], show_progress="hidden")
        start.click(on_start, [prompt, upload, remove_bg, recipe, seed, steps, guidance, elevation, azimuth, run_state],
                    [run_state, trial_state, message, runs])
        stop.click(on_stop, run_state, message)
        resume.click(on_resume, [run_state, trial_state], [run_state, message, runs])
        runs.input(lambda v: (v, None), runs, [run_state, trial_state])
        trials.input(lambda v: (None, v), trials, [run_state, trial_state])
        timer.tick(on_tick, [run_state, trial_state, shown_state, runs_sig, book_sig],
                   [status, val, video, model, dl_zip, dl_glb, dl_ply, shown_state, runs_sig, runs, trials, book_sig,
                    recipe], show_progress="hidden")
        page.load(on_load, None, [run_state, trial_state, recipe, runs, trials, shown_state, prompt])
    return page


def launch(manager: RunManager, book: RecipeBook, host: str = "127.0.0.1", port: int = 7860,
           max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, block: bool = True):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    page = build_page(manager, book, max_upload_mb)
    page.queue(default_concurrency_limit=4)
    import gradio as gr

    # System fonts: the default theme would fetch its fonts from the internet, and this page works offline.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "Consolas", "monospace"])
    page.launch(server_name=host, server_port=port, max_file_size=f"{max_upload_mb:g}mb", css=CSS, theme=theme,
                allowed_paths=[str(manager.root)], ssr_mode=False, share=False, show_error=True,
                prevent_thread_lock=not block, quiet=False)
    return page
