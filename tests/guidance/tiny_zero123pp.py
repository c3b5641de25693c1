"""A tiny random Zero123++ in the published diffusers folder layout, for tests.

``make_tiny_zero123pp(folder)`` writes, at toy size, what ``hf download sudo-ai/zero123plus-v1.2``
holds: ``model_index.json`` (with the 77 ``ramping_coefficients``), ``unet/`` (4 latent channels,
self- and cross-attention, SD2-style linear projections), ``vae/``, ``text_encoder/`` + ``tokenizer/``
(tiny_sd's toy CLIP vocabulary), ``vision_encoder/`` (CLIPVisionModelWithProjection),
``feature_extractor_clip/`` and ``feature_extractor_vae/`` (CLIPImageProcessor configs) and
``scheduler/`` (Euler ancestral, v-prediction, a linear beta schedule). Shapes: a view is
``VIEW_SIZE`` = 16 pixels, 8x8 latents (the VAE halves once), so the 3x2 grid is 24x16 latents;
text and image embeddings are 32 wide. Seeded: the same arguments give the same weights.
:func:`smoke_overrides` is the config smoke test's factory for the ``zero123pp`` prior family.
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch

# tiny_sd.py holds the toy CLIP vocabulary; loaded by path so this file also works through runpy.
_SD = runpy.run_path(str(Path(__file__).with_name("tiny_sd.py")))
clip_vocab, MERGES, MAX_TOKENS = _SD["clip_vocab"], _SD["MERGES"], _SD["MAX_TOKENS"]

VIEW_SIZE, VAE_FACTOR, EMBED_DIM, CLIP_SIZE = 16, 2, 32, 14


def _randomise_zeros(*nets: torch.nn.Module) -> None:
    """diffusers zero-initialises some output layers; random values make every weight matter."""
    with torch.no_grad():
        for net in nets:
            for p in net.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0.0, 0.2)


def make_tiny_zero123pp(folder: str | Path, seed: int = 0, drop: tuple[str, ...] = ()) -> Path:
    """Write the tiny model to ``folder`` (created); ``drop`` leaves out those files or folders (tests of
    the loader's refusal)."""
    import shutil

    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=VIEW_SIZE // VAE_FACTOR, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=4, attention_head_dim=4, cross_attention_dim=EMBED_DIM,
        use_linear_projection=True, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=VIEW_SIZE, scaling_factor=0.18215)
    vocab = clip_vocab()
    eos = vocab["<|endoftext|>"]
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=EMBED_DIM, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=eos, pad_token_id=eos))
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, image_size=CLIP_SIZE,
        patch_size=7, projection_dim=EMBED_DIM))
    _randomise_zeros(unet, vae, text, vision)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    vision.save_pretrained(folder / "vision_encoder")
    EulerAncestralDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                    beta_schedule="linear", prediction_type="v_prediction",
                                    steps_offset=1).save_pretrained(folder / "scheduler")
    tok = folder / "tokenizer"
    tok.mkdir(exist_ok=True)
    (tok / "vocab.json").write_text(json.dumps(vocab))
    (tok / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    (tok / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_TOKENS, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    for name, size, mean, std in (("feature_extractor_vae", VIEW_SIZE, [0.5] * 3, [0.5] * 3),
                                  ("feature_extractor_clip", CLIP_SIZE, [0.48145466, 0.4578275, 0.40821073],
                                   [0.26862954, 0.26130258, 0.27577711])):
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "preprocessor_config.json").write_text(json.dumps({
            "crop_size": {"height": size, "width": size}, "do_center_crop": True, "do_normalize": True,
            "do_resize": True, "do_rescale": True, "image_mean": mean, "image_std": std, "resample": 3,
            "rescale_factor": 1 / 255, "size": {"shortest_edge": size},
            "image_processor_type": "CLIPImageProcessor"}))
    g = torch.Generator().manual_seed(seed + 1)
    ramp = [0.0] + torch.rand(MAX_TOKENS - 1, generator=g).tolist()
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "Zero123PlusPipeline", "_diffusers_version": "0.20.2",
        "feature_extractor_clip": ["transformers", "CLIPImageProcessor"],
        "feature_extractor_vae": ["transformers", "CLIPImageProcessor"],
        "ramping_coefficients": ramp, "safety_checker": [None, None],
        "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "vision_encoder": ["transformers", "CLIPVisionModelWithProjection"]}, indent=2))
    for d in drop:
        p = folder / d
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return folder


def smoke_overrides(tmp_path: Path) -> dict:
    """Guidance config overrides that put a recipe on the tiny model (the config smoke test's factory)."""
    folder = tmp_path / "tiny-zero123pp"
    if not (folder / "model_index.json").is_file():
        make_tiny_zero123pp(folder)
    return {"pretrained_model_name_or_path": str(folder), "view_size": VIEW_SIZE, "num_inference_steps": 2}


@pytest.fixture(scope="session")
def tiny_zero123pp(tmp_path_factory) -> Path:
    """A tiny Zero123++ folder."""
    return make_tiny_zero123pp(tmp_path_factory.mktemp("tiny-zero123pp") / "zp")


def views_folder_for(cameras: list, folder: str | Path, seed: int = 0) -> Path:
    """A views folder (random RGBA images, 16 px) whose views are at the cameras of the given CameraBatch
    objects, one view per camera: for suites that score renders at cameras of their own choosing."""
    from lift3d.priors.zero123pp.views import write_views

    keys = ("elevation", "azimuth", "distance", "fovy")
    cams = {k: torch.cat([getattr(c, k).float().cpu() for c in cameras]) for k in keys}
    n = len(cams["elevation"])
    views = torch.rand(n, 4, VIEW_SIZE, VIEW_SIZE, generator=torch.Generator().manual_seed(seed))
    views[:, 3] = (views[:, 3] > 0.5).float()
    return write_views(folder, views, cams)
