"""The prompt processor's encoding: each distinct text once, the disk cache, memoisation."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lift3d.prompts.base import BasePromptProcessor
from lift3d.prompts.cache import EmbeddingCache, default_text_embedding_dir, user_cache_root
from lift3d.registry import register

ENCODED: Counter = Counter()  # text -> how many times the fake encoder saw it
CALLS: list[list[str]] = []  # each encode() batch


def fake_embedding(text: str) -> torch.Tensor:
    digest = hashlib.sha256(text.encode()).digest()
    return torch.tensor(list(digest[:6]), dtype=torch.float32).view(2, 3) / 255


@register("test-counting-prompt-processor")
class CountingPromptProcessor(BasePromptProcessor):
    """A fake text encoder that records what it encodes."""

    @dataclass
    class Config(BasePromptProcessor.Config):
        encoder: str = "fake-encoder-v1"
        """Stands for the model id; part of the cache key."""
        rows: int = -1
        """Rows to return from encode (-1: one per text); anything else is a broken encoder."""

    def encoder_id(self) -> str:
        return self.cfg.encoder

    def encode(self, texts: list[str]) -> torch.Tensor:
        CALLS.append(list(texts))
        ENCODED.update(texts)
        out = torch.stack([fake_embedding(t) for t in texts])
        return out if self.cfg.rows < 0 else out[: self.cfg.rows]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    ENCODED.clear()
    CALLS.clear()
    monkeypatch.setenv("LIFT3D_CACHE", str(tmp_path / "user-cache"))


def make(cache: Path | None, **cfg) -> CountingPromptProcessor:
    base = {"prompt": "a hamburger", "negative_prompt": "blurry"}
    if cache is not None:
        base["cache_dir"] = str(cache)
    return CountingPromptProcessor({**base, **cfg})


ALL_TEXTS = {"a hamburger", "blurry", "a hamburger, side view", "a hamburger, front view",
             "a hamburger, back view", "a hamburger, overhead view"}


def cache_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_each_distinct_text_is_encoded_once_across_instances(tmp_path):
    cache = tmp_path / "cache"
    a = make(cache)
    assert not ENCODED  # constructing encodes nothing
    ua = a()
    assert set(ENCODED) == ALL_TEXTS and all(n == 1 for n in ENCODED.values())
    assert len(CALLS) == 1  # one batch
    assert a() is ua  # memoised
    ub = make(cache)()
    assert all(n == 1 for n in ENCODED.values()) and len(CALLS) == 1  # all from disk
    for name in ("text_embeddings", "uncond_text_embeddings", "text_embeddings_vd", "uncond_text_embeddings_vd"):
        torch.testing.assert_close(getattr(ua, name), getattr(ub, name), rtol=0, atol=0)
    assert ua.text_embeddings.shape == (1, 2, 3) and ua.text_embeddings_vd.shape == (4, 2, 3)
    torch.testing.assert_close(ua.text_embeddings[0], fake_embedding("a hamburger"))
    torch.testing.assert_close(ua.uncond_text_embeddings[0], fake_embedding("blurry"))
    names = [d.name for d in ua.directions]
    torch.testing.assert_close(ua.text_embeddings_vd[names.index("back")], fake_embedding("a hamburger, back view"))
    # the negative prompt is the same for every direction
    assert (ua.uncond_text_embeddings_vd == ua.uncond_text_embeddings).all()


def test_only_missing_texts_are_encoded(tmp_path):
    cache = tmp_path / "cache"
    make(cache)()
    make(cache, negative_prompt="ugly")()
    assert ENCODED["ugly"] == 1 and CALLS[-1] == ["ugly"]


def test_cache_key_includes_the_encoder(tmp_path):
    cache = tmp_path / "cache"
    make(cache)()
    make(cache, encoder="fake-encoder-v2")()
    assert all(n == 2 for n in ENCODED.values())
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2


def test_files_are_written_atomically_and_carry_the_text(tmp_path):
    from safetensors import safe_open

    cache = tmp_path / "cache"
    p = make(cache)
    p()
    files = cache_files(cache)
    assert len(files) == len(ALL_TEXTS)
    assert all(f.suffix == ".safetensors" and not f.name.startswith(".") for f in files)  # no temp files left
    texts = set()
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata()
            texts.add(meta["text"])
            assert meta["encoder_id"] == "fake-encoder-v1"
    assert texts == ALL_TEXTS
    assert p.cache().path("blurry").parent == cache / hashlib.sha256(b"fake-encoder-v1").hexdigest()


def test_the_text_is_verified_on_read(tmp_path):
    cache = tmp_path / "cache"
    p = make(cache)
    p()
    store = p.cache()
    # a file holding another text's embedding under this text's name is not trusted
    os.replace(store.path("a hamburger, back view"), store.path("a hamburger"))
    assert store.load("a hamburger") is None
    u = make(cache)()
    assert ENCODED["a hamburger"] == 2 and ENCODED["a hamburger, back view"] == 2
    torch.testing.assert_close(u.text_embeddings[0], fake_embedding("a hamburger"))
    torch.testing.assert_close(store.load("a hamburger"), fake_embedding("a hamburger"))  # repaired


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_corrupt_file_is_recomputed(tmp_path, damage, caplog):
    cache = tmp_path / "cache"
    p = make(cache)
    p()
    path = p.cache().path("blurry")
    data = path.read_bytes()
    path.write_bytes({"garbage": b"\x00not safetensors at all" * 3, "truncated": data[: len(data) // 2],
                      "empty": b""}[damage])
    with caplog.at_level(logging.WARNING, logger="lift3d.prompts.cache"):
        u = make(cache)()
    assert ENCODED["blurry"] == 2 and ENCODED["a hamburger"] == 1
    torch.testing.assert_close(u.uncond_text_embeddings[0], fake_embedding("blurry"))
    assert "recomputing" in caplog.text
    torch.testing.assert_close(p.cache().load("blurry"), fake_embedding("blurry"))


def test_concurrent_writers_leave_a_valid_file(tmp_path):
    store = EmbeddingCache(tmp_path / "cache", "fake-encoder-v1")
    text = "a hamburger"
    value = fake_embedding(text)
    n_threads, rounds = 6, 15
    start = threading.Barrier(n_threads + 1)
    bad: list[str] = []
    assert store.save(text, value)  # from here on, a reader must always find a whole file

    def writer() -> None:
        start.wait()
        for _ in range(rounds):
            if not store.save(text, value):
                bad.append("save failed")

    def reader() -> None:
        start.wait()
        for _ in range(rounds * 4):
            got = store.load(text)
            if got is None or not torch.equal(got, value):
                bad.append("read a missing, partial or wrong file")

    threads = [threading.Thread(target=writer) for _ in range(n_threads - 1)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    start.wait()
    for t in threads:
        t.join()
    assert not bad
    assert torch.equal(store.load(text), value)
    assert [f.name for f in cache_files(tmp_path / "cache")] == [store.path(text).name]


def test_a_write_that_fails_midway_keeps_the_old_file(tmp_path, monkeypatch):
    """Atomicity: a writer that dies half-way through must not damage what readers see."""
    import safetensors.torch

    store = EmbeddingCache(tmp_path / "cache", "fake-encoder-v1")
    assert store.save("a hamburger", torch.ones(3))

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x01\x02")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    assert store.save("a hamburger", torch.zeros(3)) is False
    assert torch.equal(store.load("a hamburger"), torch.ones(3))
    assert len(cache_files(tmp_path / "cache")) == 1  # the temporary file is gone


def test_use_cache_false_writes_nothing(tmp_path):
    cache = tmp_path / "cache"
    make(cache, use_cache=False)()
    make(cache, use_cache=False)()
    assert not cache.exists()
    assert all(n == 2 for n in ENCODED.values())


def test_an_unwritable_cache_only_costs_the_caching(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING, logger="lift3d.prompts.cache"):
        u = make(blocker)()
    torch.testing.assert_close(u.text_embeddings[0], fake_embedding("a hamburger"))
    assert "continuing without it" in caplog.text


def test_default_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFT3D_CACHE", str(tmp_path / "mine"))
    assert default_text_embedding_dir() == tmp_path / "mine" / "text_embeddings"
    monkeypatch.delenv("LIFT3D_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_root() == tmp_path / "xdg" / "lift3d"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_text_embedding_dir() == tmp_path / "home" / ".cache" / "lift3d" / "text_embeddings"


def test_default_cache_dir_is_used_without_cache_dir(tmp_path):
    make(None)()
    assert len(cache_files(tmp_path / "user-cache" / "text_embeddings")) == len(ALL_TEXTS)


def test_a_broken_encoder_is_reported(tmp_path):
    with pytest.raises(TypeError, match="one row per text"):
        make(tmp_path / "cache", rows=1)()


def test_an_empty_prompt_fails_at_call_not_construction(tmp_path):
    from lift3d.config import ConfigError

    p = make(tmp_path / "cache", prompt="")
    with pytest.raises(ConfigError, match="needs a prompt"):
        p()
    assert not ENCODED


def test_an_empty_prompt_may_be_allowed_and_encodes_the_empty_text(tmp_path):
    p = make(tmp_path / "cache", prompt="", allow_empty_prompt=True)
    utils = p()
    assert utils.prompt == "" and "" in ENCODED and utils.text_embeddings is not None
