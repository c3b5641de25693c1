"""The web app's recipe picker and form, without a browser: which recipes can run, what the form
becomes on the command line, what uploads are accepted, and the ``lift3d app`` command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lift3d.app.page import UploadError, accept_upload, build_overrides
from lift3d.app.recipes import DEFAULT_RECIPE, RecipeBook, check_weights, step_overrides
from lift3d.app.runs import RunManager

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def book():
    return RecipeBook(REPO / "configs", check_real=False)


def test_every_toy_recipe_is_listed_runnable_and_the_default_comes_first(book):
    tiny = {p.stem for p in (REPO / "configs" / "tiny").glob("*.yaml")}
    listed = {r.key[len("tiny/"):] for r in book.recipes.values() if r.toy}
    assert listed == tiny
    assert all(book.get(f"tiny/{name}").runnable for name in tiny)
    ordered = book.ordered()
    assert ordered[0].key == DEFAULT_RECIPE
    assert [r.toy for r in ordered] == sorted((r.toy for r in ordered), reverse=True)  # toy ones before real ones
    assert book.get("tiny/image-to-3d").needs_image and not book.get("tiny/dreamgaussian").needs_image
    assert book.get("tiny/dreamgaussian").stage_steps == [300, 50] and book.get("tiny/dreamgaussian").max_steps == 350


def test_a_real_weight_recipe_is_runnable_only_when_its_weights_are_in_the_cache(book, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    magic3d = book.get("magic3d")
    assert not magic3d.runnable and "checking" in magic3d.label()  # not looked for yet
    check_weights(magic3d)
    assert not magic3d.runnable and magic3d.missing_ids == ["stabilityai/stable-diffusion-2-1-base"]
    assert "hf download stabilityai/stable-diffusion-2-1-base" in magic3d.missing  # the launcher's own message
    assert "missing stabilityai/stable-diffusion-2-1-base" in magic3d.label()
    # The same id, now in the cache (the files the start-up check looks for; nothing is loaded).
    snap = tmp_path / "hub" / "models--stabilityai--stable-diffusion-2-1-base" / "snapshots" / "abc123"
    for f in ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
              "tokenizer/vocab.json", "model_index.json"):
        (snap / f).parent.mkdir(parents=True, exist_ok=True)
        (snap / f).write_text("{}")
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    check_weights(magic3d)
    assert magic3d.runnable and magic3d.missing is None and "weights found" in magic3d.label()
    mvdream = book.get("mvdream")
    check_weights(mvdream)
    assert not mvdream.runnable and "MVDream/MVDream" in mvdream.missing_ids


@pytest.mark.parametrize("steps", [2, 3, 20, 100, 349, 351, 1000])
def test_step_overrides_scale_the_stages_to_the_total_asked(book, steps):
    r = book.get("tiny/dreamgaussian")
    over = dict(o.split("=", 1) for o in step_overrides(r, steps))
    stages = [int(over[f"system.stages.{i}.steps"]) for i in range(2)]
    assert sum(stages) == steps and min(stages) >= 1 and int(over["trainer.max_steps"]) == steps
    assert stages[0] >= stages[1]  # 300:50 keeps its order
    assert 1 <= int(over["trainer.val_check_interval"]) <= steps


def test_step_overrides_of_a_recipe_without_stages_set_max_steps(book):
    r = book.get("tiny/reference")
    assert r.stage_steps == []
    assert step_overrides(r, 50)[0] == "trainer.max_steps=50"


def test_the_form_becomes_the_overrides_one_would_type(book, tmp_path):
    r = book.get("tiny/dreamgaussian")
    assert build_overrides(r, "a red cube", None, False, 0, 350, 5.0) == ["prompt=a red cube", "seed=0"]
    over = build_overrides(r, "a red cube", None, False, 3, 20, 7.5)
    assert over[:2] == ["prompt=a red cube", "seed=3"] and "trainer.max_steps=20" in over
    assert over[-1] == "system.guidance.guidance_scale=7.5"
    img = tmp_path / "x.png"
    assert build_overrides(r, "", img, True, None, None, None) == \
        ["prompt=''", f"image={img}", "data.remove_background=auto"]


@pytest.mark.parametrize("text", ["a red cube", "a cube: red", "a cube #1", "123", "null", "[x]", "it's ${seed}", ""])
def test_a_typed_prompt_reaches_the_run_verbatim(text, tmp_path):
    from lift3d.app.page import prompt_of_override, prompt_override
    from lift3d.config import load_config, resolve

    recipe = tmp_path / "r.yaml"
    recipe.write_text("prompt: x\nseed: 3\nsystem:\n  prompt: ${prompt}\n")
    override = prompt_override(text)
    raw, prov = load_config(recipe, [override])
    assert resolve(raw, prov)["system"]["prompt"] == text
    assert prompt_of_override(override) == text  # what the page shows again for a run


def test_an_image_recipe_takes_the_upload_and_its_camera(book, tmp_path):
    from lift3d.app.runs import check_launch
    from lift3d.priors.toyworld.__main__ import main as toyworld

    r = book.get("tiny/image-to-3d")
    assert r.needs_image and r.ref_camera == (0.0, 0.0)
    photo = tmp_path / "snowman.png"
    assert toyworld(["render-image", "--prompt", "a snowman", "--elevation", "10", "--azimuth", "30",
                     "--light", "headlight", "--out", str(photo)]) in (0, None)
    over = build_overrides(r, "a snowman", photo, False, None, None, None, 10, 0)
    assert over == ["prompt=a snowman", f"image={photo}", "data.ref_elevation_deg=10.0"]  # azimuth: the recipe's
    check_launch(["--config", str(r.path), "--train", *over])  # the launcher accepts it (an RGBA PNG)
    # Without an image the camera fields say nothing; a text recipe has none.
    assert build_overrides(r, "a snowman", None, False, None, None, None, 10, 30) == ["prompt=a snowman"]
    assert book.get("tiny/dreamgaussian").ref_camera is None


def test_a_recipe_that_ends_on_gaussians_is_asked_for_the_gaussian_ply(book):
    from lift3d.app.runs import check_launch

    asked = {r.key for r in book.recipes.values() if r.gaussian_ply}
    assert "tiny/reference-gaussians" in asked and "tiny/dreamgaussian" not in asked
    r = book.get("tiny/reference-gaussians")
    over = build_overrides(r, "a red cube", None, False, None, None, None)
    assert over == ["prompt=a red cube", "system.exporter.save_gaussian_ply=true"]
    check_launch(["--config", str(r.path), "--train", *over])  # a key the launcher accepts
    # dreamgaussian ends on a mesh (its Gaussians are gone by export): no PLY to ask for.
    assert "system.exporter.save_gaussian_ply=true" not in build_overrides(
        book.get("tiny/dreamgaussian"), "a red cube", None, False, None, None, None)


def test_uploads_are_type_checked_size_capped_and_copied(tmp_path):
    m = RunManager(tmp_path / "out", check=None, poll_s=0)
    pickled = tmp_path / "weights.pkl"
    pickled.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(UploadError, match="not an accepted image type"):
        accept_upload(m, str(pickled), max_mb=1)
    big = tmp_path / "big.PNG"
    big.write_bytes(b"\0" * (2 * 1024 * 1024))
    with pytest.raises(UploadError, match="the limit is 1 MB"):
        accept_upload(m, str(big), max_mb=1)
    ok = tmp_path / "photo.PNG"
    ok.write_bytes(b"\x89PNG....")
    copied = accept_upload(m, str(ok), max_mb=1)
    assert copied.suffix == ".png" and copied.read_bytes() == ok.read_bytes()
    assert copied.parent == tmp_path / "out" / ".app" / "uploads"
    assert accept_upload(m, None, max_mb=1) is None


def test_lift3d_app_command_binds_to_localhost_by_default():
    from lift3d.app.__main__ import build_parser

    args = build_parser().parse_args([])
    assert args.host == "127.0.0.1" and args.port == 7860
    # ``lift3d app`` goes through the console script's entry point, lift3d.cli:main.
    out = subprocess.run([sys.executable, "-c", "import sys; from lift3d.cli import main; "
                          "sys.argv = ['lift3d', 'app', '--help']; main()"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: lift3d app" in out.stdout and "default 127.0.0.1" in out.stdout
