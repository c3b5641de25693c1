"""Zero123++ (Shi et al. 2023): one image to six consistent views, and the folder those views live in.

* :mod:`.poses`: the six fixed cameras of v1.1 and v1.2 in lift3d's world frame; the 3x2 grid.
* :mod:`.attention`: reference attention as a diffusers attention processor.
* :mod:`.model`: the networks and their conditioning (ramped CLIP embedding, latent and image
  scaling), loaded from the published diffusers folder.
* :mod:`.sampler`: Euler-ancestral / DDIM sampling with classifier-free guidance.
* :mod:`.views`: the views folder (images + ``cameras.json``) that reconstruction reads.

``python -m lift3d.priors.zero123pp sample --image in.png --out DIR`` samples the views of one image.
Only the light modules are imported here; the networks load on first use.
"""

from lift3d.priors.zero123pp.poses import POSE_TABLES, pose_table, tile, untile, view_cameras

__all__ = ["POSE_TABLES", "pose_table", "tile", "untile", "view_cameras"]
