"""ViewDiff (Höllein et al., CVPR 2024, "ViewDiff: 3D-Consistent Image Generation with Text-to-Image
Models") built on diffusers parts: a Stable Diffusion UNet whose views of an object attend to each
other through a pose-conditioned LoRA and share a 3D feature volume.

No ViewDiff checkpoint is published, so lift3d ships the method, not weights:

* :mod:`.cameras`: the camera conventions and the per-view condition vector;
* :mod:`.attention`: cross-frame attention with a conditioned LoRA (a diffusers attention processor);
* :mod:`.projection`: the projection layer (unproject, aggregate, 3D CNN, volume-render back);
* :mod:`.model`: :class:`ViewDiffUNet`, the wrapper that installs both on a frozen SD UNet, and
  the loading and saving of the added tensors;
* :mod:`.data` and :mod:`.train`: the multi-view dataset layout and the training loop
  (``python -m lift3d.priors.viewdiff train root=... base_model=... out_dir=...``);
* :mod:`.sample`: the autoregressive sampler (``python -m lift3d.priors.viewdiff sample --prompt ...``).

``viewdiff-guidance`` (:mod:`lift3d.guidance.viewdiff`) distils trained weights into a 3D asset.
Heavy imports (diffusers, transformers) happen only when a network is built or loaded.
"""

from lift3d.priors.viewdiff.cameras import COND_DIM, intrinsics_from_fovy, view_condition
from lift3d.priors.viewdiff.model import (
    DEFAULT_BASE_MODEL,
    TRAIN_COMMAND,
    WEIGHTS_NAME,
    ViewDiffConfig,
    ViewDiffUNet,
)

__all__ = ["COND_DIM", "intrinsics_from_fovy", "view_condition", "DEFAULT_BASE_MODEL", "TRAIN_COMMAND", "WEIGHTS_NAME",
           "ViewDiffConfig", "ViewDiffUNet"]
