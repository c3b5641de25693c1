"""Parity of lift3d's SyncDreamer with the authors' code, on small random networks.

Builds the reference networks with SyncDreamer's own code (github.com/liuyuan-pal/SyncDreamer, read
from a snapshot fetched outside this repository and unpacked into a temporary folder), saves
their state dict in the original layout, loads it through lift3d's key map, and prints the
largest absolute difference of:

* the UNet with depth-wise attention (``DepthWiseAttention``) on the same inputs and frustum features;
* the spatial volume (``SpatialVolumeNet.construct_spatial_volume``) from 16 noisy views;
* the frustum features at each of the four resolutions (``construct_view_frustum_volume``);
* one whole guided denoising step of all 16 views (``SyncDDIMSampler.denoise_apply``, guidance
  scale 2, the last DDIM step so no noise is drawn): viewpoint embedding, time embedding,
  ``cc_projection``, volume, UNet and the DDIM update.

The reference is built at small size: its UNet with 32/32/64/64 channels (ldm's group norms need
multiples of 32), 8x8 latents of 64-pixel views, an 8^3 spatial volume and 8 depth samples; its
volume networks keep their hard-coded widths (64, 128, 256, 512), and the 768-wide CLIP context
(hard-coded in the reference) is kept. The autoencoder and CLIP are not part of these modules
(their key maps are Zero123's, checked in tests/priors and bench/README.md); the CLIP embedding is
fed in directly. ``einops``, which the reference imports, is taken from its own repository (fetched
the same way). Stubbed because the packages are absent here: ``kornia`` (only its
``create_meshgrid`` is called, re-written in a few lines: integer pixel coordinates), and, as empty
modules present only during the reference's imports and never called, ``cv2``, ``skimage``,
``torchvision``, ``matplotlib`` (its utility modules import them) and ``ldm.modules.encoders.modules``
(OpenAI's ``clip`` package, for the CLIP encoder that is not built here).

    python bench/syncdreamer_parity.py [--mirror /work/.mirror/liuyuan-pal+SyncDreamer/repo]
                                       [--einops /work/.mirror/arogozhnikov+einops/repo]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def unpack(git_dir: str, paths: list[str], dest: Path) -> None:
    archive = subprocess.run(["git", f"--git-dir={git_dir}", "archive", "HEAD", *paths], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def stub_modules() -> None:
    def create_meshgrid(height, width, normalized_coordinates=True, device=None, dtype=torch.float32):
        assert not normalized_coordinates
        ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=dtype),
                                torch.arange(width, device=device, dtype=dtype), indexing="ij")
        return torch.stack([xs, ys], -1)[None]

    kornia = types.ModuleType("kornia")
    kornia.create_meshgrid = create_meshgrid
    sys.modules["kornia"] = kornia
    for name in ("cv2", "torchvision", "matplotlib", "matplotlib.pyplot", "skimage", "skimage.io"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["skimage.io"].imread = sys.modules["skimage.io"].imsave = None
    enc = types.ModuleType("ldm.modules.encoders.modules")
    enc.FrozenCLIPImageEmbedder = None
    sys.modules["ldm.modules.encoders.modules"] = enc


def reference(work: Path, seed: int):
    """The authors' modules at small size, as the parts of a SyncMultiviewDiffusion without autoencoder and CLIP."""
    # Before the stubs: these probe for the real packages when first imported.
    import diffusers  # noqa: F401
    import pytorch_lightning  # noqa: F401
    import transformers  # noqa: F401

    import lift3d.priors.syncdreamer.checkpoint  # noqa: F401

    stub_modules()
    os.chdir(work)  # their camera table is read from meta_info/ relative to the working folder
    sys.path.insert(0, str(work))
    from ldm.models.diffusion.sync_dreamer import SpatialVolumeNet, SyncDDIMSampler, SyncMultiviewDiffusion, UNetWrapper

    # the empty stand-ins were needed for the imports only: other packages probe for the real ones
    for name in ("kornia", "cv2", "torchvision", "matplotlib", "matplotlib.pyplot", "skimage", "skimage.io"):
        sys.modules.pop(name, None)

    torch.manual_seed(seed)
    m = SyncMultiviewDiffusion.__new__(SyncMultiviewDiffusion)
    torch.nn.Module.__init__(m)
    m.view_num, m.viewpoint_dim, m.image_size = 16, 4, 64
    m.finetune_projection = False
    m._init_time_step_embedding()
    m._init_schedule()
    m._init_multiview()
    m._init_clip_projection()
    m.spatial_volume = SpatialVolumeNet(m.time_embed_dim, m.viewpoint_dim, m.view_num, input_image_size=64,
                                        frustum_volume_depth=8, spatial_volume_size=8)
    unet_cfg = {"target": "ldm.models.diffusion.sync_dreamer_attention.DepthWiseAttention", "params": {
        "volume_dims": [64, 128, 256, 512], "image_size": 8, "in_channels": 8, "out_channels": 4,
        "model_channels": 32, "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 1, 2, 2],
        "num_heads": 2, "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 768,
        "use_checkpoint": False, "legacy": False}}
    m.model = UNetWrapper(unet_cfg)
    # random values everywhere (zero-initialised output layers included), so every key matters
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (p if p.abs().sum() > 0 else 0))
    m.eval()
    return m, SyncDDIMSampler


def ours_for(ref_state: dict, seed: int):
    from dataclasses import asdict

    from lift3d.priors.syncdreamer import checkpoint
    from lift3d.priors.syncdreamer.network import VolumeConfig

    unet = {"sample_size": 8, "in_channels": 8, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": [32, 32, 64, 64], "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "cross_attention_dim": 768,
            "attention_head_dim": 2, "norm_num_groups": 32, "flip_sin_to_cos": True, "freq_shift": 0}
    vae = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
           "block_out_channels": [32, 32, 32, 32], "norm_num_groups": 32, "sample_size": 64,
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
           "scaling_factor": 0.18215}
    clip = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2,
            "image_size": 14, "patch_size": 7, "projection_dim": 768, "hidden_act": "quick_gelu"}
    arch = checkpoint.Architecture(unet=unet, vae=vae, image_encoder=clip, volume=asdict(VolumeConfig(
        image_size=64, volume_size=8, frustum_depth=8)))
    torch.manual_seed(seed + 1)
    filler = checkpoint.build(arch)  # supplies the autoencoder and CLIP keys the reference parts lack
    state = dict(ref_state)
    for k, v in checkpoint.original_state_dict(filler, with_buffers=False).items():
        if k.startswith(("first_stage_model.", "clip_image_encoder.")):
            state[k] = v
    model = checkpoint.build(arch)
    checkpoint.load_state(model, state, "reference state dict")
    return model.eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mirror", default="/work/.mirror/liuyuan-pal+SyncDreamer/repo")
    ap.add_argument("--einops", default="/work/.mirror/arogozhnikov+einops/repo")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    for path, source in ((args.mirror, "liuyuan-pal/SyncDreamer"), (args.einops, "arogozhnikov/einops")):
        if not Path(path).is_dir():
            print(f"error: no git snapshot of {source} at {path}; fetch github:{source} first (or pass its path)",
                  file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="syncdreamer-ref-"))
    cwd = os.getcwd()
    try:
        return compare(args, work)
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)


def compare(args: argparse.Namespace, work: Path) -> int:
    unpack(args.mirror, ["ldm", "meta_info"], work)
    unpack(args.einops, ["einops"], work)
    ref, Sampler = reference(work, args.seed)
    ours = ours_for({k: v.detach().clone() for k, v in ref.state_dict().items()}, args.seed)

    from lift3d.priors.syncdreamer import cameras as cams
    from lift3d.priors.syncdreamer.sampler import ddim_schedule, ddim_update

    g = torch.Generator().manual_seed(args.seed + 2)
    B, N, n = 1, 16, 8
    x = torch.randn(B, N, 4, n, n, generator=g)
    latent = torch.randn(B, 4, n, n, generator=g)
    clip = torch.randn(B, 1, 768, generator=g)
    elev_deg = 20.0
    elev = torch.tensor([elev_deg])
    t = torch.tensor([741])
    rows = []
    with torch.no_grad():
        # 1. the volumes
        v_ref = ref.get_viewpoint_embedding(B, torch.deg2rad(elev))
        v_ours = cams.view_embedding(elev)
        rows.append(("viewpoint embedding [1,16,4]", v_ref, v_ours))
        te_ref, te_ours = ref.embed_time(t), ours.embed_time(t)
        rows.append(("time embedding [1,256]", te_ref, te_ours))
        vol_ref = ref.spatial_volume.construct_spatial_volume(x, te_ref, v_ref, ref.poses, ref.Ks)
        vol_ours = ours.volume.spatial(x, te_ours, v_ours, ours.K, ours.w2c)
        rows.append((f"spatial volume {list(vol_ref.shape)}", vol_ref, vol_ours))
        idx = torch.tensor([[0, 5, 11]])
        fr_ref, _ = ref.spatial_volume.construct_view_frustum_volume(vol_ref, te_ref, v_ref, ref.poses, ref.Ks, idx)
        fr_ours = ours.volume.frustum(vol_ours, te_ours, v_ours, ours.K, ours.w2c, idx)
        for w in sorted(fr_ref, reverse=True):
            rows.append((f"frustum features {list(fr_ref[w].shape)}", fr_ref[w], fr_ours[w]))
        # 2. the UNet alone, same inputs and frustum features
        xin = torch.randn(3, 8, n, n, generator=g)
        ctx = torch.randn(3, 1, 768, generator=g)
        tt = torch.tensor([741, 100, 5])
        u_ref = ref.model.diffusion_model(xin, tt, ctx, source_dict=fr_ref)
        u_ours = ours.unet(xin, tt, ctx, fr_ref)
        rows.append((f"UNet + depth-wise attention {list(u_ref.shape)}", u_ref, u_ours))
        # 3. one guided step of all 16 views (the last DDIM step: no noise drawn)
        sampler = Sampler(ref, 50, "uniform", 1.0, latent_size=n)
        info = {"x": latent * 0.18215, "elevation": torch.deg2rad(elev)}  # the reference divides the scale out
        step_ref = sampler.denoise_apply(x, info, clip, torch.tensor([int(sampler.ddim_timesteps[0])]), 0, 2.0,
                                         batch_view_num=8, is_step0=True)
        ts, a, a_prev, sigma = ddim_schedule(ours.alphas_cumprod, 50, 1.0)
        e = ours.predict(x, torch.tensor([int(ts[0])]), latent, clip, elev, guidance_scale=2.0, view_batch=8)
        step_ours = ddim_update(x, e, float(a[0]), float(a_prev[0]), float(sigma[0]), None)
        rows.append((f"guided denoising step, 16 views {list(step_ref.shape)}", step_ref, step_ours))
    print(f"SyncDreamer parity against the authors' code (commit {commit(args.mirror)}), float32, CPU, "
          f"seed {args.seed}")
    print(f"{'output':<52} {'max |ours - reference|':>24} {'max |reference|':>16}")
    for name, r, o in rows:
        print(f"{name:<52} {float((o - r).abs().max()):>24.3e} {float(r.abs().max()):>16.3e}")
    return 0


def commit(git_dir: str) -> str:
    return subprocess.run(["git", f"--git-dir={git_dir}", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
