"""The training recipe: the chain of runs behind a set of weights, as one resumable command."""

from __future__ import annotations

import pytest
import torch

from lift3d.config import ConfigError, parse_structured
from lift3d.priors.toyworld.model import ToyWorldPrior
from lift3d.priors.toyworld.recipe import is_complete, load_recipe, stage_configs, train_recipe
from lift3d.priors.toyworld.train import TrainConfig, train
from lift3d.priors.toyworld.vocab import VOCAB

TINY = {"vocab_size": len(VOCAB), "resolution": 16, "block_out_channels": [16, 32], "attention": False,
        "norm_num_groups": 8}


def _tiny_recipe():
    return {"common": {"batch_size": 4, "num_samples": 16, "sample_every": 0, "ckpt_every": 2, "model": TINY,
                       "warmup_steps": 1, "lr": 2e-3},
            "stages": [{"name": "base", "steps": 4, "min_snr_gamma": 5.0},
                       {"name": "polish", "steps": 3, "lr": 5e-4, "min_snr_gamma": None}]}


def _state(path):
    return ToyWorldPrior.load(path).state_dict()


def test_packaged_recipe_chains_the_shipped_weights_stages():
    rec = load_recipe()
    stages = stage_configs(rec, {"threads": 2, "out_dir": "out/x"})
    names = [n for n, _ in stages]
    assert names == ["v3-base", "v4-polish", "v5-no-min-snr", "v6-front"]
    first = stages[0][1]
    assert "init_from" not in first and first["out_dir"].endswith("x/v3-base")
    for (prev, _), (_, cfg) in zip(stages, stages[1:]):
        assert cfg["init_from"].endswith(f"x/{prev}/toyworld.safetensors")
    for _, cfg in stages:
        tc = parse_structured(TrainConfig, cfg)
        assert tc.threads == 2 and tc.seed == 0 and tc.model["ray_conditioning"] is True
        assert tc.autocast == "bf16"
    for _, cfg in stage_configs(rec, {"autocast": None, "out_dir": "out/x"}):  # float32 on request
        assert parse_structured(TrainConfig, cfg).autocast is None
    last = parse_structured(TrainConfig, stages[-1][1])
    assert last.min_snr_gamma is None and last.feature_weight == 4 and last.focus_fraction == 0.2
    assert sum(parse_structured(TrainConfig, c).steps for _, c in stages) == 10500


# version 6's four commands as they were run, one per version, before recipes existed (the model
# card's history); the packaged recipe (version 7) must be exactly them with autocast=bf16 added
_V6_COMMANDS = [
    "steps=6000 threads=2 out_dir=o/v3 model.ray_conditioning=true model.camera_harmonics=4 feature_weight=10 "
    "corner_weight=4 region_weight_final=0.25 'focus_prompts=[a snowman,a chair,a mug]' focus_fraction=0.25",
    "steps=1500 lr=1e-4 warmup_steps=50 ema_decay=0.998 threads=2 init_from=o/v3/toyworld.safetensors "
    "model.ray_conditioning=true model.camera_harmonics=4 'focus_prompts=[a snowman,a chair,a mug]' "
    "focus_fraction=0.1 out_dir=o/v4",
    "steps=1500 lr=1e-4 warmup_steps=50 ema_decay=0.998 threads=2 init_from=o/v4/toyworld.safetensors "
    "model.ray_conditioning=true model.camera_harmonics=4 'focus_prompts=[a snowman,a chair,a mug]' "
    "focus_fraction=0.1 min_snr_gamma=null out_dir=o/v5",
    "steps=1500 lr=1e-4 warmup_steps=50 ema_decay=0.998 threads=2 init_from=o/v5/toyworld.safetensors "
    "model.ray_conditioning=true model.camera_harmonics=4 'focus_prompts=[a snowman,a chair,a mug]' "
    "focus_fraction=0.2 feature_weight=4 min_snr_gamma=null out_dir=o/v6",
]


def test_packaged_recipe_is_version_6s_commands_under_bf16():
    import dataclasses
    import shlex

    from lift3d.priors.toyworld.__main__ import _overrides

    stages = stage_configs(load_recipe(), {"threads": 2, "out_dir": "o"})
    assert len(stages) == len(_V6_COMMANDS)
    for (name, cfg), command in zip(stages, _V6_COMMANDS):
        by_hand = _overrides(shlex.split(command + " autocast=bf16"))
        by_hand = dataclasses.asdict(parse_structured(TrainConfig, by_hand))
        chained = dataclasses.asdict(parse_structured(TrainConfig, cfg))
        for d in (by_hand, chained):  # the folders differ by name only; the chain is checked above
            d["out_dir"] = d["init_from"] = None
        assert chained == by_hand, name


def test_overrides_apply_to_every_stage_and_win():
    stages = stage_configs(_tiny_recipe(), {"lr": 1e-3, "model": {"attention": True}, "out_dir": "r"})
    assert [c["lr"] for _, c in stages] == [1e-3, 1e-3]
    # a nested override merges into the recipe's model mapping instead of replacing it
    assert all(c["model"]["attention"] is True and c["model"]["resolution"] == 16 for _, c in stages)


def test_chain_equals_the_runs_done_by_hand_and_resumes_exactly(tmp_path):
    cache = str(tmp_path / "cache")
    final = train_recipe(_tiny_recipe(), {"cache_dir": cache, "out_dir": str(tmp_path / "chain")}, progress=False)
    assert final == tmp_path / "chain" / "polish" / "toyworld.safetensors"
    # by hand: the base run, then the polish from its weights
    common = _tiny_recipe()["common"]
    a = train({**common, "steps": 4, "min_snr_gamma": 5.0, "cache_dir": cache, "out_dir": str(tmp_path / "h1")},
              progress=False)
    b = train({**common, "steps": 3, "lr": 5e-4, "min_snr_gamma": None, "cache_dir": cache, "init_from": str(a),
               "out_dir": str(tmp_path / "h2")}, progress=False)
    chained, by_hand = _state(final), _state(b)
    for k in chained:
        torch.testing.assert_close(chained[k], by_hand[k], rtol=0, atol=0, msg=k)
    assert not torch.equal(_state(a)["unet.conv_in.weight"], by_hand["unet.conv_in.weight"])  # the polish trained

    # stop_after counts the steps of one invocation over all stages: 3 (base 0-3), 3 (base 3-4 and
    # polish 0-2), then the last polish step; the result is the uninterrupted chain's, bit for bit
    over = {"cache_dir": cache, "out_dir": str(tmp_path / "cut"), "stop_after": 3}
    p1 = train_recipe(_tiny_recipe(), over, progress=False)
    assert p1.parent.name == "base" and p1.name == "toyworld-step3.safetensors"
    assert not is_complete(_tiny_recipe(), over, p1)
    p2 = train_recipe(_tiny_recipe(), over, progress=False)
    assert p2.parent.name == "polish" and p2.name == "toyworld-step2.safetensors"
    p3 = train_recipe(_tiny_recipe(), over, progress=False)
    assert p3 == tmp_path / "cut" / "polish" / "toyworld.safetensors" and is_complete(_tiny_recipe(), over, p3)
    resumed = _state(p3)
    for k in chained:
        torch.testing.assert_close(resumed[k], chained[k], rtol=0, atol=0, msg=k)
    # a finished recipe is not trained again
    stamp = (tmp_path / "cut" / "polish" / "toyworld.safetensors").stat().st_mtime_ns
    assert train_recipe(_tiny_recipe(), over, progress=False) == p3
    assert (tmp_path / "cut" / "polish" / "toyworld.safetensors").stat().st_mtime_ns == stamp
    log = (tmp_path / "cut" / "recipe_log.csv").read_text().splitlines()
    assert log[0] == "stage,steps,seconds" and [r.split(",")[:2] for r in log[1:]] == [
        ["base", "3"], ["base", "4"], ["polish", "2"], ["polish", "3"]]


@pytest.mark.parametrize("recipe, match", [
    ({"stages": [{"name": "a"}], "lr": 1}, r"unknown key\(s\) \['lr'\]; valid: common, description, stages"),
    ({"stages": []}, "'stages' must be a non-empty list"),
    ({"stages": [{"steps": 3}]}, r"stages\[0\] must be a mapping with a 'name'"),
    ({"stages": [{"name": "a"}, {"name": "a"}]}, "stage name 'a' is used twice"),
    ({"stages": [{"name": "../escape"}]}, "must be a plain folder name"),
    ({"stages": [{"name": "a"}, {"name": "b", "init_from": "x.safetensors"}]}, r"stages\[1\] \(b\) sets 'init_from'"),
    ({"stages": [{"name": "a", "out_dir": "elsewhere"}]}, r"stages\[0\] \(a\) sets 'out_dir'"),
    ({"common": {"out_dir": "o"}, "stages": [{"name": "a"}]}, "common sets 'out_dir'"),
])
def test_bad_recipes_are_named(recipe, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe(recipe)


def test_bad_stage_keys_fail_before_any_training(tmp_path):
    rec = _tiny_recipe()
    rec["stages"][1]["learning_rate"] = 1e-4
    with pytest.raises(ConfigError, match="learning_rate"):
        train_recipe(rec, {"out_dir": str(tmp_path / "o"), "cache_dir": str(tmp_path / "c")}, progress=False)
    assert not (tmp_path / "o" / "base").exists()  # stage 1 did not start
    with pytest.raises(ConfigError, match="init_from cannot be given to a recipe"):
        stage_configs(rec, {"init_from": "shipped"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_recipe_file_and_command_line(tmp_path):
    from lift3d.priors.toyworld.__main__ import main

    path = tmp_path / "r.yaml"
    path.write_text("stages:\n  - name: only\n    steps: 2\n    batch_size: 4\n    num_samples: 8\n"
                    "    sample_every: 0\n    model: {resolution: 16, block_out_channels: [16, 32], attention: false,"
                    " norm_num_groups: 8}\n")
    assert [n for n, _ in stage_configs(load_recipe(path))] == ["only"]
    rc = main(["train", "--recipe", str(path), f"out_dir={tmp_path / 'o'}", f"cache_dir={tmp_path / 'c'}"])
    assert rc == 0 and (tmp_path / "o" / "only" / "toyworld.safetensors").is_file()
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - name: a\n    stepz: 2\n")
    assert main(["train", "--recipe", str(bad), f"out_dir={tmp_path / 'b'}"]) == 2
