"""A later layer that changes ``<slot>_type`` starts ``<slot>`` afresh (lift3d/config.py, README "Configs").

Layers are the files of an ``extends`` chain and then the command line. Before this rule, swapping
``guidance_type`` in a recipe that inherits another guidance merged the old guidance's settings into
the new one, and its strict Config stopped on keys it had never heard of.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lift3d.config import CLI_SOURCE, ConfigError, load_config, parse_structured, resolve

REPO = Path(__file__).resolve().parents[2]

# Every <slot>_type / <slot> pair a recipe has: the experiment's and the system's.
PAIRS = [
    "data", "system",
    "system.geometry", "system.material", "system.background", "system.renderer",
    "system.guidance", "system.prompt_processor", "system.exporter",
]


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def _nest(path: str, leaf: str, indent: int = 0) -> str:
    """YAML setting ``<path>_type`` and ``<path>`` from ``leaf`` (``type: old`` / ``block: {a: 1}``)."""
    *parents, slot = path.split(".")
    lines, pad = [], ""
    for p in parents:
        lines.append(f"{pad}{p}:")
        pad += "  "
    lines += [pad + line.format(slot=slot) for line in leaf.splitlines()]
    return "\n".join(lines) + "\n"


def _get(data: dict, path: str):
    for part in path.split("."):
        data = data[part]
    return data


@pytest.mark.parametrize("pair", PAIRS)
def test_a_file_that_changes_the_type_drops_the_inherited_settings(tmp_path, pair):
    _write(tmp_path, "base.yaml", _nest(pair, "{slot}_type: old-type\n{slot}: {{old_key: 1, shared: 2}}"))
    child = _write(tmp_path, "child.yaml",
                   "extends: base.yaml\n" + _nest(pair, "{slot}_type: new-type\n{slot}: {{new_key: 3}}"))
    raw, prov = load_config(child)
    data = resolve(raw, prov)
    assert _get(data, pair) == {"new_key": 3}, f"{pair} kept settings of the type its base named"
    assert _get(data, f"{pair}_type") == "new-type"
    assert prov.source(f"{pair}.new_key") == str(child)
    assert prov.source(pair) == str(child)


@pytest.mark.parametrize("pair", PAIRS)
def test_an_override_that_changes_the_type_drops_the_inherited_settings(tmp_path, pair):
    p = _write(tmp_path, "r.yaml", _nest(pair, "{slot}_type: old-type\n{slot}: {{old_key: 1}}"))
    # The block's keys come before the type on purpose: the command line is one layer, order inside it is free.
    raw, prov = load_config(p, [f"{pair}.new_key=3", f"{pair}_type=new-type"])
    data = resolve(raw, prov)
    assert _get(data, pair) == {"new_key": 3}
    assert prov.source(pair) == CLI_SOURCE and prov.source(f"{pair}.new_key") == CLI_SOURCE


@pytest.mark.parametrize("how", ["file", "override"])
def test_naming_the_same_type_again_keeps_the_settings(tmp_path, how):
    base = _write(tmp_path, "base.yaml",
                  "system:\n  guidance_type: a-guidance\n  guidance: {scale: 5.0, steps: 2}\n")
    if how == "file":
        child = _write(tmp_path, "child.yaml",
                       "extends: base.yaml\nsystem:\n  guidance_type: a-guidance\n  guidance: {steps: 4}\n")
        raw, prov = load_config(child)
    else:
        raw, prov = load_config(base, ["system.guidance_type=a-guidance", "system.guidance.steps=4"])
    assert resolve(raw, prov)["system"]["guidance"] == {"scale": 5.0, "steps": 4}
    assert prov.source("system.guidance.scale") == str(base)


def test_a_type_change_without_a_block_leaves_an_empty_slot_owned_by_that_layer(tmp_path):
    _write(tmp_path, "base.yaml", "system:\n  guidance_type: a-guidance\n  guidance: {scale: 5.0}\n")
    child = _write(tmp_path, "child.yaml", "extends: base.yaml\nsystem:\n  guidance_type: b-guidance\n")
    raw, prov = load_config(child)
    assert resolve(raw, prov)["system"]["guidance"] == {}
    assert prov.source("system.guidance") == str(child)


def test_an_interpolated_type_is_compared_by_its_value(tmp_path):
    _write(tmp_path, "base.yaml",
           "kind: a-guidance\nsystem:\n  guidance_type: ${kind}\n  guidance: {scale: 5.0}\n")
    same = _write(tmp_path, "same.yaml", "extends: base.yaml\nsystem:\n  guidance_type: a-guidance\n")
    other = _write(tmp_path, "other.yaml", "extends: base.yaml\nsystem:\n  guidance_type: b-guidance\n")
    assert resolve(*load_config(same))["system"]["guidance"] == {"scale": 5.0}
    assert resolve(*load_config(other))["system"]["guidance"] == {}


def test_later_base_in_an_extends_list_retypes_an_earlier_one(tmp_path):
    _write(tmp_path, "a.yaml", "system:\n  guidance_type: a-guidance\n  guidance: {scale: 5.0}\n")
    b = _write(tmp_path, "b.yaml", "system:\n  guidance_type: b-guidance\n  guidance: {color: [1, 0, 0]}\n")
    c = _write(tmp_path, "c.yaml", "extends: [a.yaml, b.yaml]\nsystem:\n  guidance: {strength: 2.0}\n")
    raw, prov = load_config(c)
    assert resolve(raw, prov)["system"]["guidance"] == {"color": [1, 0, 0], "strength": 2.0}
    assert prov.source("system.guidance.color") == str(b)
    assert prov.source("system.guidance.strength") == str(c)
    assert prov.source("system.guidance") == str(c)


def test_a_retyped_slot_inside_a_retyped_slot(tmp_path):
    """``system_type`` changed: the whole system block starts afresh, its inner slots with it."""
    _write(tmp_path, "base.yaml",
           "system_type: a-system\nsystem:\n  guidance_type: a-guidance\n  guidance: {scale: 5.0}\n")
    child = _write(tmp_path, "child.yaml",
                   "extends: base.yaml\nsystem_type: b-system\nsystem:\n  guidance_type: b-guidance\n")
    assert resolve(*load_config(child))["system"] == {"guidance_type": "b-guidance"}


STAGED = """
system:
  guidance_type: a-guidance
  guidance: {scale: 5.0}
  guidances:
    ref:
      guidance_type: ref-guidance
      views: ref
      guidance: {mask_loss: mse}
  stages:
    - name: coarse
      steps: 10
    - name: fine
      steps: 10
      guidance_type: refine-guidance
      guidance: {strength: 0.3}
      guidances:
        ref:
          guidance_type: ref-guidance
          guidance: {mask_loss: l1}
"""


def test_named_guidances_and_stage_slots_follow_the_same_rule(tmp_path):
    p = _write(tmp_path, "r.yaml", STAGED)
    raw, prov = load_config(p, [
        "system.guidances.ref.guidance_type=other-ref-guidance", "system.guidances.ref.guidance.weight=2",
        "system.stages.1.guidance_type=other-refine-guidance",
        "system.stages.1.guidances.ref.guidance_type=third-ref-guidance",
    ])
    system = resolve(raw, prov)["system"]
    assert system["guidances"]["ref"] == {"guidance_type": "other-ref-guidance", "views": "ref",
                                          "guidance": {"weight": 2}}
    fine = system["stages"][1]
    assert fine["guidance"] == {} and fine["guidances"]["ref"]["guidance"] == {}
    assert system["guidance"] == {"scale": 5.0}, "a stage's type must not reset the system's slot"
    assert prov.source("system.stages[1].guidance") == CLI_SOURCE
    assert prov.source("system.guidances.ref.guidance.weight") == CLI_SOURCE
    assert prov.source("system.guidances.ref.views") == str(p)


def test_an_extension_retypes_a_named_guidance(tmp_path):
    _write(tmp_path, "base.yaml", STAGED)
    child = _write(tmp_path, "child.yaml", "extends: base.yaml\nsystem:\n  guidances:\n    ref:\n"
                                           "      guidance_type: other-ref-guidance\n      guidance: {weight: 2}\n")
    raw, prov = load_config(child)
    ref = resolve(raw, prov)["system"]["guidances"]["ref"]
    assert ref["guidance"] == {"weight": 2} and ref["views"] == "ref"


def test_a_stage_that_inherits_its_type_keeps_its_settings(tmp_path):
    """``guidance_type: null`` in a stage names no type: it cannot retype anything."""
    p = _write(tmp_path, "r.yaml", STAGED)
    raw, prov = load_config(p, ["system.stages.1.guidance_type=null"])
    assert resolve(raw, prov)["system"]["stages"][1]["guidance"] == {"strength": 0.3}


@dataclass
class _NewGuidanceConfig:
    color: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])


def test_errors_in_the_new_block_name_the_layer_that_wrote_it(tmp_path):
    _write(tmp_path, "base.yaml", "system:\n  guidance_type: a-guidance\n  guidance: {background: 0.0}\n")
    child = _write(tmp_path, "child.yaml",
                   "extends: base.yaml\nsystem:\n  guidance_type: b-guidance\n  guidance: {colour: [1, 0, 0]}\n")
    raw, prov = load_config(child)
    block = resolve(raw, prov)["system"]["guidance"]
    with pytest.raises(ConfigError) as err:
        parse_structured(_NewGuidanceConfig, block, key="system.guidance", prov=prov, owner="b-guidance")
    msg = str(err.value)
    assert "system.guidance.colour" in msg and str(child) in msg and "Did you mean 'color'" in msg
    assert "background" not in msg

    raw, prov = load_config(tmp_path / "base.yaml", ["system.guidance_type=b-guidance", "system.guidance.colour=[1]"])
    with pytest.raises(ConfigError, match=r"system.guidance.colour' \(set in the command line\) for b-guidance"):
        parse_structured(_NewGuidanceConfig, resolve(raw, prov)["system"]["guidance"], key="system.guidance",
                         prov=prov, owner="b-guidance")


def test_the_issue_case_a_new_guidance_over_the_reference_recipe():
    """docs/plugins.md's swap: the reference guidance's ``background`` must not reach mean-color-guidance."""
    raw, prov = load_config(REPO / "configs/tiny/reference.yaml",
                            ["system.guidance_type=mean-color-guidance", "system.guidance={color: [0.9, 0.1, 0.2]}"])
    data = resolve(raw, prov)
    assert data["system"]["guidance"] == {"color": [0.9, 0.1, 0.2]}
    assert prov.source("system.guidance.color") == CLI_SOURCE
    # Untouched slots still come from their files.
    assert prov.source("system.background.color").endswith("toyworld-reference.yaml")


def test_image_to_3d_keeps_dreamfusions_random_views():
    """image-to-3d changes the data type, so it must state the random-view settings it scores with."""
    tiny = REPO / "configs" / "tiny"
    dreamfusion = resolve(*load_config(tiny / "dreamfusion.yaml"))["data"]
    image = resolve(*load_config(tiny / "image-to-3d.yaml", ["image=x.png"]))["data"]
    differ = {k: (v, image.get(k)) for k, v in dreamfusion.items() if image.get(k) != v}
    assert not differ, f"configs/tiny/image-to-3d.yaml data differs from dreamfusion's (theirs, its): {differ}"
