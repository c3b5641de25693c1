"""The guidance contract, checked on every built-in guidance with a tiny prior of its family.

In the spirit of diffusers' tester mixins: one suite, one case per registered guidance. A new
built-in guidance fails ``test_every_builtin_guidance_has_a_case`` until it gets a case here.
"""

from __future__ import annotations

import runpy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from lift3d.config import ConfigError
from lift3d.guidance.base import CameraBatch, GuidanceInput, GuidanceOutput
from lift3d.registry import builtin_index, find
from lift3d.utils.cameras import make_cameras
from tiny_prior import weights as toyworld_weights  # noqa: F401  (fixtures, requested by family below)
from tiny_if import tiny_if, tiny_if_prompt_utils  # noqa: F401
from tiny_sd import tiny_sd  # noqa: F401
from tiny_toyworld_mv import toyworld_mv_weights  # noqa: F401
from tiny_zero123 import tiny_zero123  # noqa: F401
from tiny_mvdream import tiny_mvdream  # noqa: F401
from tiny_toyworld_zero123 import toyworld_zero123_weights  # noqa: F401
from tiny_toyworld_viewdiff import toyworld_viewdiff_weights  # noqa: F401
from tiny_viewdiff import tiny_viewdiff  # noqa: F401
from tiny_toyworld_points import toyworld_points_weights  # noqa: F401
from tiny_zero123pp import views_folder_for

RES = 16  # renders and the tiny prior's resolution
N_POINTS = 40  # points of the geometry (Gaussian centres) in every input


@pytest.fixture(scope="session")
def tiny_point_e(tmp_path_factory):
    """The tiny Point-E of tests/priors/tiny_point_e.py (base, upsampler, CLIP folder), loaded by path:
    tests/priors is not on sys.path when this file runs alone."""
    make = runpy.run_path(str(Path(__file__).resolve().parents[1] / "priors" / "tiny_point_e.py"))["make_tiny_point_e"]
    return make(tmp_path_factory.mktemp("tiny-point-e"))


@dataclass
class Case:
    config: Callable[[Any], dict]
    """The guidance's config, given the tiny prior weights' path."""
    prompt: str = "a red cube"
    noise_shape: tuple[int, ...] | None = (3, RES, RES)
    """Per-view shape of the noise the guidance takes (None: it takes none)."""
    extra: dict = field(default_factory=dict)
    family: str = "toyworld"
    """The prior family: which tiny model (FAMILY_WEIGHTS) and prompt processor (FAMILY_PROMPTS) it gets."""


#: The fixture that makes each family's tiny model, and the prompt processor its guidances read.
FAMILY_WEIGHTS = {"toyworld": "toyworld_weights", "stable-diffusion": "tiny_sd", "deepfloyd": "tiny_if",
                  "mvdream": "tiny_mvdream", "zero123": "tiny_zero123", "toyworld-mv": "toyworld_mv_weights",
                  "toyworld-zero123": "toyworld_zero123_weights", "viewdiff": "tiny_viewdiff",
                  "zero123pp": "zero123pp_views", "toyworld-viewdiff": "toyworld_viewdiff_weights",
                  "point-e": "tiny_point_e", "toyworld-points": "toyworld_points_weights"}
FAMILY_PROMPTS = {
    "toyworld": lambda prompt, w: find("toyworld-prompt-processor")({"prompt": prompt})(),
    "stable-diffusion": lambda prompt, w: find("stable-diffusion-prompt-processor")(
        {"prompt": prompt, "pretrained_model_name_or_path": str(w), "use_cache": False})(),
    "deepfloyd": lambda prompt, w: tiny_if_prompt_utils(prompt, w),
    "zero123": lambda prompt, w: None,  # Zero123 reads the input image, not text
    "toyworld-zero123": lambda prompt, w: None,
    "viewdiff": lambda prompt, w: find("stable-diffusion-prompt-processor")(
        {"prompt": prompt, "pretrained_model_name_or_path": str(w[0]), "use_cache": False})(),
    "zero123pp": lambda prompt, w: None,  # fits generated views: no text
    "toyworld-mv": lambda prompt, w: find("toyworld-prompt-processor")({"prompt": prompt})(),
    "toyworld-viewdiff": lambda prompt, w: find("toyworld-prompt-processor")({"prompt": prompt})(),
    "mvdream": lambda prompt, w: find("mvdream-prompt-processor")(
        {"prompt": prompt, "pretrained_model_name_or_path": str(w), "use_cache": False})(),
    "point-e": lambda prompt, w: find("plain-prompt-processor")({"prompt": prompt})(),  # Point-E encodes the text
    "toyworld-points": lambda prompt, w: find("toyworld-prompt-processor")({"prompt": prompt})(),
}


@pytest.fixture
def zero123pp_views(tmp_path):
    """A views folder (what Zero123++ writes) holding a view for each camera of the suite's inputs."""
    return views_folder_for([make_input(None, groups=g).cameras for g in (1, 2)], tmp_path / "views")


@pytest.fixture
def weights(request, name):
    """The tiny model of the case's family."""
    return request.getfixturevalue(FAMILY_WEIGHTS[CASES[name].family])


def prompt_of(name: str, weights_path: Any) -> Any:
    """The case's prompt through its family's prompt processor."""
    case = CASES[name]
    return FAMILY_PROMPTS[case.family](case.prompt, weights_path)


CASES = {
    "toyworld-guidance": Case(lambda w: {"pretrained": str(w), "guidance_scale": 5.0}),
    "toyworld-vsd-guidance": Case(lambda w: {"pretrained": str(w), "guidance_scale": 5.0, "lora_lr": 1e-3}),
    "toyworld-refine-guidance": Case(lambda w: {"pretrained": str(w), "strength": 0.4, "n_steps": 2}),
    "toyworld-reference-guidance": Case(lambda w: {"max_steps": 24}, noise_shape=None),
    "reference-image-guidance": Case(lambda w: {}, noise_shape=None),
    "stable-diffusion-guidance": Case(lambda w: {"pretrained_model_name_or_path": str(w), "guidance_scale": 7.5,
                                                 "half_precision_weights": False},
                                      noise_shape=(4, 8, 8), family="stable-diffusion"),
    "stable-diffusion-vsd-guidance": Case(lambda w: {"pretrained_model_name_or_path": str(w), "guidance_scale": 7.5,
                                                     "half_precision_weights": False, "lora_lr": 1e-3},
                                          noise_shape=(4, 8, 8), family="stable-diffusion"),
    "stable-diffusion-refine-guidance": Case(lambda w: {"pretrained_model_name_or_path": str(w), "strength": 0.4,
                                                        "n_steps": 2, "half_precision_weights": False},
                                             noise_shape=(4, 8, 8), family="stable-diffusion"),
    # IF works at its UNet's size (8 for the tiny model) on T5 states; float32 so CPU and CUDA compare.
    "deepfloyd-guidance": Case(lambda w: {"pretrained_model_name_or_path": str(w), "guidance_scale": 5.0,
                                          "half_precision_weights": False},
                               noise_shape=(3, 8, 8), family="deepfloyd"),
    # Zero123 in the diffusers layout, Stable Zero123 from an original-layout checkpoint (the same tiny weights).
    "zero123-guidance": Case(lambda w: {"pretrained_model_name_or_path": str(w), "guidance_scale": 3.0,
                                        "half_precision_weights": False},
                             noise_shape=(4, 8, 8), family="zero123"),
    "stable-zero123-guidance": Case(lambda w: {"pretrained_model_name_or_path": str(w),
                                               "original_architecture": str(w), "guidance_scale": 3.0,
                                               "half_precision_weights": False},
                                    noise_shape=(4, 8, 8), family="zero123"),
    "zero123-refine-guidance": Case(lambda w: {"pretrained_model_name_or_path": str(w), "strength": 0.4,
                                               "n_steps": 2, "half_precision_weights": False},
                                    noise_shape=(4, 8, 8), family="zero123"),
    "toyworld-zero123-guidance": Case(lambda w: {"pretrained": str(w), "guidance_scale": 3.0},
                                      family="toyworld-zero123"),
    "viewdiff-guidance": Case(lambda w: {"pretrained_model_name_or_path": str(w[0]), "weights": str(w[1]),
                                         "n_views": 2, "guidance_scale": 7.5, "half_precision_weights": False},
                              noise_shape=(4, 8, 8), family="viewdiff"),
    "multiview-images-guidance": Case(lambda w: {"views_dir": str(w)}, noise_shape=None, family="zero123pp"),
    # SyncDreamer's subclass on the same views folder (its sampling is tested in tests/priors/test_syncdreamer.py).
    "syncdreamer-guidance": Case(lambda w: {"views_dir": str(w)}, noise_shape=None, family="zero123pp"),
    # The toy generator's subclass likewise (its sampling: tests/guidance/test_toyworld_zero123_views.py).
    "toyworld-zero123-views-guidance": Case(lambda w: {"views_dir": str(w)}, noise_shape=None, family="zero123pp"),
    # The suite's inputs are groups of 2 views: both multi-view networks take any group size (trained on 4).
    "toyworld-mv-guidance": Case(lambda w: {"pretrained": str(w), "n_views": 2, "guidance_scale": 5.0},
                                 family="toyworld-mv"),
    "toyworld-viewdiff-guidance": Case(lambda w: {"pretrained": str(w), "n_views": 2, "guidance_scale": 5.0},
                                       family="toyworld-viewdiff"),
    "mvdream-guidance": Case(lambda w: {"pretrained_model_name_or_path": str(w), "image_size": 16, "n_views": 2,
                                        "guidance_scale": 7.5, "half_precision_weights": False},
                             noise_shape=(4, 8, 8), family="mvdream"),
    # A 3D prior on the points: 2 subsets (one t and noise each, as the suite gives 2) of the tiny model's 32.
    "point-e-guidance": Case(lambda w: {"pretrained_model_name_or_path": str(w / "base.pt"),
                                        "clip_model_name_or_path": str(w / "clip"), "n_points": 32, "n_subsets": 2,
                                        "guidance_scale": 100.0, "detach_colors": False},
                             noise_shape=(6, 32), family="point-e"),
    # Its toy twin: the same guidance on the toy point prior (subsets of its 32 points).
    "toyworld-point-e-guidance": Case(lambda w: {"pretrained": str(w), "n_subsets": 2, "guidance_scale": 5.0,
                                                 "detach_colors": False},
                                      noise_shape=(6, 32), family="toyworld-points"),
}


def builtin_guidances() -> list[str]:
    return sorted(n for n, e in builtin_index().names.items() if e.module.startswith("lift3d.guidance."))


def make_input(prompt: Any, groups: int = 1, n_views: int = 2, dtype: torch.dtype = torch.float32,
               seed: int = 0) -> GuidanceInput:
    """Every field a guidance may read, for ``groups`` groups of ``n_views`` views (B = groups * n_views)."""
    from lift3d.prompts.toyworld import ToyWorldPromptProcessor

    g = torch.Generator().manual_seed(seed)
    B = groups * n_views
    el = (torch.rand(groups, generator=g) * 40).repeat_interleave(n_views)
    az = (torch.rand(groups, generator=g) * 360 - 180).repeat_interleave(n_views)
    az = (az + torch.arange(n_views).repeat(groups) * 360.0 / n_views + 180) % 360 - 180
    dist = torch.full((B,), 2.0)
    batch = make_cameras(el, az, dist, torch.full((B,), 40.0), RES, RES)
    batch["n_views"] = n_views
    leaf = lambda *shape: torch.rand(*shape, generator=g).to(dtype).requires_grad_(True)  # noqa: E731
    ref = make_cameras(torch.zeros(1), torch.zeros(1), torch.full((1,), 2.0), torch.full((1,), 40.0), RES, RES)
    mask = (torch.rand(1, RES, RES, 1, generator=g) > 0.5).to(dtype)
    inp = GuidanceInput(
        cameras=CameraBatch.from_batch(batch), rgb=leaf(B, RES, RES, 3), opacity=leaf(B, RES, RES, 1),
        normal=leaf(B, RES, RES, 3),
        prompt=ToyWorldPromptProcessor({"prompt": prompt})() if isinstance(prompt, str) else prompt,
        cond_image=torch.rand(1, RES, RES, 3, generator=g).to(dtype) * mask, cond_mask=mask,
        cond_cameras=CameraBatch.from_batch(ref), extras=batch)
    # The geometry's points (Gaussian centres) and colours, for a 3D prior; drawn last, so the other
    # fields keep the values they had before points were added.
    inp.points = (torch.rand(N_POINTS, 3, generator=g) - 0.5).to(dtype).requires_grad_(True)
    inp.point_colors = leaf(N_POINTS, 3)
    return inp


def build(name: str, weights_path: Any, **over: Any) -> Any:
    return find(name, "guidance")({**CASES[name].config(weights_path), **over}).eval()


def losses_of(out: GuidanceOutput) -> torch.Tensor:
    return sum(out.losses.values())


def fixed_t_noise(name: str, B: int, dtype: torch.dtype = torch.float32) -> dict:
    case = CASES[name]
    if case.noise_shape is None:
        return {}
    g = torch.Generator().manual_seed(7)
    return {"t": torch.linspace(200, 800, B).long(), "noise": torch.randn(B, *case.noise_shape, generator=g).to(dtype)}


NAMES = sorted(CASES)


def test_every_builtin_guidance_has_a_case():
    assert set(builtin_guidances()) == set(CASES), "add a Case for each built-in guidance to this suite"


@pytest.mark.parametrize("name", NAMES)
def test_config_is_strict(name, weights):
    with pytest.raises(ConfigError, match="no_such_option"):
        build(name, weights, no_such_option=1)


@pytest.mark.parametrize("name", NAMES)
def test_returns_named_finite_scalar_losses(name, weights):
    out = build(name, weights)(make_input(prompt_of(name, weights)), **fixed_t_noise(name, 2))
    assert isinstance(out, GuidanceOutput) and out.losses
    for k, v in out.losses.items():
        assert k.startswith("loss_") and v.dim() == 0 and torch.isfinite(v), k
    assert not set(out.losses) & set(out.diagnostics)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_the_inputs_and_no_weight_of_the_guidance(name, weights):
    g = build(name, weights)
    inp = make_input(prompt_of(name, weights))
    total = losses_of(g(inp, **fixed_t_noise(name, 2)))
    own = [p for p in g.parameters() if p.requires_grad]
    leaves = [inp.rgb, inp.opacity, inp.normal, inp.points, inp.point_colors]
    grads = torch.autograd.grad(total, leaves + own, allow_unused=True)
    n = len(leaves)
    assert any(gr is not None and float(gr.abs().sum()) > 0 for gr in grads[:n]), "no gradient reaches the inputs"
    assert all(gr is None for gr in grads[n:]), "the loss depends on the guidance's own weights"
    frozen = [p for p in g.parameters() if not p.requires_grad]
    prior = getattr(g, "prior", None)
    frozen += list(prior.parameters()) if prior is not None else []
    assert all(not p.requires_grad for p in frozen)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_given_t_and_noise(name, weights):
    outs = []
    for seed in (1, 2):  # fresh guidances, different global RNG states
        g = build(name, weights)
        torch.manual_seed(seed)
        outs.append(g(make_input(prompt_of(name, weights)), **fixed_t_noise(name, 2)))
    for k in outs[0].losses:
        assert torch.equal(outs[0].losses[k], outs[1].losses[k]), k


@pytest.mark.parametrize("name", NAMES)
def test_frozen_weights_stay_out_of_the_state_dict(name, weights):
    g = build(name, weights)
    g(make_input(prompt_of(name, weights)), **fixed_t_noise(name, 2))  # trainable state (a LoRA step) exists now
    trainable = {n for n, p in g.named_parameters() if p.requires_grad}
    tensors = {k for k, v in g.state_dict().items() if torch.is_tensor(v)}
    assert tensors <= trainable, f"frozen tensors in the state dict: {sorted(tensors - trainable)[:5]}"


@pytest.mark.parametrize("name", NAMES)
def test_moves_with_its_prior_to_another_dtype(name, weights):
    g = build(name, weights).to(torch.float64)
    prior = getattr(g, "prior", None)
    tensors = [*g.parameters(), *g.buffers()] + ([*prior.parameters(), *prior.buffers()] if prior is not None else [])
    assert all(t.dtype == torch.float64 for t in tensors if t.is_floating_point())
    out = g(make_input(prompt_of(name, weights), dtype=torch.float64), **fixed_t_noise(name, 2, torch.float64))
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert any(v.dtype == torch.float64 for v in out.losses.values())


@pytest.mark.parametrize("name", NAMES)
def test_groups_of_views(name, weights):
    """A batch of 2 groups of 2 views: one loss over all four, and shared timesteps per group on request."""
    over = {"timestep_sharing": "group"} if "timestep_sharing" in find(name).Config.__dataclass_fields__ else {}
    g = build(name, weights, **over)
    inp = make_input(prompt_of(name, weights), groups=2, n_views=2)
    assert inp.cameras.n_groups == 2
    out = g(inp)
    assert all(torch.isfinite(v) for v in out.losses.values())
    if over:
        t = out["t"]
        assert t.shape == (4,) and t[0] == t[1] and t[2] == t[3]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_cpu(name, weights):
    cpu = build(name, weights)
    gpu = build(name, weights).to("cuda")
    tn = fixed_t_noise(name, 2)
    ref = cpu(make_input(prompt_of(name, weights)), **tn)
    inp = make_input(prompt_of(name, weights))
    inp_cuda = GuidanceInput(**{k: (v.detach().cuda().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v)
                                for k, v in vars(inp).items() if k not in ("cameras", "cond_cameras", "extras")},
                             cameras=inp.cameras.to("cuda"), cond_cameras=inp.cond_cameras.to("cuda"),
                             extras={k: (v.cuda() if torch.is_tensor(v) else v) for k, v in inp.extras.items()})
    out = gpu(inp_cuda, **{k: v.cuda() for k, v in tn.items()})
    for k in ref.losses:
        torch.testing.assert_close(out.losses[k].cpu(), ref.losses[k], rtol=1e-3, atol=1e-5)
