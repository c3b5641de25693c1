"""Image, grid and video output (lift3d.utils.io)."""

from __future__ import annotations

import imageio.v2 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from lift3d.utils.io import image_grid, save_image, save_image_grid, to_uint8, write_video


def test_to_uint8_rounds_clips_and_passes_uint8():
    x = torch.tensor([-0.5, 0.0, 0.5, 1.0, 2.0, float("nan")])
    np.testing.assert_array_equal(to_uint8(x), [0, 0, 128, 255, 255, 0])
    u = np.arange(256, dtype=np.uint8)
    assert to_uint8(u) is u
    np.testing.assert_array_equal(to_uint8(np.array([True, False])), [255, 0])
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        to_uint8(np.array([300]))


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_save_image_round_trip_creates_parents(tmp_path, channels):
    rng = np.random.default_rng(channels)
    img = rng.random((5, 7, channels)).astype(np.float32)
    path = tmp_path / "a" / "b" / "img.png"
    save_image(path, torch.from_numpy(img))
    back = np.asarray(Image.open(path))
    if channels == 1:
        assert back.shape == (5, 7)
        back = back[:, :, None]
    assert back.shape == (5, 7, channels)
    np.testing.assert_array_equal(back, to_uint8(img))
    assert not any(p.name.startswith(".") for p in path.parent.iterdir()), "temporary file left behind"


def test_save_image_rejects_bad_shape(tmp_path):
    with pytest.raises(ValueError, match="C in 1, 3, 4"):
        save_image(tmp_path / "x.png", np.zeros((4, 4, 2)))


def test_image_grid_layout_and_channels():
    red = np.zeros((4, 6, 3), np.float32)
    red[..., 0] = 1
    gray = np.full((4, 6, 1), 0.5, np.float32)
    small = np.full((2, 3, 3), 255, np.uint8)
    grid = image_grid([[red, gray], [small]])
    assert grid.dtype == np.uint8 and grid.shape == (8, 12, 3)
    np.testing.assert_array_equal(grid[:4, :6], np.broadcast_to([255, 0, 0], (4, 6, 3)))
    np.testing.assert_array_equal(grid[:4, 6:], np.full((4, 6, 3), 128))  # gray shown as gray RGB
    np.testing.assert_array_equal(grid[4:6, :3], 255)  # smaller cell placed top-left
    assert (grid[6:, :] == 0).all() and (grid[4:, 6:] == 0).all()  # padding and missing cell are black


def test_image_grid_alpha_and_gap():
    rgba = np.zeros((3, 3, 4), np.uint8)
    rgba[..., 3] = 7
    rgb = np.full((3, 3, 3), 9, np.uint8)
    grid = image_grid([[rgba, rgb]], gap=2)
    assert grid.shape == (3, 8, 4)
    assert (grid[:, :3, 3] == 7).all()
    assert (grid[:, 5:, :3] == 9).all() and (grid[:, 5:, 3] == 255).all()
    assert (grid[:, 3:5] == 0).all()


def test_save_image_grid(tmp_path):
    rows = [[np.ones((4, 4, 3)), np.zeros((4, 4, 1))], [np.ones((4, 4))]]
    p = save_image_grid(tmp_path / "grid" / "it10.png", rows)
    back = np.asarray(Image.open(p))
    assert back.shape == (8, 8, 3)
    assert (back[:4, :4] == 255).all() and (back[:4, 4:] == 0).all() and (back[4:, :4] == 255).all()


@pytest.mark.parametrize("size", [(32, 48), (33, 47)])
def test_write_video_frames_and_size(tmp_path, size):
    h, w = size
    n = 12
    frames = []
    for i in range(n):
        f = np.zeros((h, w, 3), np.float32)
        f[..., 0] = i / (n - 1)  # red ramps over time: frame order must survive
        frames.append(f)
    path = write_video(tmp_path / "vid" / "test.mp4", frames, fps=10)
    reader = iio.get_reader(path, format="FFMPEG")
    try:
        back = [fr for fr in reader]
        meta = reader.get_meta_data()
    finally:
        reader.close()
    assert len(back) == n
    assert back[0].shape == (h + h % 2, w + w % 2, 3)  # even sizes, padded not resized
    assert meta["fps"] == pytest.approx(10)
    reds = [float(fr[: h - 2, : w - 2, 0].mean()) for fr in back]
    assert reds[0] < 20 and reds[-1] > 235
    assert all(b >= a - 3 for a, b in zip(reds, reds[1:]))


def test_write_video_rejects_mismatched_frames(tmp_path):
    with pytest.raises(ValueError, match="frame 1"):
        write_video(tmp_path / "bad.mp4", [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 10, 3), np.uint8)])
    assert not (tmp_path / "bad.mp4").exists()
