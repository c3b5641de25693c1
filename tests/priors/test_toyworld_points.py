"""The toy point-cloud prior (the toy Point-E): data, conditioning, training, persistence, evaluation."""

from __future__ import annotations

import math
import runpy
from pathlib import Path

import pytest
import torch

from lift3d.config import ConfigError, parse_structured
from lift3d.priors.toyworld.model import MissingWeightsError
from lift3d.priors.toyworld.points import (DEFAULT_POINTS_WEIGHTS, POINTS_TRAIN_COMMAND, PointCloudData,
                                           PointsTrainConfig, ToyPointPrior, cloud_chamfer, front_check,
                                           load_points_recipe, point_loss, sample_points, surface_pool,
                                           train_points)
from lift3d.priors.toyworld.shapes import NOSE_ORANGE, get_object, list_prompts
from lift3d.priors.toyworld.vocab import UnknownPromptError, detokenize

_TINY = runpy.run_path(str(Path(__file__).resolve().parents[1] / "guidance" / "tiny_toyworld_points.py"))
TINY = _TINY["TINY_POINTS"]
make_tiny_points = _TINY["make_tiny_points"]
POOL = 1024  # small pools: the tests' clouds are drawn from 1024 surface points per object


@pytest.fixture(scope="module")
def data():
    return PointCloudData(n_points=32, pool_size=POOL, seed=0, fps_oversample=4)


# ---------------------------------------------------------------------------------------------
# Data


def test_clouds_lie_on_the_surface_and_carry_its_colour(data):
    batch = data.batch(0, 12)
    assert batch["xyz"].shape == (12, 32, 3) and batch["rgb"].shape == (12, 32, 3)
    for i in range(12):
        prompt = list_prompts()[int(batch["prompt_index"][i])]
        obj = get_object(prompt)
        assert detokenize(batch["tokens"][i]) == prompt
        assert float(obj.sdf(batch["xyz"][i]).abs().max()) < 2e-3, prompt
        assert torch.allclose(batch["rgb"][i], obj.albedo(batch["xyz"][i])), prompt


def test_objects_keep_their_canonical_pose():
    """The nose at +x, the chair's back at -x, the handle at +y: what the front checks read."""
    xyz, rgb = surface_pool("a snowman", POOL, 0)
    nose = (rgb - torch.tensor(NOSE_ORANGE)).norm(dim=-1) < 1e-6
    assert nose.any() and float(xyz[nose, 0].min()) > 0.1
    for prompt in ("a snowman", "a chair", "a mug"):
        xyz, rgb = surface_pool(prompt, POOL, 0)
        ok, _ = front_check(prompt, xyz, rgb)
        turned = xyz * torch.tensor([-1.0, -1.0, 1.0])  # the Janus twin: half a turn about z
        assert ok and not front_check(prompt, turned, rgb)[0], prompt
    assert front_check("a red cube", xyz, rgb) is None


def test_batches_are_a_function_of_seed_and_step(data):
    a, b, c = data.batch(3, 4), data.batch(3, 4), data.batch(4, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["xyz"], c["xyz"])  # fresh clouds every step


def test_farthest_point_sampling_spreads_the_clouds():
    def spacing(d):
        xyz = d.clouds(torch.zeros(8, dtype=torch.long), torch.Generator().manual_seed(0))["xyz"]
        dist = torch.cdist(xyz, xyz) + torch.eye(xyz.shape[1]) * 10
        return float(dist.min(dim=-1).values.mean())

    spread = PointCloudData(32, POOL, 0, fps_oversample=4)
    plain = PointCloudData(32, POOL, 0, fps_oversample=1)
    assert spacing(spread) > 1.3 * spacing(plain)


def test_focus_prompts_fill_their_share_and_unknown_ones_fail():
    d = PointCloudData(8, POOL, 0, 1, focus_prompts=["a chair"], focus_fraction=1.0)
    assert set(d.batch(0, 16)["prompt_index"].tolist()) == {list_prompts().index("a chair")}
    with pytest.raises(ConfigError, match="not toy-world prompts"):
        PointCloudData(8, POOL, 0, 1, focus_prompts=["a teapot"])
    with pytest.raises(ConfigError, match="fps_oversample"):
        PointCloudData(8, 16, 0, 4)


# ---------------------------------------------------------------------------------------------
# The model and its conditioning


def test_condition_vectors_follow_point_e_and_the_toy_vocabulary():
    model = make_tiny_points()
    cond = model.encode_text(["a red cube", "A  Red Cube", "an red cube", "", "a snowman"])
    D = TINY["cond_dim"]
    assert cond.shape == (5, D)
    assert torch.allclose(cond[0].norm(), torch.tensor(math.sqrt(D)))  # normalised, times sqrt(dim)
    assert torch.equal(cond[0], cond[1]) and torch.equal(cond[0], cond[2])  # spellings the vocabulary accepts
    assert torch.equal(cond[3], torch.zeros(D))  # the empty prompt is the unconditional input
    assert not torch.allclose(cond[0], cond[4])
    with pytest.raises(UnknownPromptError, match="teapot"):
        model.encode_text(["a teapot"])


def test_the_condition_and_its_drop_reach_the_output():
    model = make_tiny_points().eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 6, 32, generator=g), torch.tensor([100, 700])
    from lift3d.priors.toyworld.vocab import pad_tokens, tokenize

    red, blue = pad_tokens([tokenize("a red cube")] * 2), pad_tokens([tokenize("a blue cube")] * 2)
    with torch.no_grad():
        a, b = model(x, t, red), model(x, t, blue)
        dropped = model(x, t, red, torch.tensor([True, False]))
        uncond = model.model(x, t, torch.zeros(2, TINY["cond_dim"]))
        cond = model.predict_eps(x, t, model.encode_text(["a red cube"] * 2))
    assert a.shape == (2, 6, 32) and not torch.allclose(a, b)
    assert torch.equal(dropped[0], uncond[0]) and torch.equal(dropped[1], a[1])
    assert torch.allclose(cond, model.eps_from_output(a, x, t), atol=1e-6)


def test_schedule_is_point_e_cosine_with_the_toy_scales():
    from lift3d.priors.point_e.diffusion import PointDiffusionSchedule

    model = make_tiny_points()
    ref = PointDiffusionSchedule()  # Point-E's base model
    assert torch.equal(model.schedule.alphas_cumprod(), ref.alphas_cumprod())
    xyz = torch.tensor([[[0.695, -0.5, 0.0]]])
    x = model.schedule.to_model_space(xyz, torch.tensor([[[0.0, 0.5, 1.0]]]))
    assert float(x[0, :3].abs().max()) <= 1.0  # the farthest toy point stays inside the sampler's clamp
    assert torch.allclose(x[0, 3:, 0], torch.tensor([-1.0, 0.0, 1.0]))
    back, rgb = model.schedule.from_model_space(x)
    assert torch.allclose(back, xyz, atol=1e-6) and torch.allclose(rgb, torch.tensor([[[0.0, 0.5, 1.0]]]), atol=1e-6)


def test_save_load_round_trip_and_missing_weights(tmp_path):
    model = make_tiny_points().eval()
    path = model.save(tmp_path / "m.safetensors", {"note": "x"})
    loaded = ToyPointPrior.load(path).eval()
    assert loaded.cfg == model.cfg and loaded.metadata["note"] == "x"
    x, t = torch.randn(1, 6, 32), torch.tensor([5])
    c = model.encode_text(["a mug"])
    assert torch.equal(model.predict_eps(x, t, c), loaded.predict_eps(x, t, c))
    with pytest.raises(MissingWeightsError) as info:
        ToyPointPrior.load(tmp_path / "absent.safetensors")
    assert POINTS_TRAIN_COMMAND in str(info.value) and "absent.safetensors" in str(info.value)
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(other))
    with pytest.raises(ValueError, match="not a toy point-cloud prior"):
        ToyPointPrior.load(other)


def test_eval_command_names_the_train_command_without_weights(tmp_path, capsys):
    from lift3d.priors.toyworld.__main__ import main

    assert main(["eval-points", "--weights", str(tmp_path / "absent.safetensors")]) == 2
    assert POINTS_TRAIN_COMMAND in capsys.readouterr().err
    assert DEFAULT_POINTS_WEIGHTS.name == "toyworld-points.safetensors"


def test_sampling_is_seeded_and_in_range():
    model = make_tiny_points()
    run = lambda: sample_points(model, ["a red cube", "a chair"], steps=3,  # noqa: E731
                                generator=torch.Generator().manual_seed(0))
    (xyz, rgb), (xyz2, _) = run(), run()
    assert xyz.shape == (2, 32, 3) and rgb.shape == (2, 32, 3)
    assert torch.equal(xyz, xyz2)
    assert float(xyz.abs().max()) <= 1.0 / 1.4 + 1e-5  # the clamp, in world units
    assert float(rgb.min()) >= 0.0 and float(rgb.max()) <= 1.0
    more, _ = sample_points(model, ["a mug"], n_points=48, steps=2)
    assert more.shape == (1, 48, 3)


def test_chamfer_scores_exact_clouds_low_and_moved_ones_high():
    xyz, _ = surface_pool("a red sphere", POOL, 0)
    ref, _ = surface_pool("a red sphere", 512, 1)
    exact = cloud_chamfer(xyz[:256], "a red sphere", ref)
    moved = cloud_chamfer(xyz[:256] + torch.tensor([0.2, 0.0, 0.0]), "a red sphere", ref)
    assert exact < 0.05 and moved > 2 * exact


# ---------------------------------------------------------------------------------------------
# Training


def _tiny_run(tmp_path: Path, **over) -> dict:
    return {"model": dict(TINY), "steps": 60, "batch_size": 8, "lr": 3e-3, "warmup_steps": 3, "ema_decay": 0.5,
            "pool_size": POOL, "fps_oversample": 2, "ckpt_every": 10, "log_every": 10, **over}


def _fixed_loss(model, batches):
    with torch.no_grad():
        return sum(float(point_loss(model, b, torch.Generator().manual_seed(i))) for i, b in enumerate(batches)) / len(
            batches)


def test_tiny_training_lowers_the_loss_and_resumes_exactly(tmp_path, data):
    batches = [data.batch(100 + i, 16) for i in range(4)]
    from lift3d.priors.toyworld.vocab import VOCAB

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # train_points seeds the same way before building its model
        before = _fixed_loss(ToyPointPrior({"vocab_size": len(VOCAB), **TINY}), batches)
    final = train_points(_tiny_run(tmp_path, out_dir=str(tmp_path / "a")), progress=False)
    assert final.name == "toyworld-points.safetensors"
    after = _fixed_loss(ToyPointPrior.load(final), batches)
    assert after < 0.8 * before, (before, after)
    partial = train_points(_tiny_run(tmp_path, out_dir=str(tmp_path / "b"), stop_after=30), progress=False)
    assert partial.name == "toyworld-points-step30.safetensors"
    resumed = train_points(_tiny_run(tmp_path, out_dir=str(tmp_path / "b")), progress=False)
    sa, sb = ToyPointPrior.load(final).state_dict(), ToyPointPrior.load(resumed).state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_train_points_command_installs_only_a_complete_run(tmp_path, monkeypatch):
    import yaml

    import lift3d.priors.toyworld.points as pts
    from lift3d.priors.toyworld.__main__ import main

    target = tmp_path / "installed" / "toyworld-points.safetensors"
    monkeypatch.setattr(pts, "DEFAULT_POINTS_WEIGHTS", target)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"description": "tiny", **_tiny_run(tmp_path, steps=2, warmup_steps=1)}))
    args = ["train-points", "--recipe", str(recipe), f"out_dir={tmp_path / 'o'}"]
    assert main(args + ["stop_after=1", "--install"]) == 0 and not target.exists()
    assert main(args + ["--install"]) == 0 and target.is_file()
    assert ToyPointPrior.load(target).metadata["train_steps"] == "2"
    assert main(["train-points", "--recipe", str(recipe), "no_such_key=1"]) == 2


def test_config_checks(tmp_path):
    with pytest.raises(ConfigError, match="autocast"):
        train_points(_tiny_run(tmp_path, autocast="bf16", out_dir=str(tmp_path / "x")), progress=False)
    with pytest.raises(ConfigError, match="batch_size"):
        train_points(_tiny_run(tmp_path, batch_size=0, out_dir=str(tmp_path / "x")), progress=False)


def test_packaged_recipe_trains_from_scratch_into_outputs():
    cfg = parse_structured(PointsTrainConfig, load_points_recipe())
    assert cfg.autocast is None and cfg.steps >= 1 and cfg.model.get("n_ctx", 256) >= 128
    assert not Path(cfg.out_dir).is_absolute() and cfg.out_dir.startswith("outputs/")  # outside git (.gitignore)
    assert set(cfg.focus_prompts) <= set(list_prompts())


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_the_training_target_read_as_epsilon_is_the_noise(prediction_type):
    model = ToyPointPrior({**TINY, "prediction_type": prediction_type})
    g = torch.Generator().manual_seed(0)
    x0, noise, t = torch.rand(3, 6, 8, generator=g) * 2 - 1, torch.randn(3, 6, 8, generator=g), torch.tensor([0, 500, 1023])
    x_t = model.schedule.q_sample(x0, t, noise)
    assert torch.allclose(model.eps_from_output(model.target(x0, noise, t), x_t, t), noise, atol=1e-5)
