"""SyncDreamer (Liu et al., ICLR 2024): 16 views of an object from one image, denoised jointly.

* :mod:`.cameras`: the 16 fixed cameras, in SyncDreamer's matrices and in lift3d's frame.
* :mod:`.network`: the spatial volume, the frustum volumes and the depth-wise attention, around
  diffusers' UNet.
* :mod:`.model`: the networks together and one guided denoising step over the views.
* :mod:`.checkpoint`: the released ``syncdreamer-pretrain.ckpt`` through an explicit key map.
* :mod:`.sampler`: the authors' DDIM sampler; :mod:`.input`: the input image's framing.

``python -m lift3d.priors.syncdreamer sample --image in.png --elevation 30 --out DIR`` writes the
views as a views folder (:mod:`lift3d.priors.zero123pp.views`). Only the light modules load here.
"""

from lift3d.priors.syncdreamer.cameras import AZIMUTHS, ELEVATION, FOVY, N_VIEWS, view_table

__all__ = ["AZIMUTHS", "ELEVATION", "FOVY", "N_VIEWS", "view_table"]
