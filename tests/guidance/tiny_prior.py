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


def toy_input(rgb, prompt="a red cube", negative_prompt="", elevation=None, azimuth=None, camera_distances=None,
              normal=None, opacity=None):
    """A GuidanceInput for toy-world guidances: the prompt through the toy-world prompt processor."""
    from lift3d.guidance.base import CameraBatch, GuidanceInput
    from lift3d.prompts.toyworld import ToyWorldPromptProcessor

    prompt_utils = ToyWorldPromptProcessor({"prompt": prompt, "negative_prompt": negative_prompt,
                                            "allow_empty_prompt": not prompt})()
    cameras = CameraBatch.from_angles(elevation, azimuth, camera_distances)
    return GuidanceInput(cameras=cameras, rgb=rgb, normal=normal, opacity=opacity, prompt=prompt_utils)


def call(guidance, rgb, prompt="a red cube", *, t=None, noise=None, **kw):
    """``guidance`` on ``rgb`` seen by the cameras in ``kw`` (elevation, azimuth, camera_distances)."""
    return guidance(toy_input(rgb, prompt, **kw), t=t, noise=noise)
