"""Finding weights: a local folder or the Hugging Face cache, a clear error otherwise, never the network."""

from __future__ import annotations


import pytest

from lift3d.config import ConfigError
from lift3d.utils.hub import MissingWeightsError, resolve_weights

KEY = "system.guidance.pretrained_model_name_or_path"


def _fake_cache(cache, repo_id: str, files: dict[str, str], commit: str = "0" * 40) -> None:
    """The layout huggingface_hub writes: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, text in files.items():
        f = repo / "snapshots" / commit / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)


def test_a_local_folder_is_used_as_it_is(tmp_path):
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    (tmp_path / "sd" / "model_index.json").write_text("{}")
    got = resolve_weights(str(tmp_path / "sd"), key=KEY, required=["model_index.json", "unet"])
    assert got.path == (tmp_path / "sd").resolve() and got.source == "local folder"
    with pytest.raises(MissingWeightsError, match=r"lacks vae/config.json"):
        resolve_weights(str(tmp_path / "sd"), key=KEY, required=["model_index.json", "vae/config.json"])


def test_a_hub_id_resolves_from_the_cache_only(tmp_path, monkeypatch, no_network):
    cache = tmp_path / "hub"
    _fake_cache(cache, "owner/model", {"model_index.json": "{}", "unet/config.json": "{}"})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    got = resolve_weights("owner/model", key=KEY, required=["unet/config.json"])
    assert got.source == "Hugging Face cache" and (got.path / "unet" / "config.json").is_file()


def test_missing_weights_fail_fast_naming_key_id_folders_and_command(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingWeightsError) as ex:  # no_network: nothing to wait for, no retries
        resolve_weights("DeepFloyd/IF-I-XL-v1.0", key=KEY, gated_url="https://huggingface.co/DeepFloyd/IF-I-XL-v1.0")
    msg = str(ex.value)
    for part in (KEY, "'DeepFloyd/IF-I-XL-v1.0'", str(tmp_path / "empty"), "hf download DeepFloyd/IF-I-XL-v1.0",
                 "gated", "https://huggingface.co/DeepFloyd/IF-I-XL-v1.0"):
        assert part in msg, part
    assert isinstance(ex.value, ConfigError)  # launch prints it as one line, exit 2


@pytest.mark.parametrize("name", ["./weights/sd", "/no/such/folder", "a/b/c", ""])
def test_a_path_that_is_not_there_is_named_as_a_path(tmp_path, monkeypatch, name):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(MissingWeightsError, match="no such folder" if name else "is empty"):
        resolve_weights(name, key=KEY)
