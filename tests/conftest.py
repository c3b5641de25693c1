"""Shared test fixtures: tiny registered modules ("test-" names) that exercise the core fast."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn as nn

os.environ.setdefault("LIFT3D_TEST", "1")
# One thread per test process: `make test` runs one process per core (pytest-xdist), and small
# tensor ops on two contending threads are much slower than on one.
torch.set_num_threads(1)

from lift3d.backgrounds.base import BaseBackground  # noqa: E402
from lift3d.config import Scheduled  # noqa: E402
from lift3d.geometry.base import BaseGeometry  # noqa: E402
from lift3d.guidance.base import BaseGuidance, GuidanceInput, GuidanceOutput  # noqa: E402
from lift3d.materials.base import BaseMaterial  # noqa: E402
from lift3d.registry import register  # noqa: E402
from lift3d.renderers.base import BaseRenderer  # noqa: E402


@register("test-param-geometry")
class ParamGeometry(BaseGeometry):
    """A 'scene' that is just a colour and an opacity: enough to test systems without rendering."""

    @dataclass
    class Config(BaseGeometry.Config):
        init: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
        n_extra: int = 4

    def configure(self) -> None:
        self.color_logit = nn.Parameter(torch.tensor(self.cfg.init, dtype=torch.float32))
        self.extra = nn.Parameter(torch.zeros(self.cfg.n_extra))
        self.created_from: str | None = None

    @classmethod
    def create_from(cls, other: Any, cfg: Any = None, **kwargs: Any) -> "ParamGeometry":
        new = cls(cfg, **kwargs)
        with torch.no_grad():
            new.color_logit.copy_(other.color_logit.detach())
        new.created_from = type(other).__name__
        return new


@register("test-param-geometry-b")
class ParamGeometryB(ParamGeometry):
    """A second geometry type, to test stage switches that change the type."""


@register("test-flat-renderer")
class FlatRenderer(BaseRenderer):
    @dataclass
    class Config(BaseRenderer.Config):
        opacity: float = 1.0
        learn_tint: bool = False

    def configure(self, **kwargs: Any) -> None:
        super().configure(**kwargs)
        self.tint = nn.Parameter(torch.zeros(3), requires_grad=self.cfg.learn_tint)

    def forward(self, rays_o: torch.Tensor, rays_d: torch.Tensor, **batch: Any) -> dict[str, torch.Tensor]:
        B, H, W, _ = rays_o.shape
        rgb = torch.sigmoid(self.geometry.color_logit + self.tint + self.geometry.extra.sum() * 0)
        img = rgb.expand(B, H, W, 3)
        op = torch.full((B, H, W, 1), self.cfg.opacity)
        return {"comp_rgb": img, "opacity": op, "depth": op.clone()}


@register("test-identity-material")
class IdentityMaterial(BaseMaterial):
    def forward(self, features: torch.Tensor, **kw: Any) -> torch.Tensor:
        return features[..., :3]


@register("test-black-background")
class BlackBackground(BaseBackground):
    def forward(self, dirs: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(dirs)


@register("test-target-guidance")
class TargetGuidance(BaseGuidance):
    """MSE of the mean rendered colour to a target; can inject a NaN at a chosen step."""

    @dataclass
    class Config(BaseGuidance.Config):
        target: list[float] = field(default_factory=lambda: [0.8, 0.2, 0.1])
        nan_at_step: int = -1
        weight: Scheduled = 1.0

    def forward(self, inp: GuidanceInput, t: Any = None, noise: Any = None) -> GuidanceOutput:
        rgb = inp.rgb
        target = torch.tensor(self.cfg.target, dtype=rgb.dtype)
        loss = self.C(self.cfg.weight) * ((rgb.mean(dim=(0, 1, 2)) - target) ** 2).sum()
        if self.global_step == self.cfg.nan_at_step:
            loss = loss * float("nan")
        return GuidanceOutput({"loss_mse": loss}, {"mean_rgb": rgb.detach().mean()})


def tiny_system_config(**over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "geometry_type": "test-param-geometry",
        "material_type": "test-identity-material",
        "background_type": "test-black-background",
        "renderer_type": "test-flat-renderer",
        "guidance_type": "test-target-guidance",
        "exporter_type": "mesh-exporter",
        "loss": {"lambda_mse": 1.0},
        "optimizer": {"name": "Adam", "args": {"lr": 0.05}},
    }
    cfg.update(over)
    return cfg


@pytest.fixture
def tiny_system_cfg() -> dict[str, Any]:
    return tiny_system_config()


from lift3d.exporters.base import BaseExporter  # noqa: E402


@register("test-json-exporter")
class JsonExporter(BaseExporter):
    """Writes the test geometry's colour as JSON: lets launch's export path run without meshes."""

    def export(self, geometry: Any, material: Any, out_dir: Any, name: str = "model") -> dict[str, Any]:
        import json
        from pathlib import Path

        path = Path(out_dir) / f"{name}.json"
        path.write_text(json.dumps({"rgb": torch.sigmoid(geometry.color_logit).tolist()}))
        return {"json": path}


TINY_RECIPE = """
name: tiny-test
prompt: ""
seed: 3
data:
  height: 4
  width: 4
  eval_height: 4
  eval_width: 4
  n_val_views: 1
  n_test_views: 3
system_type: text-to-3d-system
system:
  geometry_type: test-param-geometry
  material_type: test-identity-material
  background_type: test-black-background
  renderer_type: test-flat-renderer
  guidance_type: test-target-guidance
  exporter_type: test-json-exporter
  loss:
    lambda_mse: 1.0
  optimizer:
    name: Adam
    args: {lr: 0.05}
trainer:
  max_steps: 6
  val_check_interval: 3
  log_every_n_steps: 1
  enable_progress_bar: false
checkpoint:
  every_n_train_steps: 2
"""


@pytest.fixture
def tiny_recipe(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY_RECIPE)
    return p


@pytest.fixture
def fresh_plugins(monkeypatch):
    """The registry as the built-ins leave it, restored afterwards: for tests that load plugin folders."""
    from lift3d import registry

    monkeypatch.setattr(registry, "_loaded_plugin_paths", set())
    registry._ensure_builtin_modules()
    # Drop what plugin folders registered earlier in this worker (a launch run loads extensions/):
    # the test loads them itself, and a second registration of a name is an error.
    plugin_names = [n for n, c in registry._REGISTRY.items()
                    if not c.__module__.startswith(("lift3d.", "conftest", "test_")) and not n.startswith("test-")]
    for n in plugin_names:
        monkeypatch.delitem(registry._REGISTRY, n)
    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: weights come from disk or not at all."""
    import socket

    def refuse(*a, **k):
        raise AssertionError("tried the network")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
