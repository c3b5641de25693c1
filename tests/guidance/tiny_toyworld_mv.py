"""A tiny random multi-view toy prior for tests (the ``toyworld-mv`` family's ``get_dummy_components``).

16x16 images, two UNet levels of 16 and 32 channels with self-attention at the lower one (one head),
so that there is something to make joint. Seeded, with small normal weights everywhere (diffusers
zero-initialises the output convolution, which would make every prediction zero).
Loaded by path through runpy by the smoke test, so it imports nothing from the tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

#: The tiny architecture (a ToyPriorConfig).
TINY_MV_PRIOR = {"resolution": 16, "block_out_channels": [16, 32], "attention": True, "norm_num_groups": 8}


def make_tiny_mv_prior(n_views: int = 4, seed: int = 0, std: float = 0.05):
    """A seeded tiny :class:`~lift3d.priors.toyworld.multiview.MultiViewToyPrior`."""
    from lift3d.priors.toyworld.multiview import MultiViewToyPrior
    from lift3d.priors.toyworld.vocab import VOCAB

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MultiViewToyPrior({"vocab_size": len(VOCAB), **TINY_MV_PRIOR}, {"n_views": n_views})
        for p in model.parameters():
            torch.nn.init.normal_(p, std=std)
    return model


def save_tiny_mv_prior(path: Path, n_views: int = 4, seed: int = 0) -> Path:
    return make_tiny_mv_prior(n_views, seed).save(path)


def smoke_overrides(tmp_path: Path) -> dict:
    """The guidance settings that make a ``toyworld-mv`` guidance run on the tiny prior."""
    return {"pretrained": str(save_tiny_mv_prior(Path(tmp_path) / "tiny-toyworld-mv.safetensors"))}


@pytest.fixture(scope="module")
def toyworld_mv_weights(tmp_path_factory):
    """A tiny random multi-view prior saved as safetensors (trained group size 4)."""
    return save_tiny_mv_prior(tmp_path_factory.mktemp("mv") / "tiny-mv.safetensors")
