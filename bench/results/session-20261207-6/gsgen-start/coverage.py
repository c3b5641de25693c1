import sys, glob, torch, math
from lift3d.launch import load_trained_system
from lift3d.renderers.splatting import render_gaussians
sysm = load_trained_system(glob.glob(sys.argv[1] + "/ckpts/last.ckpt")[0])
g = sysm.geometry
def c2w_at(el, az, d=2.0):
    el, az = math.radians(el), math.radians(az)
    pos = torch.tensor([d*math.cos(el)*math.cos(az), d*math.cos(el)*math.sin(az), d*math.sin(el)])
    f = -pos / pos.norm(); up = torch.tensor([0., 0., 1.])
    r = torch.linalg.cross(f, up); r = r / r.norm(); u = torch.linalg.cross(r, f)
    m = torch.eye(4); m[:3, 0] = r; m[:3, 1] = u; m[:3, 2] = -f; m[:3, 3] = pos
    return m[None]
with torch.no_grad():
    col = torch.ones(1, g.xyz.shape[0], 3)
    for res in (64, 128, 256):
        for eps in (0.3, 0.0):
            r = render_gaussians(g.xyz, g.rotation, g.get_scaling, g.get_opacity, col, c2w_at(20, 0), torch.tensor([40.0]), res, res, eps2d=eps)
            a = r["opacity"]
            print(res, eps, "coverage>0.5: %.4f  mean alpha %.4f" % ((a > 0.5).float().mean(), a.mean()))
