"""stable-diffusion-prompt-processor on the tiny random Stable Diffusion of tests/guidance/tiny_sd.py."""

from __future__ import annotations

import gc
import runpy
import shutil
import time
import weakref
from pathlib import Path

import pytest
import torch

from lift3d.registry import find
from lift3d.utils.hub import MissingWeightsError

# tests/guidance is not on sys.path when this folder runs alone: load the factory by path.
_TINY = runpy.run_path(str(Path(__file__).resolve().parents[1] / "guidance" / "tiny_sd.py"))
NAME = "stable-diffusion-prompt-processor"


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> Path:
    return _TINY["make_tiny_sd"](tmp_path_factory.mktemp("tiny-sd") / "sd")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFT3D_CACHE", str(tmp_path / "cache"))


def processor(path, **over):
    cfg = {"prompt": "a red cube", "pretrained_model_name_or_path": str(path), **over}
    return find(NAME, "prompt-processor")(cfg, cfg_key="system.prompt_processor")


@pytest.fixture
def loads(monkeypatch):
    """Counts text-encoder loads and keeps a weak reference to each encoder loaded."""
    from transformers import CLIPTextModel

    seen: list[weakref.ref] = []
    original = CLIPTextModel.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        model = original(cls, *args, **kwargs)
        seen.append(weakref.ref(model))
        return model

    monkeypatch.setattr(CLIPTextModel, "from_pretrained", classmethod(counting))
    return seen


def direct(path, texts):
    """The text encoder's last hidden states, straight from transformers."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(path / "tokenizer")
    enc = CLIPTextModel.from_pretrained(path / "text_encoder")
    ids = tok(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return enc(ids).last_hidden_state


def test_embeddings_are_the_encoders_hidden_states_for_each_text(sd):
    u = processor(sd, negative_prompt="a blue cube")()
    assert u.text_embeddings.shape == (1, 77, 32) and u.text_embeddings.dtype == torch.float32
    assert u.view_dependent_prompting and u.text_embeddings_vd.shape == (4, 77, 32)
    want = direct(sd, ["a red cube", "a blue cube", u.prompts_vd[2], ""])
    torch.testing.assert_close(u.text_embeddings[0], want[0])
    torch.testing.assert_close(u.uncond_text_embeddings[0], want[1])
    torch.testing.assert_close(u.text_embeddings_vd[2], want[2])
    assert u.prompts_vd[2] != "a red cube"  # a view-specific wording
    torch.testing.assert_close(u.extras["null_text_embeddings"][0], want[3])  # "no text", for the guidance
    assert not torch.allclose(want[0], want[1])


def test_cached_embeddings_skip_the_encoder_and_the_encoder_is_freed(sd, loads, tmp_path, monkeypatch):
    p = processor(sd)
    first = p()
    assert len(loads) == 1  # one load for every text
    assert p._text_encoder is None
    gc.collect()
    assert loads[0]() is None, "the text encoder is still alive after encoding"
    assert list((tmp_path / "cache" / "text_embeddings").rglob("*.safetensors"))

    second = processor(sd)()  # a new run, same prompt and weights
    assert len(loads) == 1
    assert torch.equal(second.text_embeddings, first.text_embeddings)
    assert torch.equal(second.extras["null_text_embeddings"], first.extras["null_text_embeddings"])


def test_new_weights_in_the_same_folder_are_not_served_stale_embeddings(sd, loads, tmp_path):
    folder = tmp_path / "sd"
    shutil.copytree(sd, folder)
    before = processor(folder)()
    time.sleep(0.01)  # a later modification time, whatever the file system's resolution
    from transformers import CLIPTextModel

    enc = CLIPTextModel.from_pretrained(folder / "text_encoder")
    with torch.no_grad():
        enc.get_input_embeddings().weight.mul_(2)
    enc.save_pretrained(folder / "text_encoder")
    after = processor(folder)()
    assert len(loads) == 3  # first run, the edit above, and a fresh encode
    assert not torch.allclose(before.text_embeddings, after.text_embeddings)


def test_missing_weights_fail_fast_when_called_naming_key_id_and_command(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))

    p = find(NAME, "prompt-processor")({"prompt": "a red cube"}, cfg_key="system.prompt_processor")  # cheap
    with pytest.raises(MissingWeightsError) as info:
        p()
    msg = str(info.value)
    assert "system.prompt_processor.pretrained_model_name_or_path" in msg
    assert "stabilityai/stable-diffusion-2-1-base" in msg and "hf download stabilityai/stable-diffusion-2-1-base" in msg
    cls = find(NAME, "prompt-processor")
    assert cls.missing_weights(cls.Config()) == msg  # what a start-up check can ask, before any run


def test_missing_weights_is_none_for_a_folder_that_holds_them(sd):
    cls = find(NAME, "prompt-processor")
    assert cls.missing_weights(cls.Config(pretrained_model_name_or_path=str(sd))) is None
