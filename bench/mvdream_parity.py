"""Parity of lift3d's MVDream networks with the original implementation, on random weights.

Builds the original ``MultiViewUNetModel`` and ``AutoencoderKL`` from a checkout of
bytedance/MVDream (``--mvdream-repo PATH``, imported from that path only, never vendored), at small
widths and seeded random weights (every parameter the original zero-initialises gets noise, so no
layer hides), saves their state dicts with the original prefixes (``model.diffusion_model.``,
``first_stage_model.``) as one ``.pt`` file, and loads that file through lift3d's key map
(``lift3d.priors.mvdream.checkpoint.load_mvdream``). Both sides then run on the same inputs: the
UNet on (x, t, context, camera, num_frames) for two view groups of 4 (and for single views), the VAE
encoding (posterior mean) and decoding. It prints the largest absolute difference of the outputs,
and the same relative to the largest output, in float32 (the original's only precision on a CPU;
lift3d's own float32-vs-float64 difference is printed beside it as the rounding scale). It also compares MVDream's own
camera matrices (``camera_utils.get_camera``) with lift3d's cameras converted by
``lift3d.priors.mvdream.cameras.mvdream_camera`` at lift3d azimuth = MVDream azimuth - 90.

Two layouts: ``tiny`` (2 levels of 32 and 64 channels, attention on the first, 16-channel heads)
and ``sd21`` (SD 2.1-base's layout: 4 levels, attention on the first three, 2 ResNet blocks per
level, 64-channel heads, at a fifth of its width).

``--variant sd-v1.5`` runs the same comparison in the shape of MVDream's SD 1.5 model (its
sd-v1.yaml): heads by count (8 per level, whatever the width), 768-wide text states, 1x1-convolution
projections around the transformers (``use_linear_in_transformer`` off), in the layouts ``tiny15``
and ``sd15`` (SD 1.5's 4 levels at a fifth of the width). The file then also holds a small text tower
under ``cond_stage_model.transformer.*``: the original's ``FrozenCLIPEmbedder`` is transformers'
``CLIPTextModel`` itself (built here from a tiny quick-GELU config, as the original's
``from_pretrained`` would need the network), so the text row checks lift3d's key map and its choice
of output (the last layer after the final norm), and agrees by construction when both are right.

What is stubbed, and only here: the checkout's ``mvdream/__init__.py`` (it imports the model zoo,
hence omegaconf / huggingface_hub / pkg_resources) is skipped by registering its packages by path;
``einops`` is replaced by a small ``rearrange`` for the patterns the original uses when the package
is not installed. xformers is absent, so the original takes its plain attention path.

    python bench/mvdream_parity.py --mvdream-repo /path/to/MVDream [--seed 0] [--variant sd-v1.5]
"""

from __future__ import annotations

import argparse
import importlib
import math
import re
import sys
import tempfile
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------------------------------------
# Stand-ins for what the original imports and this machine lacks


def _einops_stand_in() -> types.ModuleType:
    """``rearrange`` for patterns made of named axes and parenthesised groups (what the original's
    UNet, transformer and autoencoder use); ``repeat`` only on paths the bench never takes."""

    def groups(side: str) -> list[list[str]]:
        out, current = [], None
        for tok in re.findall(r"\(|\)|\w+", side):
            if tok == "(":
                current = []
            elif tok == ")":
                out.append(current)
                current = None
            elif current is not None:
                current.append(tok)
            else:
                out.append([tok])
        return out

    def rearrange(tensor: torch.Tensor, pattern: str, **sizes: int) -> torch.Tensor:
        left, right = (groups(s) for s in pattern.split("->"))
        known = dict(sizes)
        for group, dim in zip(left, tensor.shape):
            unknown = [a for a in group if a not in known]
            have = math.prod(known[a] for a in group if a in known)
            if len(unknown) == 1:
                known[unknown[0]] = dim // have
            elif unknown:
                raise ValueError(f"stand-in rearrange cannot resolve {group} in {pattern!r}")
        axes = [a for g in left for a in g]
        x = tensor.reshape([known[a] for a in axes])
        x = x.permute([axes.index(a) for g in right for a in g])
        return x.reshape([math.prod(known[a] for a in g) for g in right])

    def repeat(*_a, **_k):
        raise NotImplementedError("the einops stand-in has no repeat (the bench does not reach it)")

    mod = types.ModuleType("einops")
    mod.rearrange, mod.repeat = rearrange, repeat
    return mod


def import_original(repo: Path) -> dict[str, types.ModuleType]:
    """The original modules, imported from ``repo`` without running ``mvdream/__init__.py``."""
    if importlib.util.find_spec("einops") is None:
        sys.modules["einops"] = _einops_stand_in()
        print("stand-in: einops (not installed) -> a minimal rearrange")
    root = repo / "mvdream"
    if not (root / "ldm" / "modules" / "diffusionmodules" / "openaimodel.py").is_file():
        raise SystemExit(f"--mvdream-repo {repo}: no mvdream/ldm/modules/diffusionmodules/openaimodel.py there")
    for pkg in ("mvdream", "mvdream.ldm", "mvdream.ldm.modules", "mvdream.ldm.modules.diffusionmodules",
                "mvdream.ldm.modules.distributions", "mvdream.ldm.models"):
        mod = types.ModuleType(pkg)
        mod.__path__ = [str(root.joinpath(*pkg.split(".")[1:]))]
        sys.modules[pkg] = mod
    print("stand-in: mvdream/__init__.py skipped (package registered by path)")
    names = {"unet": "mvdream.ldm.modules.diffusionmodules.openaimodel", "vae": "mvdream.ldm.models.autoencoder",
             "cameras": "mvdream.camera_utils"}
    return {k: importlib.import_module(v) for k, v in names.items()}


# ---------------------------------------------------------------------------------------------

LAYOUTS = {
    "tiny": dict(unet=dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=[1],
                           num_head_channels=16, context_dim=32),
                 vae=dict(ch=32, ch_mult=[1, 2], num_res_blocks=1), latent=8),
    "sd21": dict(unet=dict(model_channels=64, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                           attention_resolutions=[4, 2, 1], num_head_channels=64, context_dim=64),
                 vae=dict(ch=32, ch_mult=[1, 2, 4, 4], num_res_blocks=2), latent=8),
    # MVDream sd-v1.yaml's shape: 8 heads per level, 768-wide context, convolution projections.
    "tiny15": dict(unet=dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=[1],
                             num_heads=8, context_dim=768, linear=False),
                   vae=dict(ch=32, ch_mult=[1, 2], num_res_blocks=1), latent=8,
                   text=dict(width=768, layers=2, heads=12, mlp=1024)),
    "sd15": dict(unet=dict(model_channels=64, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                           attention_resolutions=[4, 2, 1], num_heads=8, context_dim=768, linear=False),
                 vae=dict(ch=32, ch_mult=[1, 2, 4, 4], num_res_blocks=2), latent=8,
                 text=dict(width=768, layers=2, heads=12, mlp=1024)),
}
#: The layouts each published variant is compared in by default.
VARIANT_LAYOUTS = {"sd-v2.1-base": "tiny,sd21", "sd-v1.5": "tiny15,sd15"}


def build_original(mods: dict, layout: dict, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    u = layout["unet"]
    heads = dict(num_heads=u["num_heads"]) if "num_heads" in u else dict(num_head_channels=u["num_head_channels"])
    unet = mods["unet"].MultiViewUNetModel(
        image_size=layout["latent"], in_channels=4, out_channels=4, model_channels=u["model_channels"],
        attention_resolutions=u["attention_resolutions"], num_res_blocks=u["num_res_blocks"],
        channel_mult=u["channel_mult"], use_spatial_transformer=True,
        use_linear_in_transformer=u.get("linear", True), transformer_depth=1, context_dim=u["context_dim"],
        use_checkpoint=False, legacy=False, camera_dim=16, **heads)
    v = layout["vae"]
    factor = 2 ** (len(v["ch_mult"]) - 1)
    ddconfig = dict(double_z=True, z_channels=4, resolution=layout["latent"] * factor, in_channels=3, out_ch=3,
                    ch=v["ch"], ch_mult=v["ch_mult"], num_res_blocks=v["num_res_blocks"], attn_resolutions=[],
                    dropout=0.0)
    vae = mods["vae"].AutoencoderKL(ddconfig=ddconfig, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4)
    with torch.no_grad():
        for m in (unet, vae):
            for p in m.parameters():
                if not bool(p.abs().max() > 0):
                    p.normal_(0.0, 0.05)
    return unet.eval(), vae.eval()


def build_clip_text(layout: dict, seed: int) -> torch.nn.Module | None:
    """The original SD 1.x text encoder's network: transformers' CLIPTextModel (quick-GELU), small, seeded."""
    t = layout.get("text")
    if t is None:
        return None
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed + 7)
    cfg = CLIPTextConfig(vocab_size=1000, hidden_size=t["width"], intermediate_size=t["mlp"],
                         num_hidden_layers=t["layers"], num_attention_heads=t["heads"], max_position_embeddings=77,
                         hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=998, eos_token_id=999,
                         pad_token_id=999)
    return CLIPTextModel(cfg).eval()


def report(name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    diff = (ours.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    print(f"| {name:<44} | {tuple(ref.shape)!s:<18} | {diff:10.3e} | {diff / max(scale, 1e-30):10.3e} | {scale:9.3e} |")


def run_layout(mods: dict, key: str, seed: int, workdir: Path) -> None:
    from lift3d.priors.mvdream.checkpoint import load_mvdream

    layout = LAYOUTS[key]
    unet_o, vae_o = build_original(mods, layout, seed)
    state = {f"model.diffusion_model.{k}": v for k, v in unet_o.state_dict().items()}
    state.update({f"first_stage_model.{k}": v for k, v in vae_o.state_dict().items()})
    text_o = build_clip_text(layout, seed)
    if text_o is not None:
        # FrozenCLIPEmbedder keeps the CLIPTextModel as ``transformer``; its state dict nests ``text_model.``
        sd = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in text_o.state_dict().items()}
        state.update({f"cond_stage_model.transformer.{k}": v for k, v in sd.items()})
    path = workdir / f"mvdream-{key}.pt"
    torch.save(state, path)
    factor = 2 ** (len(layout["vae"]["ch_mult"]) - 1)
    size = layout["latent"] * factor
    u = layout["unet"]
    heads = dict(num_heads=u["num_heads"]) if "num_heads" in u else dict(head_channels=u["num_head_channels"])
    loaded = load_mvdream(path, parts=("unet", "vae", "text") if text_o is not None else ("unet", "vae"),
                          image_size=size, **heads)
    n_orig = sum(p.numel() for p in unet_o.parameters()) + sum(p.numel() for p in vae_o.parameters())
    n_ours = sum(p.numel() for p in loaded.unet.parameters()) + sum(p.numel() for p in loaded.vae.parameters())
    print(f"\nlayout {key} (detected variant {loaded.arch.variant.name}): {len(state)} checkpoint tensors, "
          f"{n_orig} parameters in the original, {n_ours} in lift3d's "
          f"(UNet arch {loaded.arch.unet}); working resolution {size}, latents {layout['latent']}")
    print(f"| {'output':<44} | {'shape':<18} | max |diff| | rel. to max | max |ref| |")
    print("| --- | --- | --- | --- | --- |")

    g = torch.Generator().manual_seed(seed + 1)
    groups, f = 2, 4
    B = groups * f
    x = torch.randn(B, 4, layout["latent"], layout["latent"], generator=g)
    t = torch.randint(20, 980, (groups,), generator=g).repeat_interleave(f)
    context = torch.randn(B, 77, layout["unet"]["context_dim"], generator=g)
    camera = torch.cat([mods["cameras"].get_camera(f, elevation=15.0 * (i + 1), azimuth_start=37.0 * i)
                        for i in range(groups)])
    img = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    with torch.no_grad():
        refs = {}
        for frames in (4, 1):
            refs[frames] = unet_o(x, t, context=context, camera=camera, num_frames=frames)
            ours = loaded.unet(x, t, context, camera, frames)
            report(f"UNet eps, num_frames={frames}", ours, refs[frames])
        # Not a parity row: how far joint attention moves the original's output (so the rows above
        # would show a missing regrouping).
        report("original: num_frames=4 vs num_frames=1", refs[4], refs[1])
        report("VAE encode, posterior mean", loaded.vae.encode(img).latent_dist.mean, vae_o.encode(img).mean)
        z = torch.randn(2, 4, layout["latent"], layout["latent"], generator=g)
        report("VAE decode", loaded.vae.decode(z).sample, vae_o.decode(z))
        # The camera MLP on its own: a conversion that dropped it would fail here first.
        report("camera MLP output", loaded.unet.unet.class_embedding(camera), unet_o.camera_embed(camera))
        # The scale of float32 rounding in this network: lift3d's UNet in float32 against itself in
        # float64 (the original is hard-wired to float32: its group norms cast to it).
        ours32 = loaded.unet(x, t, context, camera, 4)
        ours64 = loaded.unet.to(torch.float64)(x.double(), t, context.double(), camera.double(), 4)
        report("rounding: lift3d UNet float32 vs float64", ours32, ours64)
        if text_o is not None:
            ids = torch.randint(0, 998, (2, 77), generator=g)
            ids[:, 0], ids[:, 9:] = 998, 999  # start, 8 tokens, then end tokens as SD 1.x's tokenizer pads
            report("text states (last layer, final norm)", loaded.text_encoder(ids).last_hidden_state,
                   text_o(ids).last_hidden_state)


def camera_parity(mods: dict) -> None:
    from lift3d.guidance.base import CameraBatch
    from lift3d.priors.mvdream.cameras import mvdream_camera

    print("\ncameras: MVDream's get_camera(elevation e, azimuth a) against lift3d's camera at azimuth a - 90, "
          "converted")
    print("| elevation | MVDream azimuths | max |diff| |")
    print("| --- | --- | --- |")
    for e, a0 in ((0.0, 0.0), (15.0, 90.0), (30.0, 45.0), (-10.0, 200.0), (60.0, -75.0)):
        theirs = mods["cameras"].get_camera(4, elevation=e, azimuth_start=a0).double()
        az = torch.tensor([a0 + 90.0 * k - 90.0 for k in range(4)], dtype=torch.float64)
        cams = CameraBatch.from_angles(torch.full((4,), e), az.float(), distance=2.5)
        ours = mvdream_camera(cams.c2w.double())
        print(f"| {e:9.1f} | {', '.join(f'{a0 + 90 * k:g}' for k in range(4)):<16} | "
              f"{(ours - theirs).abs().max().item():.3e} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mvdream-repo", type=Path, required=True, help="a checkout of bytedance/MVDream")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", choices=sorted(VARIANT_LAYOUTS), default="sd-v2.1-base",
                    help="which published model's shape to compare in (sets the default --layouts)")
    ap.add_argument("--layouts", default=None, help="comma-separated: " + ", ".join(LAYOUTS))
    args = ap.parse_args(argv)
    args.layouts = args.layouts or VARIANT_LAYOUTS[args.variant]
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, MVDream checkout {args.mvdream_repo}")
    mods = import_original(args.mvdream_repo.resolve())
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.layouts.split(","):
            run_layout(mods, key.strip(), args.seed, Path(tmp))
    camera_parity(mods)


if __name__ == "__main__":
    main()
