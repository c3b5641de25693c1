"""What the tests of guidances on real-weight priors share about weights that are not there: an
empty Hugging Face cache with the network refused, and the error a guidance built there raises."""

from __future__ import annotations

import pytest

from lift3d.registry import find
from lift3d.utils.hub import MissingWeightsError


@pytest.fixture
def empty_hub(tmp_path, monkeypatch, no_network):
    """An empty Hugging Face cache; any connection attempt fails the test."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))


def build_error(name: str) -> str:
    """The MissingWeightsError message of building guidance ``name`` with its default config, after
    checking that the start-up check (``missing_weights``, which loads nothing) says the same."""
    cls = find(name, "guidance")
    with pytest.raises(MissingWeightsError) as info:
        cls({})
    msg = str(info.value)
    assert cls.missing_weights(cls.Config()) == msg
    return msg
