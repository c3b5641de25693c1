"""Offline, with an empty Hugging Face home, every real-weight recipe stops at start-up in one line
naming the model id and the command that fetches it, and writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from lift3d.launch import main

REPO = Path(__file__).resolve().parents[2]
FLAGSHIPS = sorted((REPO / "configs").glob("*.yaml"))
#: Recipes whose weights are released outside the Hugging Face hub: their message names the release instead.
OFF_HUB = {"syncdreamer.yaml": "drive.google.com"}


def test_there_are_flagship_recipes():
    assert FLAGSHIPS, "configs/*.yaml is empty"


@pytest.mark.parametrize("config", FLAGSHIPS, ids=[c.name for c in FLAGSHIPS])
def test_missing_weights_stop_the_recipe_at_start_up(config, tmp_path, monkeypatch, capsys, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as ex:
        main(["--config", str(config), "--train", f"exp_root_dir={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert ex.value.code == 2 and len(err) == 1, err
    msg = err[0]
    assert "the weights are not on this machine" in msg
    if config.name in OFF_HUB:
        assert OFF_HUB[config.name] in msg  # where the authors release them
    else:
        assert "hf download " in msg
        assert str(tmp_path / "empty-hf-home" / "hub") in msg  # the folder that was searched
    assert "=/path/to/folder on the command line" in msg  # the recipe's top-level model key
    assert not out.exists()
