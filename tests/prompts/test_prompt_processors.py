"""The registered processors: toy-world token ids and the plain (text-only) processor."""

from __future__ import annotations

import pytest
import torch

from lift3d.config import ConfigError
from lift3d.priors.toyworld.vocab import MAX_TOKENS, UnknownPromptError, pad_tokens, tokenize
from lift3d.prompts.base import NoTextEmbeddingsError, PromptUtils
from lift3d.registry import find


@pytest.fixture(autouse=True)
def _no_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFT3D_CACHE", str(tmp_path / "user-cache"))


def toy(**cfg):
    return find("toyworld-prompt-processor", "prompt-processor")(cfg, cfg_key="system.prompt_processor")


@pytest.mark.parametrize("prompt", ["a red cube", "an orange cube", "A  Blue   torus", "a snowman", "a mug"])
def test_toy_tokens_match_the_vocab(prompt):
    u = toy(prompt=prompt)()
    assert u.text_embeddings.dtype == torch.long
    assert torch.equal(u.text_embeddings, pad_tokens([tokenize(prompt)]))
    assert u.text_embeddings.shape == (1, MAX_TOKENS)


def test_toy_empty_negative_is_all_padding_and_a_negative_is_tokenised():
    u = toy(prompt="a red cube")()
    assert torch.equal(u.uncond_text_embeddings, torch.zeros(1, MAX_TOKENS, dtype=torch.long))
    n = toy(prompt="a red cube", negative_prompt="a blue cube")()
    assert torch.equal(n.uncond_text_embeddings, pad_tokens([tokenize("a blue cube")]))


def test_toy_rows_per_camera_are_the_plain_prompt():
    u = toy(prompt="a green cone")()
    assert not u.view_dependent_prompting and not u.use_perp_neg
    cond, uncond = u.get_text_embeddings(torch.tensor([0.0, 80.0, 10.0]), torch.tensor([0.0, 0.0, 180.0]),
                                         torch.full((3,), 2.0))
    assert torch.equal(cond, pad_tokens([tokenize("a green cone")] * 3))
    assert torch.equal(uncond, torch.zeros(3, MAX_TOKENS, dtype=torch.long))


@pytest.mark.parametrize("key", ["prompt", "negative_prompt"])
def test_toy_unknown_words_fail_at_construction_naming_the_key(key):
    cfg = {"prompt": "a red cube", key: "a hamburger"}
    with pytest.raises(UnknownPromptError) as info:
        toy(**cfg)
    msg = str(info.value)
    assert f"'system.prompt_processor.{key}'" in msg and "'hamburger'" in msg and "cube" in msg  # lists the vocab
    assert isinstance(info.value, ConfigError)  # the launcher reports it like any config error


def test_toy_rejects_view_dependent_prompting():
    with pytest.raises(ConfigError, match="view_dependent_prompting"):
        toy(prompt="a red cube", view_dependent_prompting=True)


def test_toy_needs_a_prompt_only_when_called():
    p = toy()  # building it for --export/--test must not need a prompt
    with pytest.raises(ConfigError, match="needs a prompt"):
        p()


def test_toy_writes_no_cache_by_default(tmp_path):
    toy(prompt="a red cube")()
    assert not (tmp_path / "user-cache").exists()


def test_plain_processor_carries_texts_and_explains_missing_embeddings():
    u = find("plain-prompt-processor", "prompt-processor")({"prompt": "a hamburger", "negative_prompt": "blurry"})()
    assert (u.prompt, u.negative_prompt) == ("a hamburger", "blurry")
    assert u.text_embeddings is None and u.text_embeddings_vd is None and not u.has_embeddings
    cams = (torch.zeros(2), torch.zeros(2), torch.ones(2))
    for getter in (u.get_text_embeddings, u.get_text_embeddings_perp_neg):
        with pytest.raises(NoTextEmbeddingsError) as info:
            getter(*cams)
        msg = str(info.value)
        assert "plain-prompt-processor" in msg and "prompt_processor_type" in msg
        assert "toyworld-prompt-processor" in msg  # names a processor that would work
    # bucket lookup needs no embeddings
    assert u.direction_index(torch.tensor([0.0]), torch.tensor([180.0])).tolist() == [u.direction_of("back")]


def test_hand_built_prompt_utils_stay_text_only():
    u = PromptUtils("a red cube", negative_prompt="a blue cube")
    assert u.prompt == "a red cube" and not u.has_embeddings
    with pytest.raises(NoTextEmbeddingsError, match="no text encoder"):
        u.get_text_embeddings(torch.zeros(1), torch.zeros(1), None)


def test_bad_thresholds_are_config_errors():
    plain = find("plain-prompt-processor")
    with pytest.raises(ConfigError, match="front_threshold"):
        plain({"front_threshold": 0})
    with pytest.raises(ConfigError, match="overhead_threshold"):
        plain({"overhead_threshold": 100})
    with pytest.raises(ConfigError, match="unknown config key"):
        plain({"promt": "typo"})
