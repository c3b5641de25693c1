"""A tiny random DeepFloyd IF folder (UNet, T5 encoder, tokenizer, scheduler) for tests, built offline.

In the spirit of diffusers' ``get_dummy_components`` for IF: a UNet with IF's block types (3
channels in, 6 out: epsilon and learned variance; T5 states projected through ``encoder_hid_dim``;
a text embedding added to the time embedding), a one-layer T5 encoder, and IF's DDPM schedule
(squared cosine, ``learned_range``), saved in the diffusers IF layout with ``model_index.json`` and
loaded by path like the real model. No sentencepiece model can be downloaded here, so the
tokenizer is a ``T5TokenizerFast`` over a small Unigram vocabulary (letters and a few words), saved
as ``tokenizer.json``.

Use the ``tiny_if`` fixture (a folder per test module), :func:`tiny_if_folder` (one per process, for
suites that cannot take a fixture), or :func:`tiny_if_prior` (the smoke test's factory).
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

#: Width of the tiny T5's states (IF-I-XL: 4096) and of the UNet's cross-attention (IF-I-XL: 4096).
TEXT_WIDTH = 16
CROSS_ATTENTION_DIM = 32
#: The tiny UNet's working size (IF-I: 64).
SAMPLE_SIZE = 8

_WORDS = ["a", "an", "the", "of", "red", "blue", "cube", "ball", "hamburger", "delicious", "front", "side", "back",
          "overhead", "view", "photo", "dslr"]


def _tokenizer() -> Any:
    from transformers import T5TokenizerFast

    # T5's layout: <pad>=0, </s>=1, <unk>=2; single letters keep every lower-case prompt encodable.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -6.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.-'"]
    vocab += [("\u2581" + w, -3.0) for w in _WORDS]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def build_tiny_if(folder: str | Path, *, sample_size: int = SAMPLE_SIZE, seed: int = 0) -> Path:
    """Write a tiny random IF stage-I folder to ``folder`` (kept if it is already complete); returns it."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream stays as it was
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn",
            up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
            cross_attention_dim=CROSS_ATTENTION_DIM, encoder_hid_dim=TEXT_WIDTH, attention_head_dim=8,
            addition_embed_type="text", addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
            resnet_time_scale_shift="scale_shift", act_fn="gelu", norm_num_groups=4)
        tokenizer = _tokenizer()
        encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=TEXT_WIDTH, d_kv=4, d_ff=32, num_layers=1,
                                          num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001,
                              beta_end=0.02, thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.0,
                              prediction_type="epsilon", variance_type="learned_range")
    unet.save_pretrained(tmp / "unet")
    encoder.save_pretrained(tmp / "text_encoder")
    tokenizer.save_pretrained(tmp / "tokenizer")
    scheduler.save_pretrained(tmp / "scheduler")
    (tmp / "model_index.json").write_text(json.dumps({
        "_class_name": "IFPipeline", "_diffusers_version": "0.42.0", "requires_safety_checker": False,
        "feature_extractor": [None, None], "safety_checker": [None, None], "watermarker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"], "unet": ["diffusers", "UNet2DConditionModel"]}, indent=2))
    tmp.rename(folder)
    return folder


_PROCESS_FOLDER: list[Path] = []


def tiny_if_folder() -> Path:
    """One tiny IF folder per process, in a temporary folder removed at exit."""
    if not _PROCESS_FOLDER:
        root = Path(tempfile.mkdtemp(prefix="lift3d-tiny-if-"))
        atexit.register(shutil.rmtree, root, True)
        _PROCESS_FOLDER.append(build_tiny_if(root / "tiny-if"))
    return _PROCESS_FOLDER[0]


def tiny_if_prior(tmp_path: Path) -> dict:
    """The smoke test's factory: config overrides that point an IF guidance at a tiny IF folder."""
    return {"pretrained_model_name_or_path": str(build_tiny_if(Path(tmp_path) / "tiny-if"))}


def tiny_if_prompt_utils(prompt: str = "a red cube", folder: str | Path | None = None, **cfg: Any) -> Any:
    """The PromptUtils of ``prompt`` from the tiny folder's T5 (no disk cache unless ``cfg`` asks)."""
    from lift3d.prompts.t5 import T5PromptProcessor

    folder = tiny_if_folder() if folder is None else folder
    conf = {"prompt": prompt, "pretrained_model_name_or_path": str(folder), "use_cache": False, **cfg}
    return T5PromptProcessor(conf)()


@pytest.fixture(scope="module")
def tiny_if(tmp_path_factory) -> Path:
    """A tiny random IF folder for the tests of one module."""
    return build_tiny_if(tmp_path_factory.mktemp("if") / "tiny-if")
