"""toyworld-zero123-views-guidance: six views drawn by the toy Zero123 at Zero123++'s cameras, then fitted."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from lift3d.config import ConfigError
from lift3d.guidance.base import CameraBatch, GuidanceInput
from lift3d.priors.toyworld import zero123 as z123
from lift3d.priors.toyworld.model import MissingWeightsError
from lift3d.priors.zero123pp.poses import view_cameras
from lift3d.priors.zero123pp.views import read_cameras, read_record
from lift3d.registry import find
from lift3d.utils.cameras import make_cameras
from tiny_toyworld_zero123 import make_tiny_zero123

RES = 16


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_tiny_zero123().save(tmp_path_factory.mktemp("z123v") / "tiny-z123.safetensors")


def _png(tmp_path: Path, colour=(200, 40, 40)) -> Path:
    img = np.zeros((32, 32, 4), dtype=np.uint8)
    img[8:24, 10:22] = [*colour, 255]
    path = tmp_path / f"in-{colour[0]}.png"
    iio.imwrite(path, img)
    return path


def _batch(turn: float, cache: Path, idx=(0, 3)) -> dict:
    t = view_cameras("v1.2", 2.0, 40.0)
    i = torch.tensor(idx)
    az = torch.remainder(t["azimuth"][i] + turn + 180.0, 360.0) - 180.0
    b = make_cameras(t["elevation"][i], az, t["distance"][i], t["fovy"][i], RES, RES)
    b.update(view_index=i, input_azimuth=turn, views_cache=str(cache))
    return b


def _inp(batch: dict) -> GuidanceInput:
    return GuidanceInput(cameras=CameraBatch.from_batch(batch), rgb=torch.rand(2, RES, RES, 3),
                         opacity=torch.rand(2, RES, RES, 1), extras=batch)


def _guidance(weights, image, **over):
    return find("toyworld-zero123-views-guidance", "guidance")(
        {"pretrained": str(weights), "image_path": str(image), "input_elevation": 10.0, "num_inference_steps": 3,
         **over})


def test_views_are_sampled_around_the_input_view_and_placed_where_it_is(weights, tmp_path, monkeypatch):
    seen = {}
    original = z123.sample_novel_views

    def spy(model, image, in_el, in_az, in_dist, el, az, dist, **k):
        seen.update(image=image, in_el=in_el, in_az=in_az, in_dist=in_dist, el=el, az=az, dist=dist)
        return original(model, image, in_el, in_az, in_dist, el, az, dist, **k)

    monkeypatch.setattr(z123, "sample_novel_views", spy)
    cache = tmp_path / "views"
    g = _guidance(weights, _png(tmp_path))
    out = g(_inp(_batch(30.0, cache)))
    table = view_cameras("v1.2", 2.0, 40.0)
    # the model is asked for the camera change from the input (at azimuth 0), at its own resolution
    assert torch.equal(seen["az"], table["azimuth"]) and torch.equal(seen["in_az"], torch.zeros(6))
    assert torch.equal(seen["in_el"], torch.full((6,), 10.0)) and torch.equal(seen["el"], table["elevation"])
    assert torch.equal(seen["dist"], torch.full((6,), 2.0)) and seen["image"].shape == (6, 3, RES, RES)
    # ... and the views sit where the input's turn puts them, on disk too
    turned = torch.remainder(table["azimuth"] + 30.0 + 180.0, 360.0) - 180.0
    assert torch.allclose(g.views.cameras["azimuth"], turned)
    entries, _ = read_cameras(cache)
    assert [round(e["azimuth"]) for e in entries] == [round(float(a)) for a in turned]
    assert read_record(cache)["input_azimuth"] == 30.0 and read_record(cache)["generator"] == "toyworld-zero123"
    assert torch.isfinite(out["loss_rgb"]) and torch.isfinite(out["loss_mask"])
    # a batch at the unturned cameras is at none of these views
    with pytest.raises(ConfigError, match="not the views'"):
        g(_inp(_batch(0.0, cache)))


def test_the_views_follow_the_input_image_and_are_reused_when_nothing_changed(weights, tmp_path, monkeypatch):
    cls = find("toyworld-zero123-views-guidance", "guidance")
    calls = []
    original = cls.generate
    monkeypatch.setattr(cls, "generate", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    red, blue = _png(tmp_path), _png(tmp_path, (40, 40, 200))
    a = _guidance(weights, red)
    a(_inp(_batch(30.0, tmp_path / "a")))
    b = _guidance(weights, blue)
    b(_inp(_batch(30.0, tmp_path / "b")))
    assert calls == [1, 1] and not torch.allclose(a.views.rgb, b.views.rgb, atol=1e-3)
    again = _guidance(weights, red)
    again(_inp(_batch(30.0, tmp_path / "a")))  # a resumed run: the folder's record matches
    assert calls == [1, 1] and torch.allclose(again.views.rgb, a.views.rgb, atol=1 / 255)
    other_turn = _guidance(weights, red)
    other_turn(_inp(_batch(90.0, tmp_path / "a")))  # the input moved: sampled again
    assert calls == [1, 1, 1] and read_record(tmp_path / "a")["input_azimuth"] == 90.0


def test_missing_weights_name_the_training_command_unless_a_views_folder_is_given(tmp_path):
    cls = find("toyworld-zero123-views-guidance", "guidance")
    with pytest.raises(MissingWeightsError, match="train-zero123"):
        g = cls({"pretrained": str(tmp_path / "none.safetensors"), "image_path": str(_png(tmp_path))})
        g(_inp(_batch(0.0, tmp_path / "v")))
    cfg = cls.Config(pretrained=str(tmp_path / "none.safetensors"), views_dir=str(tmp_path))
    assert cls.missing_weights(cfg) is None
