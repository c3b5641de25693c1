"""A tiny random SyncDreamer written in the released checkpoint's layout, for tests.

``make_tiny_syncdreamer(folder)`` writes ``syncdreamer-pretrain.ckpt`` (a Lightning-style
``{"state_dict": ...}`` with the original key names, written by lift3d's inverse key map) and
``architecture.json`` (the toy network shapes, which the loader reads instead of the released
ones). Shapes: 16-pixel views, 8x8 latents (the VAE halves once), a 4-level UNet (8, 8, 16, 16
channels, two layers per block like the released one, so the depth-wise attention's placement
is exercised as on the real model), volume widths (8, 8, 16, 16), an 8^3 spatial volume and
8 depth samples per frustum; CLIP embeds 14-pixel images to 16 numbers. Seeded.
:func:`smoke_overrides` is the config smoke test's factory for the ``syncdreamer`` prior family.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch

VIEW_SIZE, EMBED_DIM = 16, 16


def tiny_architecture():
    from lift3d.priors.syncdreamer.checkpoint import Architecture
    from lift3d.priors.syncdreamer.network import VolumeConfig

    unet = {"sample_size": VIEW_SIZE // 2, "in_channels": 8, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": [8, 8, 16, 16],
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "cross_attention_dim": EMBED_DIM, "attention_head_dim": 2, "norm_num_groups": 4,
            "flip_sin_to_cos": True, "freq_shift": 0}
    vae = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
           "block_out_channels": [8, 16], "norm_num_groups": 4, "sample_size": VIEW_SIZE,
           "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
           "scaling_factor": 0.18215}
    clip = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": 14, "patch_size": 7, "projection_dim": EMBED_DIM, "hidden_act": "quick_gelu"}
    volume = VolumeConfig(time_dim=16, view_channels=8, encoder_channels=8, dims=(8, 8, 16, 16),
                          image_size=VIEW_SIZE, latent_factor=2, volume_size=8, frustum_depth=8)
    return Architecture(unet=unet, vae=vae, image_encoder=clip, volume=asdict(volume))


def tiny_model(seed: int = 0):
    """The tiny SyncDreamer with random weights everywhere (no zero-initialised layer left)."""
    from lift3d.priors.syncdreamer.checkpoint import build

    torch.manual_seed(seed)
    model = build(tiny_architecture())
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0.0, 0.2)
    return model.eval().requires_grad_(False)


def make_tiny_syncdreamer(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny model's checkpoint and architecture to ``folder`` (created); returns the folder."""
    from lift3d.priors.syncdreamer.checkpoint import ARCHITECTURE_FILE, CKPT_NAME, original_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_model(seed)
    torch.save({"state_dict": original_state_dict(model)}, folder / CKPT_NAME)
    tiny_architecture().save(folder / ARCHITECTURE_FILE)
    return folder


def smoke_overrides(tmp_path: Path) -> dict:
    """Guidance config overrides that put a recipe on the tiny model (the config smoke test's factory)."""
    folder = tmp_path / "tiny-syncdreamer"
    if not (folder / "architecture.json").is_file():
        make_tiny_syncdreamer(folder)
    return {"pretrained_model_name_or_path": str(folder), "num_inference_steps": 2}


@pytest.fixture(scope="session")
def tiny_syncdreamer(tmp_path_factory) -> Path:
    """A folder holding a tiny SyncDreamer checkpoint."""
    return make_tiny_syncdreamer(tmp_path_factory.mktemp("tiny-syncdreamer") / "sd")
