"""MVDream (Shi et al. 2023, "MVDream: Multi-view Diffusion for 3D Generation") as a lift3d prior.

* :mod:`~lift3d.priors.mvdream.network`: the multi-view UNet, Stable Diffusion 2.1-base's UNet
  from diffusers with self-attention run jointly over the views of a group and a camera embedding
  added to the timestep embedding;
* :mod:`~lift3d.priors.mvdream.checkpoint`: the published single-file checkpoint
  (``sd-v2.1-base-4view.pt``, or the SD 1.5 model's ``sd-v1.5-4view.pt``, told apart by their keys;
  original LDM key layout) read through an explicit key map into that
  UNet, diffusers' VAE and transformers' CLIP text model;
* :mod:`~lift3d.priors.mvdream.cameras`: lift3d's camera-to-world matrices as MVDream reads them;
* :mod:`~lift3d.guidance.mvdream`: ``mvdream-guidance`` (score distillation over view
  groups, with MVDream's x0-reconstruction loss).

The text side is ``mvdream-prompt-processor`` (:mod:`lift3d.prompts.mvdream`). Nothing is imported
here, so reading the cameras module does not pull in diffusers.
"""
