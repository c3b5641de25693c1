"""single-image-datamodule's ``remove_background``: masks made by rembg, checked with a fake rembg.

rembg is an optional extra (``pip install lift3d[rembg]``) that downloads a segmentation model on
first use, so these tests put a stand-in module into ``sys.modules``: it "segments" the pixels
whose red channel is high and records every call, which lets the tests check when rembg runs, on
what, and what becomes of its answer. rembg itself is never imported here.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from lift3d.config import ConfigError
from lift3d.data.single_image import SingleImageDataModule, load_image_and_mask
from lift3d.utils.io import save_image

SMALL = {"height": 8, "width": 8, "eval_height": 8, "eval_width": 8}


def _photo(h: int = 12, w: int = 10) -> np.ndarray:
    """An RGB "photo": a red box (rows 3-8, cols 2-6) on a gray-blue background."""
    a = np.zeros((h, w, 3), np.uint8)
    a[...] = (60, 90, 150)
    a[3:9, 2:7] = (220, 30, 40)
    return a


def _box_alpha(h: int = 12, w: int = 10) -> np.ndarray:
    m = np.zeros((h, w), np.float32)
    m[3:9, 2:7] = 1.0
    return m


class FakeRembg(types.ModuleType):
    """Stands in for rembg: ``remove`` returns an RGBA cut-out (or, with ``mode="mask"``, a gray mask)
    whose alpha is 255 where red > 128; every input it got is kept in ``calls``."""

    def __init__(self, mode: str = "rgba", fail: Exception | None = None, empty: bool = False):
        super().__init__("rembg")
        self.mode, self.fail, self.empty = mode, fail, empty
        self.calls: list[np.ndarray] = []

    def remove(self, data, *args, **kwargs):
        self.calls.append(np.array(data))
        if self.fail is not None:
            raise self.fail
        a = np.asarray(data)
        alpha = np.where(a[..., 0] > 128, 255, 0).astype(np.uint8)
        if self.empty:
            alpha[...] = 0
        if self.mode == "mask":
            return alpha
        return np.concatenate([a, alpha[..., None]], axis=-1)


@pytest.fixture
def fake_rembg(monkeypatch) -> FakeRembg:
    fake = FakeRembg()
    monkeypatch.setitem(sys.modules, "rembg", fake)
    return fake


@pytest.fixture
def no_rembg(monkeypatch) -> None:
    # None in sys.modules makes `import rembg` raise ImportError, installed or not.
    monkeypatch.setitem(sys.modules, "rembg", None)


def _rgb_png(tmp_path: Path) -> Path:
    return save_image(tmp_path / "photo.png", _photo())


def _dm(image: Path, stage_plan=None, **over) -> SingleImageDataModule:
    return SingleImageDataModule({**SMALL, "image_path": str(image), **over}, seed=3, stage_plan=stage_plan)


# ---------------------------------------------------------------------------------------------
# Off (the default): an RGB image needs a mask, as before


def test_default_is_off_and_an_rgb_image_without_mask_still_names_mask_path(tmp_path, fake_rembg):
    p = _rgb_png(tmp_path)
    with pytest.raises(ConfigError, match=r"data\.image_path.*photo\.png.*3 channels.*data\.mask_path.*"
                                          r"data\.remove_background: auto.*lift3d\[rembg\]"):
        _dm(p)
    assert fake_rembg.calls == []  # never silently: the option was not given


def test_off_leaves_rgba_and_mask_inputs_alone(tmp_path, fake_rembg):
    rgba = np.concatenate([_photo(), np.zeros((12, 10, 1), np.uint8)], -1)
    rgba[2:5, 1:4, 3] = 255  # an alpha that is not what the fake would find
    save_image(tmp_path / "rgba.png", rgba)
    _, alpha = load_image_and_mask(str(tmp_path / "rgba.png"), remove_background=False)
    assert torch.equal(alpha, torch.from_numpy(rgba[..., 3] / 255.0).float())
    assert fake_rembg.calls == []


# ---------------------------------------------------------------------------------------------
# On: rembg makes the mask


@pytest.mark.parametrize("value", [True, "auto"])
def test_rgb_without_mask_gets_rembgs_mask_and_keeps_its_colour(tmp_path, fake_rembg, value):
    p = _rgb_png(tmp_path)
    rgb, alpha = load_image_and_mask(str(p), remove_background=value)
    assert len(fake_rembg.calls) == 1
    sent = fake_rembg.calls[0]
    assert sent.dtype == np.uint8 and sent.shape == (12, 10, 3)  # 8-bit RGB, the file's pixels
    assert np.array_equal(sent, _photo())
    assert torch.equal(alpha, torch.from_numpy(_box_alpha()))
    assert torch.allclose(rgb, torch.from_numpy(_photo() / 255.0).float())


def test_a_gray_mask_from_rembg_is_accepted(tmp_path, monkeypatch):
    fake = FakeRembg(mode="mask")
    monkeypatch.setitem(sys.modules, "rembg", fake)
    _, alpha = load_image_and_mask(str(_rgb_png(tmp_path)), remove_background=True)
    assert torch.equal(alpha, torch.from_numpy(_box_alpha()))


def test_a_gray_image_reaches_rembg_as_8_bit_rgb(tmp_path, fake_rembg):
    gray = np.zeros((6, 7), np.uint8)
    gray[1:4, 2:5] = 250
    save_image(tmp_path / "gray.png", gray)
    _, alpha = load_image_and_mask(str(tmp_path / "gray.png"), remove_background="auto")
    sent = fake_rembg.calls[0]
    assert sent.shape == (6, 7, 3) and sent.dtype == np.uint8
    assert np.array_equal(sent[..., 0], gray)
    assert torch.equal(alpha, torch.from_numpy((gray > 128).astype(np.float32)))


def test_auto_uses_a_real_alpha_channel_and_does_not_call_rembg(tmp_path, fake_rembg):
    rgba = np.concatenate([_photo(), np.zeros((12, 10, 1), np.uint8)], -1)
    rgba[0:4, 0:5, 3] = 255
    save_image(tmp_path / "rgba.png", rgba)
    _, alpha = load_image_and_mask(str(tmp_path / "rgba.png"), remove_background="auto")
    assert fake_rembg.calls == []
    assert torch.equal(alpha, torch.from_numpy(rgba[..., 3] / 255.0).float())


def test_auto_treats_an_alpha_opaque_everywhere_as_no_mask(tmp_path, fake_rembg):
    rgba = np.concatenate([_photo(), np.full((12, 10, 1), 255, np.uint8)], -1)  # a photo saved as RGBA
    save_image(tmp_path / "opaque.png", rgba)
    _, alpha = load_image_and_mask(str(tmp_path / "opaque.png"), remove_background="auto")
    assert len(fake_rembg.calls) == 1
    assert torch.equal(alpha, torch.from_numpy(_box_alpha()))


def test_true_replaces_the_images_own_alpha(tmp_path, fake_rembg):
    rgba = np.concatenate([_photo(), np.zeros((12, 10, 1), np.uint8)], -1)
    rgba[0:2, 0:2, 3] = 255
    save_image(tmp_path / "rgba.png", rgba)
    _, alpha = load_image_and_mask(str(tmp_path / "rgba.png"), remove_background=True)
    assert len(fake_rembg.calls) == 1
    assert torch.equal(alpha, torch.from_numpy(_box_alpha()))


def test_auto_with_a_mask_file_uses_the_file(tmp_path, fake_rembg):
    p = _rgb_png(tmp_path)
    m = np.zeros((12, 10), np.uint8)
    m[5:7, 5:7] = 255
    save_image(tmp_path / "m.png", m)
    _, alpha = load_image_and_mask(str(p), str(tmp_path / "m.png"), remove_background="auto")
    assert fake_rembg.calls == []
    assert torch.equal(alpha, torch.from_numpy(m / 255.0).float())


def test_true_with_a_mask_file_is_an_error(tmp_path, fake_rembg):
    p = _rgb_png(tmp_path)
    save_image(tmp_path / "m.png", np.full((12, 10), 255, np.uint8))
    with pytest.raises(ConfigError, match=r"data\.remove_background.*true.*data\.mask_path.*m\.png"):
        _dm(p, remove_background=True, mask_path=str(tmp_path / "m.png"))
    assert fake_rembg.calls == []


# ---------------------------------------------------------------------------------------------
# rembg missing or failing: a clear stop, never a silent fallback


@pytest.mark.parametrize("value", [True, "auto"])
def test_without_rembg_the_error_names_the_key_and_the_extra(tmp_path, no_rembg, value):
    p = _rgb_png(tmp_path)
    with pytest.raises(ConfigError) as info:
        _dm(p, remove_background=value)
    msg = str(info.value)
    assert "data.remove_background" in msg and "photo.png" in msg
    assert "pip install lift3d[rembg]" in msg
    assert "data.mask_path" in msg  # the way out without rembg


def test_without_rembg_an_rgba_input_under_auto_needs_nothing(tmp_path, no_rembg):
    rgba = np.concatenate([_photo(), np.zeros((12, 10, 1), np.uint8)], -1)
    rgba[3:9, 2:7, 3] = 255
    save_image(tmp_path / "rgba.png", rgba)
    _, alpha = load_image_and_mask(str(tmp_path / "rgba.png"), remove_background="auto")
    assert torch.equal(alpha, torch.from_numpy(_box_alpha()))


def test_a_rembg_failure_names_the_key_and_the_reason(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "rembg", FakeRembg(fail=OSError("model download failed")))
    with pytest.raises(ConfigError, match=r"data\.remove_background.*rembg failed.*photo\.png.*OSError.*"
                                          r"model download failed"):
        _dm(_rgb_png(tmp_path), remove_background=True)


def test_an_empty_rembg_mask_is_an_error_that_says_rembg_found_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "rembg", FakeRembg(empty=True))
    with pytest.raises(ConfigError, match=r"data\.remove_background.*rembg found no object.*photo\.png"):
        _dm(_rgb_png(tmp_path), remove_background="auto")


def test_unknown_values_are_refused_at_parse_time(tmp_path, fake_rembg):
    for bad in ("yes", 1, "Auto"):
        with pytest.raises(ConfigError, match=r"data\.remove_background"):
            _dm(_rgb_png(tmp_path), remove_background=bad)
    assert fake_rembg.calls == []


# ---------------------------------------------------------------------------------------------
# Through the data module


def test_the_reference_batch_carries_rembgs_mask_and_rembg_runs_once(tmp_path, fake_rembg):
    p = _rgb_png(tmp_path)
    plan = [(0, {}), (4, {"ref_height": 24, "ref_width": 20})]  # a second reference resolution
    dm = _dm(p, stage_plan=plan, remove_background=True, recenter=False, ref_height=12, ref_width=10,
             background_color=[1.0, 1.0, 1.0])
    ref = dm.ref_batch(0)
    assert torch.equal(ref["mask"][0, :, :, 0], torch.from_numpy(_box_alpha()))
    # the colour outside rembg's mask is replaced by the background, inside it is the photo's
    out = ref["mask"][0, :, :, 0] == 0
    assert torch.all(ref["rgb"][0][out] == 1.0)
    assert torch.allclose(ref["rgb"][0][~out], torch.tensor([220, 30, 40]) / 255.0)
    later = dm.training_batch(5)["ref"]
    assert later["mask"].shape == (1, 24, 20, 1)
    assert len(fake_rembg.calls) == 1  # once per image, whatever the stages and resolutions


def test_a_stage_may_turn_it_on_and_is_checked_at_construction(tmp_path, no_rembg):
    p = _rgb_png(tmp_path)
    rgba = np.concatenate([_photo(), np.zeros((12, 10, 1), np.uint8)], -1)
    rgba[3:9, 2:7, 3] = 255
    save_image(tmp_path / "rgba.png", rgba)
    plan = [(0, {}), (4, {"image_path": str(p), "remove_background": "auto"})]
    with pytest.raises(ConfigError, match=r"system\.stages\[1\]\.data\.remove_background.*lift3d\[rembg\]"):
        _dm(tmp_path / "rgba.png", stage_plan=plan)
