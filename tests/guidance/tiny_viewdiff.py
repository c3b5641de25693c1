"""A tiny random ViewDiff for tests: tiny_sd.py's Stable Diffusion folder plus a weights file.

:func:`make_tiny_viewdiff` writes the tiny diffusers Stable Diffusion of ``tiny_sd.py`` (8x8
latents, working resolution 16, CLIP states ``[77, 32]``) to ``<folder>/sd`` and a ViewDiff weights
file for it to ``<folder>/viewdiff.safetensors``, with the added layers at toy size
(:data:`TINY_CONFIG`) and *random* where training would start them at zero (the LoRA's ``up``, the
projection layers' output convolution), so every added part changes the prediction.
:func:`write_tiny_dataset` writes a few synthetic objects in the training layout of
:mod:`lift3d.priors.viewdiff.data`. Seeded: the same arguments give the same files.

Fixtures: ``tiny_viewdiff`` (``(sd folder, weights file)``); the config smoke test calls
:func:`smoke_overrides`.
"""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

from lift3d.priors.viewdiff.cameras import orbit_c2w
from lift3d.priors.viewdiff.data import write_object

# tiny_sd.py makes the base model; loaded by path so this file also works through runpy.
_TINY_SD = runpy.run_path(str(Path(__file__).with_name("tiny_sd.py")))
make_tiny_sd = _TINY_SD["make_tiny_sd"]
LATENT_SIZE: int = _TINY_SD["LATENT_SIZE"]
RESOLUTION: int = _TINY_SD["RESOLUTION"]
TEXT_DIM: int = _TINY_SD["TEXT_DIM"]

#: The added layers at toy size (the tiny UNet has 4 and 8 channels; projections after mid_block and up_blocks.0).
TINY_CONFIG = {"lora_rank": 2, "cond_hidden": 8, "proj_channels": 4, "grid_size": 8, "n_samples": 8, "proj_hidden": 8,
               "bound": 1.0}


def randomize_added(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Fill every added tensor of a ViewDiffUNet with seeded random values (none zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.added_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def make_tiny_viewdiff(folder: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> tuple[Path, Path]:
    """Write the tiny base model and random ViewDiff weights; returns (sd folder, weights file)."""
    from diffusers import UNet2DConditionModel

    from lift3d.priors.viewdiff.model import ViewDiffUNet

    folder = Path(folder)
    sd = make_tiny_sd(folder / "sd", prediction_type=prediction_type, seed=seed)
    unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet", local_files_only=True)
    model = ViewDiffUNet(unet, TINY_CONFIG)
    randomize_added(model, seed + 1)
    return sd, model.save_added(folder / "viewdiff.safetensors")


def write_tiny_dataset(root: str | Path, n_objects: int = 2, n_views: int = 6, size: int = 16, seed: int = 0) -> Path:
    """``n_objects`` synthetic objects in the training layout: a coloured disc on white, one colour per
    object, shaded by the camera's azimuth, seen from an orbit (elevation 20, distance 2.5, fovy 40)."""
    g = torch.Generator().manual_seed(seed)
    root = Path(root)
    az = torch.arange(n_views, dtype=torch.float32) * (360.0 / n_views) - 180
    c2w = orbit_c2w(torch.full((n_views,), 20.0), az, torch.full((n_views,), 2.5))
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    disc = ((xx**2 + yy**2) < 0.45).float()[..., None]
    for o in range(n_objects):
        colour = torch.rand(3, generator=g)
        shade = 0.6 + 0.4 * torch.cos(torch.deg2rad(az))[:, None, None, None]
        images = disc * colour * shade + (1 - disc)
        write_object(root / f"object{o:02d}", images, c2w, fovy=torch.full((n_views,), 40.0),
                     prompt="a red cube" if o % 2 == 0 else "a blue sphere")
    return root


def smoke_overrides(tmp_path: Path) -> dict:
    """Guidance config overrides that put a recipe on the tiny model (the config smoke test's factory)."""
    folder = tmp_path / "tiny-viewdiff"
    weights = folder / "viewdiff.safetensors"
    if not weights.is_file():
        make_tiny_viewdiff(folder)
    return {"pretrained_model_name_or_path": str(folder / "sd"), "weights": str(weights)}


@pytest.fixture(scope="session")
def tiny_viewdiff(tmp_path_factory) -> tuple[Path, Path]:
    """(the tiny SD folder, a random ViewDiff weights file for it)."""
    return make_tiny_viewdiff(tmp_path_factory.mktemp("tiny-viewdiff"))
