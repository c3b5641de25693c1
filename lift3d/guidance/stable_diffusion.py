"""Stable Diffusion as a score-distillation prior: DreamFusion's SDS in SD's latent space.

DreamFusion (Poole et al. 2022) distilled the pixel-space Imagen; its open re-implementations
(stable-dreamfusion, threestudio) distil Stable Diffusion (Rombach et al. 2022) instead, a latent
diffusion model. :class:`StableDiffusionPrior` adapts a diffusers UNet and VAE to
:mod:`lift3d.guidance.score_distillation`, whose SDS is used as it is:

* the render is resized to the model's working resolution (the UNet's ``sample_size`` times the
  VAE's downsampling factor: 512 for SD 1.x and 2.1-base, 768 for SD 2.0/2.1, 16 for the tests'
  tiny model), mapped to [-1, 1] and encoded by the VAE; the latent is the posterior *mean* times
  the VAE's ``scaling_factor``, so the loss is deterministic given ``t`` and the noise (the
  posterior's spread is tiny; threestudio draws a sample);
* or, with ``image: latents``, the render *is* the latent (Fantasia3D's early geometry steps score
  the normal map and the mask as four latent channels): no VAE at all;
* the UNet predicts in the parameterisation its scheduler config names (``epsilon`` for SD 1.x,
  2.0-base and 2.1-base; ``v_prediction`` for SD 2.0 and 2.1 at 768); the core converts to epsilon.

Beyond the core: HiFA's image-space term (Zhu et al. 2023), and the frozen weights' dtype follows
the device (float16 on CUDA, float32 elsewhere) unless the config fixes it.

For VSD (ProlificDreamer, Wang et al. 2023; ``stable-diffusion-vsd-guidance``) the adapter makes
its LoRA model with :meth:`StableDiffusionPrior.lora_copy`: a :class:`StableDiffusionLoRAPrior`
whose UNet shares every frozen tensor with the prior's (one copy of the weights in memory) and adds
peft LoRA adapters and a camera class embedding of its own.

Weights come from a local folder or the Hugging Face cache (:func:`lift3d.utils.hub.resolve_weights`),
never the network; diffusers is imported only when a guidance is built.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from lift3d.config import ConfigError, Scheduled
from lift3d.guidance.base import GuidanceInput, GuidanceOutput
from lift3d.guidance.latent_diffusion import LatentDiffusionPrior, LatentDiffusionWeights, weights_dtype
from lift3d.guidance.score_distillation import Cond, Conditioning, DiffusionGuidance, DiffusionPrior, SDSGuidance
from lift3d.registry import register

#: The Stable Diffusion every SD module loads unless told otherwise.
DEFAULT_SD_MODEL = "stabilityai/stable-diffusion-2-1-base"

#: Files a diffusers Stable Diffusion folder must hold for the guidance (the weights are checked on load).
REQUIRED_FILES = ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json")

#: Layers of the UNet that get LoRA adapters in VSD by default: every attention projection, self- and
#: cross-attention (where ProlificDreamer's LoRAAttnProcessor put them).
DEFAULT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

#: Width of the LoRA model's camera condition: the flattened 4x4 camera-to-world matrix.
CAMERA_DIM = 16


class StableDiffusionPrior(LatentDiffusionPrior):
    """Adapter around a diffusers ``UNet2DConditionModel`` and ``AutoencoderKL``.

    Its space is the VAE latent ``[B, C, h, w]`` (C = the UNet's ``in_channels``, 4) at the UNet's
    ``sample_size``; a branch (:data:`Cond`) is ``text`` ``[B, L, D]``, the CLIP hidden states of the
    ``stable-diffusion-prompt-processor``, and, when that processor supplies it, ``null`` ``[B, L, D]``,
    the empty text the model was trained on as "no text" (what :meth:`drop_text` swaps in). Once
    :meth:`lora_copy` has made a LoRA model, every branch also carries what that model reads:
    ``text_lora`` ``[B, L, D]``, the view-independent prompt, and ``camera`` ``[B, 16]``, the
    flattened camera-to-world matrices.

    Resizing, encoding, decoding, the dtype and the reading of the prompt are
    :class:`~lift3d.guidance.latent_diffusion.LatentDiffusionPrior`'s.
    """

    def __init__(self, unet: nn.Module, vae: nn.Module, alphas_cumprod: Tensor, prediction_type: str,
                 num_train_timesteps: int, name: str = "stable-diffusion-guidance"):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ConfigError(f"{name}: the scheduler config's prediction_type is {prediction_type!r}; "
                              "valid: epsilon, v_prediction, sample")
        self.unet = unet
        self.vae = vae
        self.guidance_name = name
        self.prediction_type = prediction_type
        self.num_train_timesteps = int(num_train_timesteps)
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().float().clone(), persistent=False)
        size = unet.config.sample_size
        self.latent_size: tuple[int, int] = (int(size), int(size)) if isinstance(size, int) else tuple(map(int, size))
        #: How much the VAE shrinks an image: 2 per downsampling block of its encoder.
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        #: The working resolution (h, w) in pixels: renders are resized to it before encoding.
        self.resolution: tuple[int, int] = (self.latent_size[0] * self.vae_scale_factor,
                                             self.latent_size[1] * self.vae_scale_factor)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.latent_channels = int(unet.config.in_channels)
        self.text_dim = int(unet.config.cross_attention_dim)
        self.offloaded = False
        #: Whether :meth:`condition` adds the LoRA model's keys (set by :meth:`lora_copy`).
        self.lora_conditioning = False

    # -- the adapter -------------------------------------------------------------------------------

    def encode_latents(self, latents: Float[Tensor, "B C h w"]) -> Float[Tensor, "B C h0 w0"]:
        """Renders taken as latents (``image: latents``) -> the UNet's latent size; no VAE."""
        if latents.shape[1] != self.latent_channels:
            raise ValueError(f"{self.guidance_name} image: latents needs {self.latent_channels}-channel latents "
                             f"(the UNet's in_channels), got {latents.shape[1]} channels")
        if tuple(latents.shape[-2:]) != self.latent_size:
            latents = F.interpolate(latents, self.latent_size, mode="bilinear", align_corners=False)
        return latents

    def condition(self, inp: GuidanceInput, view_dependent_prompting: bool = True) -> Conditioning:
        cond, uncond, negatives, weights, null = self.text_embeddings(inp, view_dependent_prompting)
        B, dev, cams = cond.shape[0], cond.device, inp.cameras
        shared: Cond = {}
        if null is not None:
            shared["null"] = null
        if self.lora_conditioning:
            # What the LoRA model reads (ProlificDreamer): the plain prompt, whatever the view, and the camera.
            shared["text_lora"] = inp.prompt.get_text_embeddings(cams.elevation, cams.azimuth, cams.distance,
                                                                 view_dependent_prompting=False)[0].to(dev)
            shared["camera"] = cams.c2w.reshape(B, CAMERA_DIM).to(dev, torch.float32)
        return self.text_branches(cond, uncond, negatives, weights, shared)

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        dt = self.dtype
        out = self.unet(x_t.to(dt), t, encoder_hidden_states=cond["text"].to(dt)).sample
        return out.to(x_t.dtype)

    def lora_copy(self, rank: int, alpha: float, targets: list[str]) -> "StableDiffusionLoRAPrior":
        """VSD's LoRA model: a twin of the UNet sharing every frozen tensor with it, with peft LoRA
        adapters (rank ``rank``, scale ``alpha / rank``, B zero) on the linear layers ``targets``
        names (default :data:`DEFAULT_LORA_TARGETS`) and a camera class embedding; both float32 and
        trainable. It starts equal to the prior: LoRA's B and the embedding's last layer are zero.

        From now on :meth:`condition` supplies the twin's view-independent text and cameras.
        """
        from diffusers.models.embeddings import TimestepEmbedding
        from peft import LoraConfig

        name = self.guidance_name
        if self.offloaded:
            raise ConfigError(f"{name}: a LoRA model cannot be trained on offloaded weights; "
                              "set enable_sequential_cpu_offload: false")
        if getattr(self.unet, "class_embedding", None) is not None:
            raise ConfigError(f"{name}: the UNet has a class embedding of its own; the LoRA model's camera "
                              "condition needs one without (Stable Diffusion 1.x / 2.x text-to-image)")
        targets = list(targets) or list(DEFAULT_LORA_TARGETS)
        layers = [n for n, m in self.unet.named_modules() if isinstance(m, nn.Linear)]
        for target in targets:
            if not any(n == target or n.endswith("." + target) for n in layers):
                raise ConfigError(f"{name}: lora_targets entry {target!r} names no Linear layer of the UNet; "
                                  f"layer names: {', '.join(sorted({n.rsplit('.', 1)[-1] for n in layers}))}")
        twin = weight_sharing_copy(self.unet)
        twin.requires_grad_(False)
        twin.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                                    init_lora_weights=True))
        # The camera enters as the UNet's class embedding, added to the time embedding (threestudio's
        # TimestepEmbedding(16, 1280) for SD); its last layer is zero so the twin starts as the prior.
        camera = TimestepEmbedding(CAMERA_DIM, int(twin.time_embedding.linear_2.out_features))
        nn.init.zeros_(camera.linear_2.weight)
        nn.init.zeros_(camera.linear_2.bias)
        twin.class_embedding = camera.to(self.unet.conv_in.weight.device)
        trainable = [p for n, p in twin.named_parameters() if "lora_" in n or n.startswith("class_embedding.")]
        for p in trainable:
            # float32 even beside float16 weights: Adam's small updates would round away in half precision.
            p.data = p.data.float()
            p.requires_grad_(True)
        self.lora_conditioning = True
        return StableDiffusionLoRAPrior(twin, self)


def weight_sharing_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module``'s structure whose parameters and buffers *are* the original's
    tensors: changing the copy's modules (adapters, a class embedding) leaves the original as it was,
    and no weight is stored twice."""
    memo: dict[int, Any] = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    # A torch.compile'd module holds its compiled call, bound to the original: compile the copy anew.
    compiled = module.__dict__.get("_compiled_call_impl")
    module._compiled_call_impl = None
    try:
        twin = copy.deepcopy(module, memo)
    finally:
        module._compiled_call_impl = compiled
    if compiled is not None:
        twin.compile()
    return twin


class StableDiffusionLoRAPrior(DiffusionPrior):
    """The LoRA model of VSD, made by :meth:`StableDiffusionPrior.lora_copy`.

    Its UNet is a twin of the prior's: the same frozen tensors, with LoRA adapters and a camera class
    embedding (``unet.class_embedding``, a small MLP from the 16 entries of the camera-to-world
    matrix to the time-embedding width, added to the time embedding). So the prior's pass never sees
    the LoRA, and no adapter is switched on and off around it. It predicts in the prior's own
    parameterisation (the core converts both alike and trains this model on the matching target).

    A branch is read as ``text_lora`` (else ``text``) and ``camera`` (zeros when absent); what is
    "dropped" for classifier-free guidance is the camera, not the text: it is trained with the
    camera zeroed at the prior's ``p_uncond`` (0.1), as ProlificDreamer's LoRA model is, and its
    unconditional branch is the same text with zero camera. Always in eval mode (the UNet has no
    active dropout; eval keeps the arithmetic the prior's).
    """

    def __init__(self, unet: nn.Module, base: StableDiffusionPrior):
        super().__init__()
        self.unet = unet
        self.guidance_name = base.guidance_name
        self.prediction_type = base.prediction_type
        self.num_train_timesteps = base.num_train_timesteps
        self.p_uncond = base.p_uncond
        self.eval()

    @property
    def camera_embedding(self) -> nn.Module:
        return self.unet.class_embedding

    def lora_parameters(self) -> list[nn.Parameter]:
        """The trainable tensors: LoRA's A and B, and the camera embedding."""
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> "StableDiffusionLoRAPrior":
        return super().train(False)

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        dt = self.unet.conv_in.weight.dtype
        camera = cond.get("camera")
        if camera is None:
            camera = torch.zeros(x_t.shape[0], CAMERA_DIM, device=x_t.device)
        text = cond.get("text_lora", cond["text"])
        labels = camera.to(self.camera_embedding.linear_1.weight.dtype)
        out = self.unet(x_t.to(dt), t, encoder_hidden_states=text.to(dt), class_labels=labels).sample
        return out.to(x_t.dtype)

    def drop_text(self, cond: Cond, mask: Tensor) -> Cond:
        """The branch with the camera of rows ``mask`` zeroed (the text stays)."""
        camera = cond.get("camera")
        if camera is None:
            return dict(cond)
        return {**cond, "camera": camera.masked_fill(mask.view(-1, 1), 0.0)}

    def tie_to(self, unet: nn.Module) -> None:
        """Point the twin's frozen tensors back at ``unet``'s wherever a move gave them new ones
        (a conversion that could not happen in place), so the weights stay stored once."""
        own = {**dict(unet.named_parameters()), **dict(unet.named_buffers())}
        for mod_name, mod in self.unet.named_modules():
            for store in (mod._parameters, mod._buffers):
                for key, value in store.items():
                    if value is None or (isinstance(value, nn.Parameter) and value.requires_grad):
                        continue
                    full = f"{mod_name}.{key}".replace(".base_layer", "") if mod_name else key
                    src = own.get(full)
                    if src is not None and src is not value:
                        store[key] = src


@dataclass
class StableDiffusionWeights:
    """The config keys of every guidance built on Stable Diffusion weights."""

    pretrained_model_name_or_path: str = DEFAULT_SD_MODEL
    """A diffusers Stable Diffusion folder, or a Hugging Face id found in the local cache (SD 1.x,
    2.0, 2.1-base, 2.1; e.g. stable-diffusion-v1-5/stable-diffusion-v1-5). Never downloaded: fetch it
    once with ``hf download <id>``. Recipes set it to ``${sd_model}``."""
    revision: Optional[str] = None
    """A Hugging Face revision (branch, tag or commit) to look up in the cache."""
    half_precision_weights: bool = True
    """Keep the UNet and VAE in float16 while the guidance is on CUDA (float32 on CPU and MPS, and
    back to float32 if moved off CUDA). Ignored when torch_dtype is set."""
    torch_dtype: Optional[Literal["float16", "bfloat16", "float32"]] = None
    """A fixed dtype for the UNet and VAE on every device; null: as half_precision_weights says."""
    enable_attention_slicing: bool = False
    """Compute attention one head slice at a time: less memory, a little slower."""
    enable_channels_last: bool = False
    """Store the UNet in channels-last memory format (faster convolutions on recent GPUs)."""
    enable_sequential_cpu_offload: bool = False
    """Keep the UNet and VAE weights in CPU memory and bring each layer to the GPU only while it runs
    (accelerate's cpu_offload): far less GPU memory, much slower. Needs CUDA and accelerate."""
    compile_unet: bool = False
    """torch.compile the UNet (compiled on the first step; pays off on long runs on GPUs)."""


class _StableDiffusionPrior(LatentDiffusionWeights):
    """What guidances on Stable Diffusion share: finding and loading the weights, their dtype per device
    (and the working resolution, from :class:`~lift3d.guidance.latent_diffusion.LatentDiffusionWeights`)."""

    prior_family = "stable-diffusion"
    prior_inputs = frozenset({"prompt_embeddings"})

    @classmethod
    def resolve(cls, cfg: Any, key: str = "system.guidance") -> Path:
        """The folder of ``cfg``'s weights, or :class:`~lift3d.utils.hub.MissingWeightsError`."""
        from lift3d.utils.hub import resolve_weights

        return resolve_weights(cfg.pretrained_model_name_or_path, key=f"{key}.pretrained_model_name_or_path",
                               required=REQUIRED_FILES, revision=cfg.revision).path

    def build_prior(self) -> StableDiffusionPrior:
        from lift3d.utils.hub import MissingWeightsError

        c, key = self.cfg, self._cfg_key
        folder = self.resolve(c, key)
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        offload = self._offload_device()
        # float32 unless fixed or offloaded: the dtype follows the device the guidance moves to (see _apply).
        dtype = weights_dtype(c.torch_dtype, c.half_precision_weights, on_cuda=offload is not None)
        try:
            unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype,
                                                        local_files_only=True)
            vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, local_files_only=True)
            # Only the noise schedule and the parameterisation are used (any scheduler's config has them).
            scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
        except (OSError, ValueError) as exc:
            raise MissingWeightsError(
                f"config key '{key}.pretrained_model_name_or_path' = {c.pretrained_model_name_or_path!r}: the folder "
                f"{folder} does not load as a diffusers Stable Diffusion model (interrupted download?): {exc}") from exc
        prior = StableDiffusionPrior(unet, vae, scheduler.alphas_cumprod, scheduler.config.prediction_type,
                                     scheduler.config.num_train_timesteps, self.name())
        if c.enable_channels_last:
            unet.to(memory_format=torch.channels_last)
        if c.enable_attention_slicing:
            unet.set_attention_slice("max")
        if c.compile_unet:
            unet.compile()
        if offload is not None:
            offload_to(prior, offload)
        return prior

    def _offload_device(self) -> torch.device | None:
        if not self.cfg.enable_sequential_cpu_offload:
            return None
        if not torch.cuda.is_available():
            warnings.warn(f"{self.name()}: enable_sequential_cpu_offload needs CUDA; ignored on this machine",
                          RuntimeWarning, stacklevel=3)
            return None
        return torch.device("cuda", torch.cuda.current_device())

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        prior = self.__dict__.get("prior")
        if prior is not None and prior.offloaded:
            # accelerate's hooks own the weights (kept on the CPU, brought to the GPU per layer):
            # only the schedule moves; the weights must not be touched.
            prior.alphas_cumprod = fn(prior.alphas_cumprod)
            return super(DiffusionGuidance, self)._apply(fn, *args, **kwargs)
        # the weights move with the guidance, then take the new device's dtype (LatentDiffusionWeights)
        return super()._apply(fn, *args, **kwargs)


def offload_to(prior: StableDiffusionPrior, device: torch.device) -> None:
    """Sequential CPU offload of the prior's UNet and VAE: each layer runs on ``device`` with its
    weights brought there for the call only (accelerate's ``cpu_offload``)."""
    try:
        from accelerate import cpu_offload
    except ImportError as exc:
        raise ConfigError(f"{prior.guidance_name}: enable_sequential_cpu_offload needs the accelerate package "
                          "(pip install accelerate)") from exc
    cpu_offload(prior.unet, execution_device=device)
    cpu_offload(prior.vae, execution_device=device)
    prior.alphas_cumprod = prior.alphas_cumprod.to(device)
    prior.offloaded = True


@register("stable-diffusion-guidance")
class StableDiffusionGuidance(_StableDiffusionPrior, SDSGuidance):
    """SDS with Stable Diffusion in its latent space (DreamFusion as threestudio runs it); ``loss_sds``,
    and ``loss_sds_img`` with ``hifa_image_loss``."""

    @dataclass
    class Config(SDSGuidance.Config, StableDiffusionWeights):
        guidance_scale: Scheduled = 100.0
        """Classifier-free guidance scale ``s``: the guided noise is ``e_u + s (e_c - e_u)`` (``e_c``
        the prompt's prediction, ``e_u`` the negative prompt's or the empty text's; s = 1 is the
        prompt alone), with Perp-Neg's negative term added inside the bracket. DreamFusion needs a
        large scale (100). threestudio's stable-diffusion-guidance writes ``e_c + s (e_c - e_u)`` when
        Perp-Neg is off, which is ``e_u + (s + 1)(e_c - e_u)``: its ``guidance_scale: 100`` is ours
        101; with Perp-Neg on it uses ``e_u + s (...)``, the same number as ours."""
        image: Literal["rgb", "normal", "latents"] = "rgb"
        """What is scored: the render (VAE-encoded), its normal map (VAE-encoded; Fantasia3D's
        geometry stage), or latents taken as they are (see latents_source): no VAE."""
        latents_source: Literal["renderer", "normal-mask"] = "renderer"
        """With image: latents, where the 4 latent channels come from: the renderer's comp_latents,
        or Fantasia3D's shortcut, the normal map mapped to [-1, 1] stacked with the opacity. Either is
        resized (bilinearly) to the UNet's latent size."""
        hifa_image_loss: bool = False
        """Also return HiFA's image-space term ``loss_sds_img`` (weight it with lambda_sds_img): the
        one-step clean estimate is decoded by the VAE and the render (at the working resolution)
        pulled towards it with gradient ``w(t) sqrt(a_t / (1 - a_t)) (x - x0_hat)``, the pixel twin of
        SDS's latent gradient (clipped the same way). A VAE decode per step; not with image: latents."""
        return_denoised: bool = False
        """Decode the one-step clean estimate into the diagnostics as ``denoised`` [B, h, w, 3]
        (a VAE decode per step; free when hifa_image_loss is on)."""

    cfg: Config

    @classmethod
    def requires(cls, cfg: Any) -> frozenset[str]:
        extra = {"normals", "opacity"} if cfg.image == "latents" and cfg.latents_source == "normal-mask" else set()
        return super().requires(cfg) | extra

    def configure(self) -> None:
        if self.cfg.hifa_image_loss and self.cfg.image == "latents":
            raise ConfigError(f"{self.name()}: hifa_image_loss compares decoded images with the render, but "
                              "image: latents has no image render; turn one of them off")
        super().configure()

    def scored_image(self, inp: GuidanceInput) -> Tensor:
        if self.cfg.image != "latents":
            return super().scored_image(inp)
        if self.cfg.latents_source == "normal-mask":
            if inp.normal is None or inp.opacity is None:
                raise ValueError(f"{self.name()} latents_source: normal-mask needs the renderer's normal map "
                                 "(comp_normal) and opacity")
            latents = torch.cat([inp.normal * 2 - 1, inp.opacity], dim=-1)
        else:
            latents = inp.latents
            if latents is None:
                raise ValueError(f"{self.name()} image: latents needs a renderer that returns comp_latents "
                                 "(or latents_source: normal-mask)")
        return self.prior.encode_latents(latents.permute(0, 3, 1, 2))

    def forward(self, inp: GuidanceInput, t: Tensor | None = None, noise: Tensor | None = None) -> GuidanceOutput:
        c = self.cfg
        s = self.score(inp, t, noise)
        losses = {"loss_sds": self.distillation_target(s.x, s.grad)}
        diagnostics = s.diagnostics
        if c.hifa_image_loss or c.return_denoised:
            with torch.no_grad():
                diagnostics["denoised"] = self.prior.decode(s.denoised())
        if c.hifa_image_loss:
            img = self.prior.resize(inp.normal if c.image == "normal" else inp.rgb)
            a = s.a
            with torch.no_grad():
                target = diagnostics["denoised"].permute(0, 3, 1, 2).to(img.dtype)
                grad_img = self.process_grad(s.w * (a / (1 - a)).sqrt() * (img.detach() - target))
            losses["loss_sds_img"] = self.distillation_target(img, grad_img)
            diagnostics["grad_img_norm"] = grad_img.norm()
        return GuidanceOutput(losses=losses, diagnostics=diagnostics)


__all__ = ["DEFAULT_SD_MODEL", "DEFAULT_LORA_TARGETS", "CAMERA_DIM", "StableDiffusionPrior", "StableDiffusionLoRAPrior",
           "StableDiffusionWeights", "StableDiffusionGuidance", "weights_dtype", "offload_to", "weight_sharing_copy"]
