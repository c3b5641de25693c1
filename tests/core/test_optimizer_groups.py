"""The optimizer config has no silent no-ops: every parameter group names something to train and every
key is one the optimizer accepts, checked for every stage before training and again when a stage's
optimizer is built."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import tiny_system_config
from lift3d.config import ConfigError
from lift3d.geometry.base import BaseGeometry
from lift3d.launch import load_experiment
from lift3d.registry import find, register
from lift3d.systems.text_to_3d import TextTo3DSystem

REPO = Path(__file__).resolve().parents[2]


@register("test-texture-only-geometry")
class TextureOnlyGeometry(BaseGeometry):
    """A later-stage geometry with other parameters than the conftest's (no ``extra``)."""

    @dataclass
    class Config(BaseGeometry.Config):
        size: int = 2

    def configure(self) -> None:
        torch.rand(1)  # draws from the global stream, as real initialisers do
        self.texture = nn.Parameter(torch.zeros(self.cfg.size, self.cfg.size, 3))

    @classmethod
    def create_from(cls, other, cfg=None, **kwargs):
        return cls(cfg, **kwargs)


def system(**optimizer) -> TextTo3DSystem:
    return TextTo3DSystem(tiny_system_config(optimizer={"name": "Adam", "args": {"lr": 0.05}, **optimizer}))


def test_a_group_that_matches_no_parameter_is_an_error_naming_it_and_the_valid_names():
    s = system(params={"geometry.xyz": {"lr": 1e30}})
    msg = r"system\.optimizer\.params\.geometry\.xyz.*'geometry\.xyz' matches no parameter.*geometry\.color_logit"
    with pytest.raises(ConfigError, match=msg):
        s.check_optimizer_config()
    with pytest.raises(ConfigError, match=msg):  # and building the optimizer does not skip it either
        s.configure_optimizers()
    with pytest.raises(ConfigError, match=r"'background' matches no parameter"):  # a module without parameters
        system(params={"background": {"lr": 0.1}}).check_optimizer_config()
    with pytest.raises(ConfigError, match=r"Did you mean 'geometry\.extra'"):
        system(params={"geometry.extar": {"lr": 0.1}}).check_optimizer_config()


def test_module_and_parameter_paths_are_valid_groups_even_when_frozen():
    s = TextTo3DSystem(tiny_system_config(optimizer={"args": {"lr": 0.05}, "params": {
        "geometry": {"lr": 0.1}, "geometry.extra": {"lr": 0.2, "weight_decay": 0.01}, "renderer.tint": {"lr": 0.3}}}))
    assert not s.renderer.tint.requires_grad  # a real parameter, not trained: its group is empty, not wrong
    s.check_optimizer_config()
    groups = {g["name"]: g for g in s.configure_optimizers().param_groups}
    assert set(groups) == {"geometry", "geometry.extra"} and groups["geometry.extra"]["weight_decay"] == 0.01


@pytest.mark.parametrize("group, key, optimizer", [
    ("geometry", "lrr", "Adam"),
    ("geometry", "momentum", "Adam"),  # an SGD setting given to Adam
    ("geometry.extra", "betas", "SGD"),
    ("geometry", "name", "Adam"),  # lift3d names the groups itself
])
def test_an_unknown_key_in_a_group_is_an_error_listing_the_optimizers_keys(group, key, optimizer):
    s = system(name=optimizer, params={group: {"lr": 0.1, key: 0.5}})
    valid = "momentum" if optimizer == "SGD" else "betas, eps, weight_decay"
    msg = rf"system\.optimizer\.params\.{group}\.{key}\b.*'{key}' is not a setting .*{optimizer}; valid: lr, .*{valid}"
    with pytest.raises(ConfigError, match=msg):
        s.check_optimizer_config()
    with pytest.raises(ConfigError, match=msg):
        s.configure_optimizers()


def test_unknown_optimizer_arguments_and_names_are_errors():
    with pytest.raises(ConfigError, match=r"system\.optimizer\.args\.momentun\b.*valid: lr, momentum"):
        system(name="SGD", args={"lr": 0.1, "momentun": 0.9}).check_optimizer_config()
    with pytest.raises(ConfigError, match=r"system\.optimizer\.name\b.*'Adamm' is not a torch\.optim optimizer\. "
                                          r"Did you mean 'Adam'\?.*AdamW"):
        system(name="Adamm").check_optimizer_config()
    with pytest.raises(ConfigError, match=r"system\.optimizer\.params\.geometry\.lr\b.*schedule"):
        system(params={"geometry": {"lr": [1, 2]}}).check_optimizer_config()


def test_a_dotted_group_set_on_the_command_line_is_caught_with_how_to_write_it(tiny_recipe):
    """``params.geometry.extra.lr=...`` splits at every dot: a key 'extra' in a group 'geometry'."""
    cfg, _, prov = load_experiment(str(tiny_recipe), ["system.optimizer.params.geometry.extra.lr=1e30"])
    s = find(cfg.system_type, "system")(cfg.system, cfg_key="system", prov=prov, seed=cfg.seed)
    with pytest.raises(ConfigError, match=r"system\.optimizer\.params\.geometry\.extra \(set in the command line\): "
                                          r"'extra' is not a setting .* system\.optimizer\.params=\{geometry\.extra: "):
        s.check_optimizer_config()
    cfg, _, prov = load_experiment(str(tiny_recipe), ["system.optimizer.params={geometry.extra: {lr: 1e30}}"])
    s = find(cfg.system_type, "system")(cfg.system, cfg_key="system", prov=prov, seed=cfg.seed)
    s.check_optimizer_config()
    assert {g["name"]: g["lr"] for g in s.configure_optimizers().param_groups}["geometry.extra"] == 1e30


def _staged(stage_params: dict, top: dict | None = None) -> TextTo3DSystem:
    return TextTo3DSystem(tiny_system_config(
        optimizer={"args": {"lr": 0.05}, "params": top or {}},
        stages=[{"name": "a", "steps": 1},
                {"name": "b", "steps": 1, "geometry_type": "test-texture-only-geometry",
                 "optimizer": {"params": stage_params}}]))


def test_a_later_stages_groups_are_checked_at_start_up_without_moving_the_random_stream():
    s = _staged({"geometry.textur": {"lr": 0.1}})
    state = torch.get_rng_state()
    with pytest.raises(ConfigError, match=r"system\.stages\[1\]\.optimizer\.params\.geometry\.textur\b.*"
                                          r"stage 1 \('b'\).*Did you mean 'geometry\.texture'"):
        s.check_optimizer_config()
    assert torch.equal(torch.get_rng_state(), state)
    assert type(s.geometry).__name__ == "ParamGeometry"  # the check built nothing into the system
    # A group for the later geometry declared at the top level applies to stage 0, where it matches nothing.
    with pytest.raises(ConfigError, match=r"system\.optimizer\.params\.geometry\.texture\b.*stage 0 \('a'\).*"
                                          r"belongs in that stage's optimizer"):
        _staged({}, top={"geometry.texture": {"lr": 0.1}}).check_optimizer_config()


def test_groups_inherited_from_an_earlier_stage_may_match_nothing_in_a_later_one():
    """Stage 0's geometry.extra group is carried into stage 1, whose geometry has no ``extra``."""
    s = _staged({"geometry.texture": {"lr": 0.1}}, top={"geometry.extra": {"lr": 0.2}})
    s.check_optimizer_config()
    s.enter_stage(1)
    groups = {g["name"]: g for g in s.configure_optimizers().param_groups}
    assert groups["geometry.texture"]["params"] == [s.geometry.texture] and "geometry.extra" not in groups


@pytest.mark.parametrize("config", sorted((REPO / "configs" / "tiny").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_passes(config):
    cfg, _, prov = load_experiment(str(config), ["prompt=a snowman", "image=input.png"])  # the image is not read
    s = find(cfg.system_type, "system")(cfg.system, cfg_key="system", prov=prov, seed=cfg.seed)
    s.check_optimizer_config()
