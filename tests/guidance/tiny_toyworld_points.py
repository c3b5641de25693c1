"""A tiny random toy point-cloud prior for tests (the ``toyworld-points`` family's ``get_dummy_components``).

Clouds of 32 points, a transformer of width 16 with one block, an 8-value condition. Seeded, with
small normal weights everywhere (a fresh model's zero output layer would predict no noise at all).
Loaded by path through runpy by the smoke test, so it imports nothing from the tests.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: The tiny architecture (a ToyPointConfig without vocab_size).
TINY_POINTS = {"n_ctx": 32, "width": 16, "layers": 1, "heads": 2, "cond_dim": 8}


def make_tiny_points(seed: int = 0, std: float = 0.05):
    """A seeded tiny :class:`~lift3d.priors.toyworld.points.ToyPointPrior`."""
    from lift3d.priors.toyworld.points import ToyPointPrior
    from lift3d.priors.toyworld.vocab import VOCAB

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ToyPointPrior({"vocab_size": len(VOCAB), **TINY_POINTS})
        for p in model.parameters():
            torch.nn.init.normal_(p, std=std)
    return model


def smoke_overrides(tmp_path: Path) -> dict:
    """The guidance settings that make a ``toyworld-points`` guidance run on the tiny model."""
    return {"pretrained": str(make_tiny_points().save(Path(tmp_path) / "tiny-toyworld-points.safetensors"))}


try:  # the fixture, for the guidance suites (pytest is absent when the smoke test's runpy loads this file alone)
    import pytest

    @pytest.fixture(scope="module")
    def toyworld_points_weights(tmp_path_factory):
        """A tiny random toy point prior saved as safetensors."""
        return make_tiny_points().save(tmp_path_factory.mktemp("points") / "tiny-points.safetensors")
except ImportError:  # pragma: no cover
    pass
