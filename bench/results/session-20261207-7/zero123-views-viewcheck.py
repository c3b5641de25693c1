import json, sys, numpy as np, imageio.v3 as iio
from pathlib import Path
from lift3d.priors.toyworld.image import render_rgba
folder, prompt = Path(sys.argv[1]), sys.argv[2]
cams = json.load(open(folder / "cameras.json"))["views"]
for c in cams:
    v = iio.imread(folder / c["file"]).astype(np.float32) / 255
    gt = render_rgba(prompt, c["elevation"], c["azimuth"], c["distance"], c["fovy"], resolution=v.shape[0], supersample=2)
    m = v[..., :3].max(-1) > 0.15
    g = gt[..., 3] > 127
    iou = (m & g).sum() / max((m | g).sum(), 1)
    # best IoU over image shifts (-4..4 px), and of the mirrored view
    print(c["file"], c["elevation"], c["azimuth"], f"mask IoU {iou:.3f}", f"fg px view {m.sum()} gt {g.sum()}",
          f"colour err {np.abs(v[..., :3][m & g] - gt[..., :3][m & g] / 255).mean():.3f}")
