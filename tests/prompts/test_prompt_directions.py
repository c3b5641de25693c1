"""View buckets, prompt rewording, row selection per camera and Perp-Neg weights."""

from __future__ import annotations

import math

import pytest
import torch

from lift3d.prompts.base import PromptUtils
from lift3d.prompts.directions import (
    PerpNegFalloffs,
    ViewDirection,
    direction_template,
    make_view_directions,
    wrap_azimuth,
)
from lift3d.registry import find

# -- buckets ------------------------------------------------------------------------------------

# (elevation, azimuth, expected bucket) at and around the default thresholds 45 / 45 / 60.
EDGES = [
    (0.0, 0.0, "front"),
    (0.0, 44.9, "front"),
    (0.0, -44.9, "front"),
    (0.0, 45.0, "side"),  # the ranges are open
    (0.0, -45.0, "side"),
    (0.0, 90.0, "side"),
    (0.0, 135.0, "side"),
    (0.0, 135.1, "back"),
    (0.0, -135.1, "back"),
    (0.0, 180.0, "back"),
    (0.0, -180.0, "back"),
    (0.0, 225.0, "side"),  # wraps to -135: on the back edge
    (0.0, 224.9, "back"),
    (0.0, 315.1, "front"),  # azimuths wrap
    (0.0, 360.0, "front"),
    (0.0, 719.0, "front"),
    (60.0, 0.0, "front"),  # overhead is strictly above 60
    (60.1, 0.0, "overhead"),
    (89.0, 180.0, "overhead"),  # overhead wins over front/back
    (-80.0, 180.0, "back"),  # looking up from below is not overhead
]


def test_direction_buckets_at_the_edges():
    u = PromptUtils("a hamburger")
    ele = torch.tensor([e for e, _, _ in EDGES])
    azi = torch.tensor([a for _, a, _ in EDGES])
    got = [u.directions[i].name for i in u.direction_index(ele, azi).tolist()]
    assert got == [name for _, _, name in EDGES]


def test_direction_index_is_long_and_on_the_camera_device():
    u = PromptUtils("x")
    idx = u.direction_index(torch.tensor([0.0, 70.0]), torch.tensor([0.0, 0.0]))
    assert idx.dtype == torch.long and idx.shape == (2,)
    with pytest.raises(ValueError, match="same shape"):
        u.direction_index(torch.zeros(2), torch.zeros(3))


def test_thresholds_come_from_the_config():
    p = find("plain-prompt-processor")({"prompt": "x", "front_threshold": 10, "back_threshold": 80,
                                        "overhead_threshold": 30})
    u = p()
    ele = torch.tensor([0.0, 0.0, 0.0, 31.0, 29.0])
    azi = torch.tensor([9.0, 11.0, 101.0, 90.0, 90.0])
    names = [u.directions[i].name for i in u.direction_index(ele, azi).tolist()]
    assert names == ["front", "side", "back", "overhead", "side"]


def test_wrap_azimuth():
    a = torch.tensor([-180.0, 180.0, 190.0, -190.0, 540.0, 0.0])
    assert wrap_azimuth(a).tolist() == [-180.0, -180.0, -170.0, 170.0, -180.0, 0.0]


def test_view_direction_with_no_conditions_takes_every_camera():
    d = ViewDirection("any")
    assert d.contains(torch.tensor([-90.0, 0.0, 90.0]), torch.tensor([0.0, 123.0, -170.0])).all()


# -- prompt rewording ---------------------------------------------------------------------------


def test_append_and_prepend_styles():
    app = make_view_directions("append")
    pre = make_view_directions("prepend")
    assert {d.name: d.prompt("a hamburger") for d in app} == {
        "side": "a hamburger, side view", "front": "a hamburger, front view",
        "back": "a hamburger, back view", "overhead": "a hamburger, overhead view"}
    assert {d.name: d.prompt("a hamburger") for d in pre} == {
        "side": "side view of a hamburger", "front": "front view of a hamburger",
        "back": "back view of a hamburger", "overhead": "overhead view of a hamburger"}
    # the negative prompt is not reworded
    assert all(d.negative_prompt("blurry") == "blurry" for d in app + pre)


def test_phrase_with_prompt_slot_and_empty_phrase():
    assert direction_template("{prompt} seen from behind", "prepend") == "{prompt} seen from behind"
    assert direction_template("", "append") == "{prompt}"
    # braces in the prompt itself are kept, not formatted
    assert ViewDirection("side", "{prompt}, side view").prompt("a {weird} cup") == "a {weird} cup, side view"
    with pytest.raises(ValueError, match="append"):
        direction_template("side view", "middle")


def test_processor_rewords_per_config():
    u = find("plain-prompt-processor")({"prompt": "a cat", "view_prompt_style": "prepend",
                                        "prompt_back": "backside view", "negative_prompt": "blur"})()
    assert dict(zip([d.name for d in u.directions], u.prompts_vd)) == {
        "side": "side view of a cat", "front": "front view of a cat", "back": "backside view of a cat",
        "overhead": "overhead view of a cat"}
    assert u.negative_prompts_vd == ["blur"] * 4
    off = find("plain-prompt-processor")({"prompt": "a cat", "view_dependent_prompting": False})()
    assert off.prompts_vd == ["a cat"] * 4


# -- rows per camera ----------------------------------------------------------------------------


def _vd_utils(**kw) -> PromptUtils:
    """Hand-built utils whose direction rows are recognisable: row d is filled with 10 + d."""
    dirs = make_view_directions()
    D = len(dirs)
    vd = torch.stack([torch.full((3, 2), 10.0 + d) for d in range(D)])
    return PromptUtils(
        "p", "n", text_embeddings=torch.full((1, 3, 2), 1.0), uncond_text_embeddings=torch.full((1, 3, 2), -1.0),
        directions=dirs, text_embeddings_vd=vd, uncond_text_embeddings_vd=-vd, view_dependent_prompting=True, **kw)


def test_get_text_embeddings_picks_the_row_of_each_camera():
    u = _vd_utils()
    ele = torch.tensor([0.0, 0.0, 0.0, 75.0, 0.0])
    azi = torch.tensor([0.0, 90.0, 180.0, 0.0, -60.0])
    cond, uncond = u.get_text_embeddings(ele, azi, torch.full((5,), 2.0))
    want = u.direction_index(ele, azi)
    assert cond.shape == (5, 3, 2) and uncond.shape == (5, 3, 2)
    assert cond[:, 0, 0].tolist() == (10.0 + want.float()).tolist()
    assert uncond[:, 0, 0].tolist() == (-10.0 - want.float()).tolist()
    names = [u.directions[i].name for i in want.tolist()]
    assert names == ["front", "side", "back", "overhead", "side"]


def test_without_view_dependent_prompting_every_row_is_the_plain_prompt():
    u = _vd_utils()
    ele, azi = torch.tensor([0.0, 80.0, 0.0]), torch.tensor([0.0, 0.0, 180.0])
    cond, uncond = u.get_text_embeddings(ele, azi, None, view_dependent_prompting=False)
    assert (cond == 1).all() and (uncond == -1).all() and cond.shape == (3, 3, 2)
    # the processor's switch wins too: utils built without vd prompts ignore the guidance's request
    off = PromptUtils("p", text_embeddings=torch.ones(1, 4), uncond_text_embeddings=torch.zeros(1, 4))
    cond, uncond = off.get_text_embeddings(ele, azi, None, view_dependent_prompting=True)
    assert (cond == 1).all() and (uncond == 0).all()


def test_rows_follow_the_camera_device_and_to_moves_embeddings():
    u = _vd_utils()
    moved = u.to("cpu")
    assert moved is u  # nothing to move
    m = u.to("meta")
    assert m.text_embeddings.device.type == "meta" and u.text_embeddings.device.type == "cpu"
    assert m.text_embeddings_vd.device.type == "meta"


def test_camera_shapes_are_checked():
    with pytest.raises(ValueError, match=r"\[B\]"):
        _vd_utils().get_text_embeddings(torch.zeros(2, 1), torch.zeros(2, 1), None)


# -- Perp-Neg -----------------------------------------------------------------------------------


def _falloff(p, r):
    a, b, c = p
    return a * math.exp(-b * r) + c


def _perp_neg_reference(u: PromptUtils, ele: float, azi: float):
    """The documented formula, one camera at a time, in plain Python."""
    by = {d.name: u.text_embeddings_vd[i] for i, d in enumerate(u.directions)}
    name = u.directions[int(u.direction_index(torch.tensor([ele]), torch.tensor([azi]))[0])].name
    f = u.perp_neg_falloffs
    a = abs((azi + 180) % 360 - 180)
    if name == "overhead":
        return by["overhead"], ("uncond", "uncond"), (0.0, 0.0)
    if a < 90:
        r = 1 - a / 90
        return r * by["front"] + (1 - r) * by["side"], ("front", "side"), (
            -_falloff(f.front_side, r), -_falloff(f.side_front, 1 - r))
    r = 2 - a / 90
    return r * by["side"] + (1 - r) * by["back"], ("side", "front"), (
        -_falloff(f.side_back, r), -_falloff(f.front_side_back, r))


def _perp_utils() -> PromptUtils:
    g = torch.Generator().manual_seed(0)
    dirs = make_view_directions()
    vd = torch.randn(len(dirs), 5, 3, generator=g)
    return PromptUtils(
        "p", text_embeddings=torch.randn(1, 5, 3, generator=g), uncond_text_embeddings=torch.zeros(1, 5, 3),
        directions=dirs, text_embeddings_vd=vd, uncond_text_embeddings_vd=torch.zeros(len(dirs), 5, 3) - 7,
        view_dependent_prompting=True, use_perp_neg=True)


def test_perp_neg_matches_the_documented_formula():
    u = _perp_utils()
    cams = [(0.0, 0.0), (10.0, 30.0), (0.0, -60.0), (0.0, 90.0), (20.0, 120.0), (0.0, 180.0), (0.0, -150.0),
            (0.0, 400.0), (75.0, 30.0), (70.0, 170.0)]
    ele = torch.tensor([c[0] for c in cams])
    azi = torch.tensor([c[1] for c in cams])
    cond, uncond, negs, w = u.get_text_embeddings_perp_neg(ele, azi, torch.ones(len(cams)))
    assert cond.shape == (10, 5, 3) and uncond.shape == (10, 5, 3)
    assert negs.shape == (10, 2, 5, 3) and w.shape == (10, 2) and w.dtype == torch.float32
    by = {d.name: u.text_embeddings_vd[i] for i, d in enumerate(u.directions)}
    by["uncond"] = u.uncond_text_embeddings_vd[0]
    for i, (e, a) in enumerate(cams):
        ref_cond, ref_negs, ref_w = _perp_neg_reference(u, e, a)
        torch.testing.assert_close(cond[i], ref_cond, rtol=1e-5, atol=1e-6)
        for k in range(2):
            torch.testing.assert_close(negs[i, k], by[ref_negs[k]])
        assert w[i].tolist() == pytest.approx(ref_w, abs=1e-6)
        assert (uncond[i] == -7).all()


def test_perp_neg_weights_at_known_azimuths():
    u = _perp_utils()
    _, _, _, w = u.get_text_embeddings_perp_neg(torch.zeros(4), torch.tensor([0.0, 90.0, 180.0, 45.0]), None)
    # front: no weight on the front itself, side pushed by -(4 e^0 - 2.426)
    assert w[0].tolist() == pytest.approx([-(4 * math.exp(-0.5) - 2.426), -(4 - 2.426)], abs=1e-6)
    # side (r = 1 in the side-back half): side weight ~0, front weight -(e^-0.5 + 0.967)
    assert w[1].tolist() == pytest.approx([-(math.exp(-0.5) - 0.606), -(math.exp(-0.5) + 0.967)], abs=1e-6)
    # back (r = 0): side -(1 - 0.606), front -(1 + 0.967)
    assert w[2].tolist() == pytest.approx([-(1 - 0.606), -(1 + 0.967)], abs=1e-6)
    # halfway front/side: both curves at r = 0.5
    half = -(4 * math.exp(-0.25) - 2.426)
    assert w[3].tolist() == pytest.approx([half, half], abs=1e-6)


def test_perp_neg_falloffs_come_from_the_config():
    p = find("plain-prompt-processor")({"prompt": "x", "use_perp_neg": True, "perp_neg_f_fs": [2, 1, 0]})
    f = p().perp_neg_falloffs
    assert f.front_side == (2.0, 1.0, 0.0) and f.side_back == PerpNegFalloffs().side_back


def test_perp_neg_needs_view_dependent_float_embeddings():
    u = _perp_utils()
    with pytest.raises(ValueError, match="view_dependent_prompting"):
        u.get_text_embeddings_perp_neg(torch.zeros(1), torch.zeros(1), None, view_dependent_prompting=False)
    ints = PromptUtils("p", text_embeddings=torch.ones(1, 2, dtype=torch.long),
                       uncond_text_embeddings=torch.zeros(1, 2, dtype=torch.long),
                       text_embeddings_vd=torch.ones(4, 2, dtype=torch.long),
                       uncond_text_embeddings_vd=torch.zeros(4, 2, dtype=torch.long), view_dependent_prompting=True)
    with pytest.raises(TypeError, match="floating"):
        ints.get_text_embeddings_perp_neg(torch.zeros(1), torch.zeros(1), None)
    from lift3d.config import ConfigError

    with pytest.raises(ConfigError, match="use_perp_neg"):
        find("plain-prompt-processor")({"prompt": "x", "use_perp_neg": True, "view_dependent_prompting": False})
