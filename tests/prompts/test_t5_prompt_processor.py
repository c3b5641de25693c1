"""deepfloyd-prompt-processor on a tiny random IF folder: T5 states, the disk cache, the encoder freed."""

from __future__ import annotations

import gc
import shutil
import sys
import weakref
from pathlib import Path

import pytest
import torch

from lift3d.config import ConfigError
from lift3d.prompts.t5 import MAX_LENGTH, T5PromptProcessor
from lift3d.utils.hub import MissingWeightsError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "guidance"))
from tiny_if import TEXT_WIDTH, tiny_if  # noqa: E402, F401  (tiny_if: the fixture)

IF_ID = "DeepFloyd/IF-I-XL-v1.0"


def processor(folder, cache_dir=None, **over):
    cfg = {"prompt": "a red cube", "pretrained_model_name_or_path": str(folder), **over}
    cfg.update({"cache_dir": str(cache_dir)} if cache_dir else {"use_cache": False})
    return T5PromptProcessor(cfg)


def t5_states(folder, text):
    from transformers import T5EncoderModel, T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
    enc = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True).eval()
    batch = tok([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return enc(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state


def test_embeddings_are_the_t5_states_of_the_lowercased_prompt_padded_to_77(tiny_if):
    utils = processor(tiny_if, prompt="A Red Cube", negative_prompt=" Blue Ball ")()
    assert MAX_LENGTH == 77 and utils.text_embeddings.shape == (1, 77, TEXT_WIDTH)
    assert utils.text_embeddings.dtype == torch.float32
    torch.testing.assert_close(utils.text_embeddings, t5_states(tiny_if, "a red cube"))
    torch.testing.assert_close(utils.uncond_text_embeddings, t5_states(tiny_if, "blue ball"))  # stripped too
    torch.testing.assert_close(utils.extras["empty_text_embedding"], t5_states(tiny_if, ""))
    side = utils.direction_of("side")
    assert utils.prompts_vd[side] == "A Red Cube, side view"
    torch.testing.assert_close(utils.text_embeddings_vd[side:side + 1], t5_states(tiny_if, "a red cube, side view"))


def test_embeddings_are_cached_and_the_encoder_is_freed(tiny_if, tmp_path, monkeypatch):
    from transformers import T5EncoderModel

    loaded = []
    real = T5EncoderModel.from_pretrained.__func__

    def spy(cls, *a, **k):
        model = real(cls, *a, **k)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(T5EncoderModel, "from_pretrained", classmethod(spy))
    first = processor(tiny_if, tmp_path / "cache")
    utils = first()
    gc.collect()
    assert len(loaded) == 1 and loaded[0]() is None, "the encoder outlived the encoding"
    assert first._encoder is None and first._tokenizer is None
    # prompt, "" and 4 view variants of each: one file per distinct text
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 6

    def refuse(cls, *a, **k):
        raise AssertionError("the encoder was loaded although every text was cached")

    monkeypatch.setattr(T5EncoderModel, "from_pretrained", classmethod(refuse))
    again = processor(tiny_if, tmp_path / "cache")()
    for name in ("text_embeddings", "uncond_text_embeddings", "text_embeddings_vd", "uncond_text_embeddings_vd"):
        torch.testing.assert_close(getattr(again, name), getattr(utils, name))
    torch.testing.assert_close(again.extras["empty_text_embedding"], utils.extras["empty_text_embedding"])


def test_the_cache_key_tells_encoder_precisions_apart(tiny_if):
    fp32 = processor(tiny_if, device="cpu", half_precision_weights=False)
    half = processor(tiny_if, device="cpu", half_precision_weights=True)
    assert fp32.encoder_id() != half.encoder_id()
    assert str(tiny_if.resolve()) in fp32.encoder_id()
    a, b = fp32(), half()  # the half encoder runs in bfloat16 on a CPU; both are stored as float32
    assert b.text_embeddings.dtype == torch.float32
    torch.testing.assert_close(b.text_embeddings, a.text_embeddings, rtol=0.05, atol=0.05)


def test_a_sentencepiece_tokenizer_without_the_package_says_what_to_install(tiny_if, tmp_path):
    pytest.importorskip("transformers")
    import importlib.util

    if importlib.util.find_spec("sentencepiece") is not None:
        pytest.skip("sentencepiece is installed: the real IF tokenizer loads")
    spm = tmp_path / "if-spm"
    shutil.copytree(tiny_if, spm)
    (spm / "tokenizer" / "tokenizer.json").unlink()
    (spm / "tokenizer" / "spiece.model").write_bytes(b"\x00")
    with pytest.raises(ConfigError, match="pip install sentencepiece"):
        processor(spm)()


def test_missing_weights_fail_fast_naming_key_id_command_and_licence(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("LIFT3D_CACHE", str(tmp_path / "lift3d-cache"))
    monkeypatch.chdir(tmp_path)
    proc = T5PromptProcessor({"prompt": "a red cube"}, cfg_key="system.prompt_processor")  # cheap: nothing loads
    with pytest.raises(MissingWeightsError) as ex:
        proc()
    msg = str(ex.value)
    for part in ("system.prompt_processor.pretrained_model_name_or_path", f"'{IF_ID}'", f"hf download {IF_ID}",
                 "gated", f"https://huggingface.co/{IF_ID}"):
        assert part in msg, part
    assert T5PromptProcessor.missing_weights(T5PromptProcessor.Config()) == msg  # the same check, nothing loaded
