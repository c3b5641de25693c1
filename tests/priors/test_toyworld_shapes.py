"""The toy-world catalogue: stated dimensions, exactness of the SDFs, albedo, feature parts, vocabulary."""

from __future__ import annotations

import math

import pytest
import torch

from lift3d.priors.toyworld.shapes import CATALOGUE, COLOURS, MAX_BOUND_RADIUS, list_prompts
from lift3d.priors.toyworld.vocab import (
    MAX_TOKENS,
    PAD_ID,
    VOCAB,
    UnknownPromptError,
    detokenize,
    pad_tokens,
    parse_prompt,
    tokenize,
)


def sdf_at(prompt: str, *pts: tuple[float, float, float]) -> torch.Tensor:
    return CATALOGUE[prompt].sdf(torch.tensor(pts, dtype=torch.float64))


def assert_in_out(prompt: str, inside: list, outside: list) -> None:
    d_in = sdf_at(prompt, *inside)
    d_out = sdf_at(prompt, *outside)
    assert (d_in < 0).all(), f"{prompt}: expected inside, sdf={d_in.tolist()} at {inside}"
    assert (d_out > 0).all(), f"{prompt}: expected outside, sdf={d_out.tolist()} at {outside}"


def test_catalogue_has_33_prompts_in_order():
    prompts = list_prompts()
    assert len(prompts) == 33 == len(set(prompts))
    assert prompts[0] == "a red sphere" and prompts[-3:] == ["a snowman", "a chair", "a mug"]
    for colour in COLOURS:
        for shape in ("sphere", "cube", "cylinder", "cone", "torus"):
            obj = CATALOGUE[f"a {colour} {shape}"]
            assert obj.name == f"a {colour} {shape}" and obj.shape == shape and obj.colour == colour


def test_sphere_radius():
    for axis in range(3):
        for sign in (-1, 1):
            p_in, p_out = [0.0] * 3, [0.0] * 3
            p_in[axis], p_out[axis] = sign * 0.499, sign * 0.501
            assert_in_out("a red sphere", [tuple(p_in)], [tuple(p_out)])
    assert sdf_at("a red sphere", (0.0, 0.0, 1.0)).item() == pytest.approx(0.5)


def test_cube_faces_and_corner():
    for axis in range(3):
        for sign in (-1, 1):
            p_in, p_out = [0.1, -0.1, 0.2], [0.1, -0.1, 0.2]
            p_in[axis], p_out[axis] = sign * 0.399, sign * 0.401
            assert_in_out("a green cube", [tuple(p_in)], [tuple(p_out)])
    # Exact (Euclidean) outside a corner, not the max-norm bound.
    assert sdf_at("a green cube", (0.5, 0.5, 0.5)).item() == pytest.approx(0.1 * math.sqrt(3))
    assert sdf_at("a green cube", (0.0, 0.0, 0.0)).item() == pytest.approx(-0.4)


def test_cylinder_radius_and_caps():
    r = 0.399 / math.sqrt(2)
    assert_in_out(
        "a blue cylinder",
        [(0.399, 0, 0), (0, -0.399, 0.3), (r, r, -0.2), (0, 0, 0.449), (0.3, 0, -0.449)],
        [(0.401, 0, 0), (0, -0.401, 0.3), (0.401 / math.sqrt(2), 0.401 / math.sqrt(2), -0.2), (0, 0, 0.451), (0.3, 0, -0.451)],
    )
    # Outside the rim: Euclidean distance to the rim circle.
    assert sdf_at("a blue cylinder", (0.5, 0, 0.55)).item() == pytest.approx(math.hypot(0.1, 0.1))


def test_cone_apex_base_and_slant():
    assert_in_out(
        "a yellow cone",
        [(0, 0, 0.449), (0, 0, -0.449), (0.499, 0, -0.449), (0, 0.249, 0.0 - 0.001)],
        [(0, 0, 0.451), (0, 0, -0.451), (0.501, 0, -0.44), (0, 0.26, 0.0)],
    )
    # Radius at height z is 0.5 * (0.45 - z) / 0.9; the slant side is at distance
    # (r_at - radial) * cos(half_angle) from an interior point near it.
    half_angle = math.atan2(0.5, 0.9)
    z, radial = 0.0, 0.2
    r_at = 0.5 * (0.45 - z) / 0.9
    assert sdf_at("a yellow cone", (radial, 0, z)).item() == pytest.approx(-(r_at - radial) * math.cos(half_angle))
    assert sdf_at("a yellow cone", (0, 0, 0.55)).item() == pytest.approx(0.1)


def test_torus_tube():
    assert_in_out(
        "a purple torus",
        [(0.549, 0, 0), (0.251, 0, 0), (0, 0.4, 0.149), (0, -0.4, -0.149)],
        [(0.551, 0, 0), (0.249, 0, 0), (0, 0.4, 0.151), (0, 0, 0)],
    )
    assert sdf_at("a purple torus", (0.4, 0, 0)).item() == pytest.approx(-0.15)
    assert sdf_at("a purple torus", (0, 0, 0)).item() == pytest.approx(0.25)


def test_snowman_parts_and_nose():
    assert_in_out(
        "a snowman",
        [(0, 0, -0.499), (0, 0, 0.439), (0.279, 0, -0.22), (0.449, 0, 0.24), (0.19, 0.068, 0.24)],
        [(0, 0, -0.501), (0, 0, 0.441), (0.281, 0, -0.22), (0.451, 0, 0.24), (0.19, 0.071, 0.24), (-0.451, 0, 0.24)],
    )
    obj = CATALOGUE["a snowman"]
    pts = torch.tensor([(0.44, 0, 0.24), (0.3, 0, 0.24), (-0.2, 0, 0.24), (0, 0, -0.5), (0, 0.2, 0.24)])
    assert obj.feature_mask(pts).tolist() == [True, True, False, False, False]
    alb = obj.albedo(pts)
    assert torch.allclose(alb[0], torch.tensor(COLOURS["orange"]))
    assert torch.allclose(alb[2], torch.tensor([0.95, 0.95, 0.95]))


def test_chair_parts_and_back_on_minus_x():
    assert_in_out(
        "a chair",
        [(0.299, 0, 0), (0, 0.299, 0.049), (-0.26, 0, 0.549), (-0.221, 0.1, 0.3), (0.25, 0.25, -0.499),
         (0.279, -0.25, -0.3), (-0.25, 0.221, -0.3)],
        [(0.301, 0, 0), (0, 0, 0.051), (-0.26, 0, 0.551), (-0.219, 0.1, 0.3), (0.25, 0.25, -0.501),
         (0.281, -0.25, -0.3), (-0.25, 0.219, -0.3), (0, 0, -0.3), (-0.26, 0.301, 0.3)],
    )
    obj = CATALOGUE["a chair"]
    assert obj.feature_mask(torch.tensor([(-0.26, 0.0, 0.4), (0.2, 0.0, 0.0), (0.25, 0.25, -0.4)])).tolist() == [
        True, False, False
    ]
    # Every feature point (the back) is on the -x side: the chair faces +x.
    pts = torch.rand(20000, 3, generator=torch.Generator().manual_seed(0)) * 1.4 - 0.7
    near = obj.sdf(pts).abs() < 0.02
    feat = obj.feature_mask(pts) & near
    assert feat.sum() > 50 and (pts[feat, 0] < -0.2).all()


def test_mug_body_and_handle_on_plus_y():
    assert_in_out(
        "a mug",
        [(0.299, 0, 0), (0, 0, 0.349), (0, 0, -0.349), (0, 0.599, 0), (0, 0.42, 0.179), (0.039, 0.56, 0)],
        [(0.301, 0, 0), (0, 0, 0.351), (0, 0, -0.351), (0, 0.601, 0), (0, 0.42, 0.181), (0.041, 0.56, 0),
         (0, 0.42, 0.0), (0, -0.31, 0)],
    )
    obj = CATALOGUE["a mug"]
    assert sdf_at("a mug", (0, 0.56, 0)).item() == pytest.approx(-0.04)
    assert obj.feature_mask(torch.tensor([(0, 0.56, 0), (0, 0.42, 0.14), (0, -0.3, 0), (0.3, 0, 0)])).tolist() == [
        True, True, False, False
    ]


@pytest.mark.parametrize("prompt", list_prompts())
def test_sdf_is_one_lipschitz_and_bounded(prompt):
    obj = CATALOGUE[prompt]
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4000, 3, generator=g, dtype=torch.float64) * 2 - 1
    y = x + (torch.rand(4000, 3, generator=g, dtype=torch.float64) - 0.5) * 0.1
    lip = (obj.sdf(x) - obj.sdf(y)).abs() / (x - y).norm(dim=-1)
    assert lip.max().item() <= 1 + 1e-9
    # The bound radius really holds the object: nothing inside beyond it.
    dirs = torch.nn.functional.normalize(torch.randn(4000, 3, generator=g, dtype=torch.float64), dim=-1)
    assert (obj.sdf(dirs * (obj.bound_radius + 1e-6)) >= 0).all()
    assert obj.bound_radius <= MAX_BOUND_RADIUS


@pytest.mark.parametrize("prompt", ["a red sphere", "a red cube", "a red cylinder", "a red cone", "a red torus"])
def test_primitive_sdf_is_exact_distance(prompt):
    """An exact SDF has unit gradient almost everywhere (not just <= 1)."""
    obj = CATALOGUE[prompt]
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(3000, 3, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_()
    (grad,) = torch.autograd.grad(obj.sdf(x).sum(), x)
    norms = grad.norm(dim=-1)
    assert ((norms - 1).abs() < 1e-6).float().mean() > 0.99


def test_dtypes_and_batch_shapes():
    obj = CATALOGUE["a chair"]
    for dt in (torch.float32, torch.float64):
        p = torch.zeros(2, 5, 7, 3, dtype=dt)
        assert obj.sdf(p).shape == (2, 5, 7) and obj.sdf(p).dtype == dt
        assert obj.albedo(p).shape == (2, 5, 7, 3) and obj.albedo(p).dtype == dt
        assert obj.feature_mask(p).shape == (2, 5, 7) and obj.feature_mask(p).dtype == torch.bool
    assert not CATALOGUE["a red cube"].feature_mask(torch.zeros(4, 3)).any()
    assert torch.allclose(CATALOGUE["a blue torus"].albedo(torch.zeros(4, 3)), torch.tensor(COLOURS["blue"]).expand(4, 3))


# ---------------------------------------------------------------------------------------------
# Vocabulary


def test_tokenize_roundtrip_every_prompt():
    seqs = [tokenize(p) for p in list_prompts()]
    assert max(len(s) for s in seqs) == MAX_TOKENS
    assert len({tuple(s) for s in seqs}) == 33  # the tokens identify the object
    padded = pad_tokens(seqs)
    assert padded.shape == (33, MAX_TOKENS) and (padded[-3:, 1] == PAD_ID).all()
    for p, row in zip(list_prompts(), padded):
        assert detokenize(row) == p
    assert tokenize("  A   Red SPHERE ") == tokenize("a red sphere") == tokenize("red sphere")
    assert tokenize("an orange cube") == tokenize("a orange cube")


def test_unknown_word_error_lists_vocabulary():
    with pytest.raises(UnknownPromptError) as exc:
        tokenize("a pink fluffy sphere")
    msg = str(exc.value)
    assert "'pink'" in msg and "'fluffy'" in msg
    for tok in VOCAB[1:]:
        assert tok in msg


def test_parse_prompt_exact_and_suggestions():
    spec = parse_prompt("  A Blue   Torus")
    assert (spec.prompt, spec.shape, spec.colour, spec.index) == ("a blue torus", "torus", "blue", 14)
    assert spec.object is CATALOGUE["a blue torus"]
    assert parse_prompt("An orange cone").prompt == "a orange cone"
    assert parse_prompt("a chair").colour == "brown"
    with pytest.raises(UnknownPromptError) as exc:
        parse_prompt("a snowmen")
    msg = str(exc.value)
    assert "Did you mean 'a snowman'" in msg and all(p in msg for p in list_prompts())
    with pytest.raises(UnknownPromptError):
        parse_prompt("a red sphere, front view")
