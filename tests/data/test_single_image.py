"""single-image-datamodule: loading, recentring, the reference camera and the training stream."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lift3d.config import ConfigError, load_config, resolve
from lift3d.data.random_cameras import RandomCameraDataModule
from lift3d.data.single_image import SingleImageDataModule
from lift3d.priors.toyworld.image import light_direction, save_rgba
from lift3d.priors.toyworld.data import AMBIENT, DIFFUSE
from lift3d.priors.toyworld.render import render
from lift3d.priors.toyworld.shapes import get_object
from lift3d.registry import find
from lift3d.utils.cameras import make_cameras
from lift3d.utils.io import save_image

SMALL = {"height": 8, "width": 8, "eval_height": 8, "eval_width": 8}


def _dm(image, stage_plan=None, **over) -> SingleImageDataModule:
    return SingleImageDataModule({**SMALL, "image_path": str(image), **over}, seed=3, stage_plan=stage_plan)


def _png16(path: Path, a: np.ndarray) -> Path:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour)."""
    h, w, c = a.shape
    raw = b"".join(b"\x00" + a[i].astype(">u2").tobytes() for i in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2, 4: 6}[c], 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def _box_rgba(h: int, w: int, rows: tuple[int, int], cols: tuple[int, int], rgb=(200, 40, 90)) -> np.ndarray:
    a = np.zeros((h, w, 4), np.uint8)
    a[rows[0] : rows[1], cols[0] : cols[1]] = (*rgb, 255)
    return a


def _bbox(mask: torch.Tensor, thr: float = 0.5) -> tuple[int, int, int, int]:
    m = mask[0, :, :, 0] > thr
    r, c = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
    return int(r[0]), int(r[-1]) + 1, int(c[0]), int(c[-1]) + 1


# ---------------------------------------------------------------------------------------------
# A toy render as input: the round trip


CAM = {"ref_elevation_deg": 15.0, "ref_azimuth_deg": 40.0, "ref_camera_distance": 2.2, "ref_fovy_deg": 40.0}


@pytest.fixture(scope="module")
def cube_png(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("img") / "cube.png"
    return save_rgba(p, "a red cube", elevation_deg=15.0, azimuth_deg=40.0, distance=2.2, resolution=32, supersample=2)


def _truth(res: int = 32) -> dict:
    t = lambda v: torch.tensor([v])  # noqa: E731
    cams = make_cameras(t(15.0), t(40.0), t(2.2), t(40.0), res, res)
    return render(get_object("a red cube"), cams, light_direction(cams, "above"), ambient=AMBIENT, diffuse=DIFFUSE,
                  background=0.0, supersample=2)


def test_rgba_round_trip_matches_the_render_at_the_reference_camera(cube_png):
    dm = _dm(cube_png, recenter=False, ref_height=32, ref_width=32, **CAM)
    ref, truth = dm.ref_batch(0), _truth()
    assert ref["rgb"].shape == (1, 32, 32, 3) and ref["mask"].shape == (1, 32, 32, 1)
    assert ref["rgb"].dtype == torch.float32 and ref["mask"].dtype == torch.float32
    # 8-bit quantisation of straight colour and alpha: within a couple of levels.
    assert (ref["mask"] - truth["mask"]).abs().max() <= 0.5 / 255 + 1e-6
    assert (ref["rgb"] - truth["rgb"]).abs().max() <= 2.5 / 255
    assert ref["mask"].sum() > 50  # the cube is there


def test_rgba_resized_to_the_reference_resolution(cube_png):
    ref = _dm(cube_png, recenter=False, ref_height=16, ref_width=16, **CAM).ref_batch(0)
    truth = _truth()
    pool = lambda x: F.avg_pool2d(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)  # noqa: E731
    assert ref["rgb"].shape == (1, 16, 16, 3)
    assert (ref["mask"] - pool(truth["mask"])).abs().mean() < 0.02
    assert (ref["rgb"] - pool(truth["rgb"])).abs().mean() < 0.02
    # Antialiased: edge pixels take partial coverage instead of a nearest-neighbour pick.
    assert ((ref["mask"] > 0.05) & (ref["mask"] < 0.95)).any()


def test_background_color_composites_the_transparent_part(cube_png):
    black = _dm(cube_png, recenter=False, ref_height=32, ref_width=32, **CAM).ref_batch(0)
    white = _dm(cube_png, recenter=False, ref_height=32, ref_width=32, background_color=[1.0, 1.0, 1.0],
                **CAM).ref_batch(0)
    assert torch.allclose(white["rgb"], black["rgb"] + (1 - black["mask"]), atol=1e-6)
    assert torch.equal(white["background_color"], torch.ones(3))
    corner = white["rgb"][0, 0, 0]
    assert torch.allclose(corner, torch.ones(3))


# ---------------------------------------------------------------------------------------------
# RGB + mask, bit depths


@pytest.mark.parametrize("mask_bits", [8, 16])
def test_rgb_with_a_separate_mask(tmp_path, mask_bits):
    import imageio.v3 as iio

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:12, :12]
    m = np.clip(1.5 - np.hypot(yy - 5.5, xx - 5.5) / 3.0, 0, 1)
    save_image(tmp_path / "rgb.png", rgb)
    if mask_bits == 8:
        mask_u = np.rint(m * 255).astype(np.uint8)
        iio.imwrite(tmp_path / "mask.png", mask_u)
        expect = mask_u / 255.0
    else:
        mask_u = np.rint(m * 65535).astype(np.uint16)
        iio.imwrite(tmp_path / "mask.png", mask_u)
        assert iio.imread(tmp_path / "mask.png").dtype == np.uint16
        expect = mask_u / 65535.0
    ref = _dm(tmp_path / "rgb.png", mask_path=str(tmp_path / "mask.png"), recenter=False, ref_height=12,
              ref_width=12, background_color=[0.0, 0.5, 1.0]).ref_batch(0)
    expect = torch.tensor(expect, dtype=torch.float32)[None, ..., None]
    assert torch.allclose(ref["mask"], expect, atol=1e-6)
    bg = torch.tensor([0.0, 0.5, 1.0])
    want = torch.tensor(rgb / 255.0, dtype=torch.float32)[None] * expect + (1 - expect) * bg
    assert torch.allclose(ref["rgb"], want, atol=1e-5)


def test_mask_file_wins_over_the_image_alpha(tmp_path):
    a = _box_rgba(10, 10, (0, 10), (0, 10))  # fully opaque alpha
    save_image(tmp_path / "img.png", a)
    m = np.zeros((10, 10), np.uint8)
    m[2:5, 3:7] = 255
    save_image(tmp_path / "m.png", m)
    ref = _dm(tmp_path / "img.png", mask_path=str(tmp_path / "m.png"), recenter=False, ref_height=10,
              ref_width=10).ref_batch(0)
    assert torch.equal(ref["mask"][0, :, :, 0], torch.tensor(m / 255.0, dtype=torch.float32))


def test_16_bit_rgba_loads(tmp_path):
    a = np.zeros((8, 8, 4), np.uint16)
    a[2:6, 2:6] = (65535, 0, 32768, 65535)
    _png16(tmp_path / "deep.png", a)
    ref = _dm(tmp_path / "deep.png", recenter=False, ref_height=8, ref_width=8).ref_batch(0)
    assert torch.allclose(ref["rgb"][0, 3, 3], torch.tensor([1.0, 0.0, 0.5]), atol=1 / 255)
    assert ref["mask"][0, 3, 3, 0] == 1.0 and ref["mask"][0, 0, 0, 0] == 0.0


# ---------------------------------------------------------------------------------------------
# Recentring


def test_recenter_puts_the_box_centred_with_the_requested_ratio(tmp_path):
    # A 20x40 (HxW) box in the top-left part of a 100x80 image.
    save_image(tmp_path / "off.png", _box_rgba(100, 80, (10, 30), (5, 45)))
    for ratio, size in [(0.8, 64), (0.5, 64), (0.5, 33)]:
        ref = _dm(tmp_path / "off.png", foreground_ratio=ratio, ref_height=size, ref_width=size).ref_batch(0)
        top, bottom, left, right = _bbox(ref["mask"])
        assert abs((right - left) - ratio * size) <= 1, (ratio, size)
        assert abs((bottom - top) - ratio * size / 2) <= 1, (ratio, size)
        assert abs((top + bottom) / 2 - size / 2) <= 0.5 and abs((left + right) / 2 - size / 2) <= 0.5
        # The colour came along with the box.
        assert torch.allclose(ref["rgb"][0, size // 2, size // 2], torch.tensor([200, 40, 90]) / 255.0, atol=1e-5)


def test_recenter_on_a_wide_reference_fits_the_tighter_side(tmp_path):
    save_image(tmp_path / "sq.png", _box_rgba(50, 50, (0, 20), (30, 50)))  # a 20x20 box in a corner
    ref = _dm(tmp_path / "sq.png", foreground_ratio=0.5, ref_height=32, ref_width=64).ref_batch(0)
    top, bottom, left, right = _bbox(ref["mask"])
    assert (bottom - top, right - left) == (16, 16)  # square pixels: the box stays square
    assert (top + bottom) / 2 == 16 and (left + right) / 2 == 32


def test_recenter_off_leaves_pixels_where_they_were(tmp_path):
    a = _box_rgba(24, 24, (2, 9), (13, 20))
    save_image(tmp_path / "off.png", a)
    ref = _dm(tmp_path / "off.png", recenter=False, ref_height=24, ref_width=24).ref_batch(0)
    assert torch.equal(ref["mask"][0, :, :, 0], torch.tensor(a[..., 3] / 255.0, dtype=torch.float32))
    assert torch.allclose(ref["rgb"][0], torch.tensor(a[..., :3] / 255.0 * (a[..., 3:] / 255.0), dtype=torch.float32))


# ---------------------------------------------------------------------------------------------
# Errors at construction


def test_missing_image_names_path_and_key(tmp_path):
    p = tmp_path / "nope.png"
    with pytest.raises(ConfigError, match=r"data\.image_path.*nope\.png.*does not exist.*RGBA"):
        _dm(p)


def test_unreadable_image_names_path_and_key(tmp_path):
    p = tmp_path / "junk.png"
    p.write_bytes(b"this is not a png")
    with pytest.raises(ConfigError, match=r"data\.image_path.*cannot read.*junk\.png.*RGBA"):
        _dm(p)


def test_missing_mask_names_mask_key(tmp_path):
    save_image(tmp_path / "rgb.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ConfigError, match=r"data\.mask_path.*m\.png.*does not exist"):
        _dm(tmp_path / "rgb.png", mask_path=str(tmp_path / "m.png"))


def test_empty_mask_is_an_error(tmp_path):
    save_image(tmp_path / "clear.png", np.zeros((6, 6, 4), np.uint8))
    with pytest.raises(ConfigError, match=r"data\.image_path.*clear\.png.*empty"):
        _dm(tmp_path / "clear.png")
    save_image(tmp_path / "rgb.png", np.full((6, 6, 3), 255, np.uint8))
    save_image(tmp_path / "m.png", np.zeros((6, 6), np.uint8))
    with pytest.raises(ConfigError, match=r"data\.mask_path.*m\.png.*empty"):
        _dm(tmp_path / "rgb.png", mask_path=str(tmp_path / "m.png"))


def test_rgb_without_mask_is_an_error(tmp_path):
    save_image(tmp_path / "rgb.png", np.full((6, 6, 3), 255, np.uint8))
    with pytest.raises(ConfigError, match=r"data\.image_path.*rgb\.png.*3 channels.*data\.mask_path"):
        _dm(tmp_path / "rgb.png")


def test_mask_of_another_size_is_an_error(tmp_path):
    save_image(tmp_path / "rgb.png", np.full((6, 6, 3), 255, np.uint8))
    save_image(tmp_path / "m.png", np.full((5, 6), 255, np.uint8))
    with pytest.raises(ConfigError, match=r"data\.mask_path.*5x6.*6x6"):
        _dm(tmp_path / "rgb.png", mask_path=str(tmp_path / "m.png"))


def test_unset_image_path_says_how_to_set_it():
    with pytest.raises(ConfigError, match=r"data\.image_path.*image="):
        SingleImageDataModule(SMALL)


def test_stage_image_checked_at_construction(tmp_path, cube_png):
    with pytest.raises(ConfigError, match=r"system\.stages\[1\]\.data\.image_path.*gone\.png"):
        _dm(cube_png, stage_plan=[(0, {}), (5, {"image_path": str(tmp_path / "gone.png")})])


def test_bad_ratio_and_background(cube_png):
    with pytest.raises(ConfigError, match=r"data\.foreground_ratio"):
        _dm(cube_png, foreground_ratio=1.5)
    with pytest.raises(ConfigError, match=r"data\.background_color"):
        _dm(cube_png, background_color=[0.0, 2.0, 0.0])


# ---------------------------------------------------------------------------------------------
# The reference camera and the training stream


def test_ref_camera_matches_make_cameras(cube_png):
    cam = {"ref_elevation_deg": 10.0, "ref_azimuth_deg": -30.0, "ref_camera_distance": 2.5, "ref_fovy_deg": 35.0}
    ref = _dm(cube_png, ref_height=12, ref_width=16, **cam).ref_batch(0)
    t = lambda v: torch.tensor([v])  # noqa: E731
    want = make_cameras(t(10.0), t(-30.0), t(2.5), t(35.0), 12, 16)
    assert set(ref) == set(want) | {"rgb", "mask", "background_color", "shading"}
    assert ref["shading"] == "diffuse"  # a shaded photo: no random albedo passes on the reference view
    assert "shading" not in _dm(cube_png, ref_shading=None, **cam).ref_batch(0)
    for k, v in want.items():
        assert torch.equal(ref[k], v) if torch.is_tensor(v) else ref[k] == v, k
    assert torch.equal(ref["light_positions"], ref["camera_positions"])
    assert ref["rgb"].shape == (1, 12, 16, 3) and ref["mask"].shape == (1, 12, 16, 1)


def test_ref_resolution_follows_height_and_width_and_stages(cube_png):
    dm = _dm(cube_png, height=[0, 8, 16, 10], width=8, stage_plan=[(0, {}), (20, {"height": 24, "width": 24})])
    assert dm.ref_batch(0)["rgb"].shape == (1, 8, 8, 3)
    assert dm.ref_batch(10)["rgb"].shape == (1, 16, 8, 3)  # the schedule, prepared on first use
    assert dm.ref_batch(25)["mask"].shape == (1, 24, 24, 1)  # the stage override
    assert dm.ref_size(25) == (24, 24)


def test_training_batches_are_random_camera_batches_plus_ref(cube_png):
    over = {"batch_size": 8, "n_views": 4, "light_sample_strategy": "upper-hemisphere"}
    dm = _dm(cube_png, **over)
    plain = RandomCameraDataModule({**SMALL, **over}, seed=3)
    for step in (0, 1, 17):
        b, p = dm.training_batch(step), plain.training_batch(step)
        assert set(b) == set(p) | {"ref"}
        for k, v in p.items():
            assert torch.equal(b[k], v) if torch.is_tensor(v) else b[k] == v, k
        assert b["n_views"] == 4
    # Deterministic per step, across instances; fresh tensors each time.
    again = _dm(cube_png, **over)
    b1, b2 = dm.training_batch(5), again.training_batch(5)
    for k in ("c2w", "light_positions"):
        assert torch.equal(b1[k], b2[k])
    assert torch.equal(b1["ref"]["rgb"], b2["ref"]["rgb"])
    b1["ref"]["rgb"].zero_()
    assert dm.training_batch(5)["ref"]["rgb"].abs().sum() > 0
    assert not torch.equal(dm.training_batch(6)["azimuth"], b2["azimuth"])


def test_dataloaders(cube_png):
    dm = find("single-image-datamodule", "data")({**SMALL, "image_path": str(cube_png), "n_val_views": 2})
    batch = next(iter(dm.train_dataloader()))
    assert "ref" in batch and batch["ref"]["rgb"].shape == (1, 8, 8, 3)
    vals = list(dm.val_dataloader())
    plain = list(RandomCameraDataModule({**SMALL, "n_val_views": 2}).val_dataloader())
    assert len(vals) == 2 and all(torch.equal(v["c2w"], p["c2w"]) for v, p in zip(vals, plain))
    assert "ref" not in vals[0]


def test_image_override_reaches_image_path(tmp_path, cube_png):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("image: null\ndata_type: single-image-datamodule\ndata:\n  image_path: ${image}\n  height: 8\n"
                      "  width: 8\n")
    raw, prov = load_config(recipe, [f"image={cube_png}"])
    data = resolve(raw, prov)["data"]
    dm = SingleImageDataModule(data, prov=prov)
    assert dm.cfg.image_path == str(cube_png)
    raw, prov = load_config(recipe, [])
    with pytest.raises(ConfigError, match=r"data\.image_path.*image="):
        SingleImageDataModule(resolve(raw, prov)["data"], prov=prov)
