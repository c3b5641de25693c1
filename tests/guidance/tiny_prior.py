"""A tiny random toy-world prior shared by the guidance tests (import the fixture by name)."""

from __future__ import annotations

import pytest
import torch

from lift3d.priors.toyworld.model import ToyWorldPrior
from lift3d.priors.toyworld.vocab import VOCAB

#: A toy-world prior small enough for unit tests (16x16, no attention).
TINY_PRIOR = {"vocab_size": len(VOCAB), "resolution": 16, "block_out_channels": [16, 32], "attention": False,
              "norm_num_groups": 8}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny random prior saved as safetensors (small normal weights: smooth, non-trivial outputs)."""
    torch.manual_seed(0)
    m = ToyWorldPrior(TINY_PRIOR)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return m.save(tmp_path_factory.mktemp("w") / "tiny.safetensors")
