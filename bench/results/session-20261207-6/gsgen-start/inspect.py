import sys, torch, glob
from lift3d.launch import load_trained_system
ck = glob.glob(sys.argv[1] + "/ckpts/last.ckpt")[0]
sysm = load_trained_system(ck)
g = sysm.geometry
op = torch.sigmoid(g.opacity).squeeze(-1)
sc = torch.exp(g.scaling)
print("N", g.xyz.shape[0], "xyz min", g.xyz.min(0).values, "max", g.xyz.max(0).values)
print("opacity quantiles", torch.quantile(op, torch.tensor([0.1, .5, .9, .99])))
print("scale quantiles", torch.quantile(sc.mean(-1), torch.tensor([0.1, .5, .9, .99])))
big = sc.max(-1).values > 0.2
print("big gaussians", big.sum().item(), sc[big][:10], op[big][:10], g.xyz[big][:10])
from lift3d.geometry.isosurface import opacity_matched_level
R, radius = g.cfg.isosurface_resolution, g.cfg.radius
from lift3d.geometry.gaussians import grid_points
pts = grid_points(R, radius).reshape(-1, 3)
dens, ext = g._density_and_extinction(pts)
dens, ext = dens.reshape(R,R,R), ext.reshape(R,R,R)
thr = opacity_matched_level(dens, ext, radius)
print("thr", thr, "dens quantiles", torch.quantile(dens.flatten()[::7], torch.tensor([.5,.9,.99,.999])), "max", dens.max())
m = g.isosurface()
print("mesh", m.v_pos.shape, m.v_pos.min(0).values, m.v_pos.max(0).values)
import trimesh
from lift3d.priors.toyworld.metrics import score_mesh
from lift3d.priors.toyworld.shapes import get_object
tm = trimesh.Trimesh(m.v_pos.numpy(), m.t_pos_idx.numpy())
s = score_mesh(tm, get_object(sys.argv[2]))
print("SCORE iou %.3f chamfer %.4f front %s" % (s.iou, s.chamfer, s.front_ok))
