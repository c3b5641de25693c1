"""A tiny random toy Zero123 for tests (the ``toyworld-zero123`` family's ``get_dummy_components``).

16x16 images, two UNet levels of 16 and 32 channels, an encoder of 8 and 16 channels. Seeded, with
small normal weights everywhere (the zero-initialised layers of a fresh model would make the input
view invisible). Loaded by path through runpy by the smoke test, so it imports nothing from the tests.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: The tiny architecture (a ToyPriorConfig) and its encoder.
TINY_Z123_PRIOR = {"resolution": 16, "block_out_channels": [16, 32], "attention": False, "norm_num_groups": 8,
                   "ray_conditioning": True, "camera_harmonics": 2}
TINY_Z123_ENCODER = {"encoder_channels": [8, 16]}


def make_tiny_zero123(seed: int = 0, std: float = 0.05):
    """A seeded tiny :class:`~lift3d.priors.toyworld.zero123.ToyZero123`."""
    from lift3d.priors.toyworld.vocab import VOCAB
    from lift3d.priors.toyworld.zero123 import ToyZero123

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ToyZero123({"vocab_size": len(VOCAB), **TINY_Z123_PRIOR}, TINY_Z123_ENCODER)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=std)
    return model


def smoke_overrides(tmp_path: Path) -> dict:
    """The guidance settings that make a ``toyworld-zero123`` guidance run on the tiny model."""
    return {"pretrained": str(make_tiny_zero123().save(Path(tmp_path) / "tiny-toyworld-zero123.safetensors"))}


try:  # the fixture, for the guidance suites (pytest is absent when the smoke test's runpy loads this file alone)
    import pytest

    @pytest.fixture(scope="module")
    def toyworld_zero123_weights(tmp_path_factory):
        """A tiny random toy Zero123 saved as safetensors."""
        return make_tiny_zero123().save(tmp_path_factory.mktemp("z123") / "tiny-z123.safetensors")
except ImportError:  # pragma: no cover
    pass
