"""A tiny random toy ViewDiff for tests (the ``toyworld-viewdiff`` family's ``get_dummy_components``).

The tiny multi-view toy prior's network (16x16 images, UNet levels of 16 and 32 channels, one
attention head at the lower level) with ViewDiff's parts: a rank-2 cross-frame LoRA on its
attention layers and a small projection layer (8 feature channels, a 6^3 grid, 8 samples per ray)
after its mid block. Seeded, with small normal weights everywhere, the zero-initialised LoRA ``up``
and projection output included, so that every part is live. Loaded by path through runpy by the
smoke test, so it imports nothing from the tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

#: The tiny architecture (a ToyPriorConfig) and its added parts (a ViewDiffConfig).
TINY_VD_PRIOR = {"resolution": 16, "block_out_channels": [16, 32], "attention": True, "norm_num_groups": 8}
TINY_VD_PARTS = {"lora_rank": 2, "cond_hidden": 8, "projection_after": ["mid_block"], "proj_channels": 8,
                 "grid_size": 6, "n_samples": 8, "proj_hidden": 8}


def make_tiny_viewdiff(n_views: int = 4, seed: int = 0, std: float = 0.05, parts: dict | None = None):
    """A seeded tiny :class:`~lift3d.priors.toyworld.viewdiff.ViewDiffToyPrior`, every weight random."""
    from lift3d.priors.toyworld.viewdiff import ViewDiffToyPrior
    from lift3d.priors.toyworld.vocab import VOCAB

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViewDiffToyPrior({"vocab_size": len(VOCAB), **TINY_VD_PRIOR}, {"n_views": n_views},
                                 {**TINY_VD_PARTS, **(parts or {})})
        for p in model.parameters():
            torch.nn.init.normal_(p, std=std)
    return model


def save_tiny_viewdiff(path: Path, n_views: int = 4, seed: int = 0) -> Path:
    return make_tiny_viewdiff(n_views, seed).save(path)


def smoke_overrides(tmp_path: Path) -> dict:
    """The guidance settings that make a ``toyworld-viewdiff`` guidance run on the tiny prior."""
    return {"pretrained": str(save_tiny_viewdiff(Path(tmp_path) / "tiny-toyworld-viewdiff.safetensors"))}


@pytest.fixture(scope="module")
def toyworld_viewdiff_weights(tmp_path_factory):
    """A tiny random toy ViewDiff saved as safetensors (trained group size 4)."""
    return save_tiny_viewdiff(tmp_path_factory.mktemp("vd") / "tiny-viewdiff.safetensors")
