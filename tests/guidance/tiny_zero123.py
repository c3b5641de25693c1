"""A tiny random Zero123 saved in both published formats, for tests.

``make_tiny_zero123(folder)`` writes, at toy size, what ``hf download bennyguo/zero123-xl-diffusers``
would hold (``unet/`` with 8 input channels, ``vae/``, ``image_encoder/`` (CLIPVisionModelWithProjection),
``feature_extractor/``, ``clip_camera_projection/`` (the 20 -> 16 camera projection as ``proj.*``),
``scheduler/``, ``model_index.json``) and, beside it, the same weights in the original ldm layout
as ``tiny_zero123.ckpt`` and ``stable_zero123.ckpt`` (a Lightning-style ``{"state_dict": ...}``,
the UNet also under ``model_ema.*``), written with lift3d's inverse key map. Its shapes: latents
8x8 with 4 channels, the VAE halves the size once (working resolution 16), CLIP takes 14x14
pixels and embeds to 16 = the UNet's cross-attention width. Seeded: the same arguments give the
same weights.

The UNet mirrors the released one's pattern (cross-attention in all levels but the lowest, two
layers per block) and the VAE has two layers per block, so the key map's block arithmetic is
exercised as on the real model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

#: The tiny model's shape: latent size, pixels per latent, CLIP embedding width, CLIP input size.
LATENT_SIZE, VAE_FACTOR, EMBED_DIM, CLIP_SIZE = 8, 2, 16, 14
RESOLUTION = LATENT_SIZE * VAE_FACTOR
CKPT = "tiny_zero123.ckpt"
STABLE_CKPT = "stable_zero123.ckpt"


def tiny_networks(seed: int = 0) -> dict:
    """The four networks and the scheduler, random and seeded."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from lift3d.priors.zero123 import CameraProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=8, out_channels=4, block_out_channels=(8, 16, 16), layers_per_block=2,
        norm_num_groups=4, attention_head_dim=2, cross_attention_dim=EMBED_DIM,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=RESOLUTION, scaling_factor=0.18215)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, image_size=CLIP_SIZE,
        patch_size=7, projection_dim=EMBED_DIM, hidden_act="quick_gelu"))
    projection = CameraProjection(EMBED_DIM + 4, EMBED_DIM)
    # Random weights everywhere (diffusers zero-initialises some output layers): every entry of the
    # key map then carries information, and a misplaced tensor changes the outputs.
    for net in (unet, vae, clip, projection):
        with torch.no_grad():
            for p in net.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0.0, 0.2)
    # Zero123's schedule (Stable Diffusion's), as its diffusers conversions ship it.
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return {"unet": unet.eval(), "vae": vae.eval(), "image_encoder": clip.eval(), "projection": projection.eval(),
            "scheduler": scheduler}


def save_diffusers(nets: dict, folder: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    nets["unet"].save_pretrained(folder / "unet")
    nets["vae"].save_pretrained(folder / "vae")
    nets["image_encoder"].save_pretrained(folder / "image_encoder")
    nets["scheduler"].save_pretrained(folder / "scheduler")
    proj = folder / "clip_camera_projection"
    proj.mkdir(exist_ok=True)
    (proj / "config.json").write_text(json.dumps(
        {"_class_name": "CLIPCameraProjection", "embedding_dim": EMBED_DIM, "additional_embeddings": 4}))
    save_file({k: v.contiguous() for k, v in nets["projection"].state_dict().items()},
              str(proj / "diffusion_pytorch_model.safetensors"))
    fe = folder / "feature_extractor"
    fe.mkdir(exist_ok=True)
    (fe / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": CLIP_SIZE, "width": CLIP_SIZE}, "do_center_crop": True, "do_normalize": True,
        "do_resize": True, "image_processor_type": "CLIPImageProcessor", "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "size": {"shortest_edge": CLIP_SIZE}}))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "Zero123Pipeline", "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDIMScheduler"],
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "clip_camera_projection": ["zero123", "CLIPCameraProjection"], "safety_checker": [None, None]}, indent=2))
    return folder


def original_checkpoint(nets: dict, ema: bool = True) -> dict:
    """The networks' weights in the original layout, as ``{"state_dict": ..., "global_step": ...}``."""
    from lift3d.priors.zero123 import original_state_dict

    state = original_state_dict(nets["unet"], nets["vae"], nets["image_encoder"], nets["projection"],
                                nets["scheduler"].alphas_cumprod, ema=ema)
    if ema:
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(105000, dtype=torch.int32)
    state["betas"] = nets["scheduler"].betas.clone()
    state["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)  # a text-tower entry, skipped on load
    return {"state_dict": state, "global_step": 105000}


def make_tiny_zero123(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny model to ``folder`` (created) in both layouts; returns it."""
    folder = Path(folder)
    nets = tiny_networks(seed)
    save_diffusers(nets, folder)
    ckpt = original_checkpoint(nets)
    torch.save(ckpt, folder / CKPT)
    torch.save(ckpt, folder / STABLE_CKPT)
    return folder


def smoke_overrides(tmp_path: Path) -> dict:
    """Guidance config overrides that put a recipe on the tiny model (the config smoke test's factory):
    the diffusers layout for zero123-guidance, ``stable_zero123.ckpt`` read with the folder's configs
    as its architecture for stable-zero123-guidance (whose checkpoint_file names it)."""
    folder = tmp_path / "tiny-zero123"
    if not (folder / STABLE_CKPT).is_file():
        make_tiny_zero123(folder)
    return {"pretrained_model_name_or_path": str(folder), "original_architecture": str(folder),
            "half_precision_weights": False}


@pytest.fixture(scope="session")
def tiny_zero123(tmp_path_factory) -> Path:
    """A tiny Zero123 folder in the diffusers layout, with the same weights as original checkpoints inside."""
    return make_tiny_zero123(tmp_path_factory.mktemp("tiny-zero123") / "zero123")
