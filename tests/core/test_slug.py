from __future__ import annotations

import os

import pytest

from lift3d.launch import ExperimentConfig, prompt_slug, trial_dir_for


@pytest.mark.parametrize(
    "prompt",
    ["../../x", "..", "/etc/passwd", "a\\..\\..\\b", "", "   ", "\x00\x1b[31mred\x07", "a" * 5000, "..\u202e/..",
     "con:aux|nul?*<>"],
)
def test_slug_is_one_safe_component_inside_root(tmp_path, prompt):
    slug = prompt_slug(prompt)
    assert slug and os.sep not in slug and "/" not in slug and "\\" not in slug
    assert ".." not in slug and not slug.startswith(".")
    assert all(ord(c) >= 32 and c != "\x7f" for c in slug)
    assert len(slug) <= 64 and len(slug.encode()) <= 180
    cfg = ExperimentConfig(prompt=prompt, exp_root_dir=str(tmp_path / "out"), name="recipe")
    d = trial_dir_for(cfg, "20260101-000000")
    assert (tmp_path / "out").resolve() in d.parents
    assert d.parent.name == "recipe"


def test_slug_keeps_readable_words_and_unicode():
    assert prompt_slug("a DSLR photo of a hamburger") == "a_DSLR_photo_of_a_hamburger"
    assert prompt_slug("un chat noir, café") == "un_chat_noir,_café"
    assert prompt_slug("一只可爱的猫") == "一只可爱的猫"
    assert prompt_slug("") == "untitled"


def test_tag_and_name_are_sanitised_too(tmp_path):
    cfg = ExperimentConfig(prompt="a cube", tag="../../evil", name="../up", exp_root_dir=str(tmp_path))
    d = trial_dir_for(cfg, "t")
    assert tmp_path.resolve() in d.parents
    assert d.name == "evil@t"
