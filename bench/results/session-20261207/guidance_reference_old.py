# Run with the old tree (git archive 9f97226) unpacked at /tmp/oldtree: saves the old guidances outputs.
# Runs the OLD guidances (from git HEAD, checked out to /tmp/oldtree) on fixed inputs; saves outputs.
import sys, torch
sys.path.insert(0, "/tmp/oldtree")
torch.set_num_threads(1)
from lift3d.guidance.toyworld import ToyWorldGuidance
from lift3d.guidance.toyworld_vsd import ToyWorldVSDGuidance
from lift3d.guidance.toyworld_refine import ToyWorldRefineGuidance
from lift3d.prompts.base import PromptUtils
torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
rgb = torch.rand(4, 32, 32, 3, generator=g)
el = torch.tensor([10., 30., -5., 50.]); az = torch.tensor([0., 90., -120., 170.]); d = torch.tensor([2., 1.9, 2.1, 2.])
t = torch.tensor([100, 400, 700, 950]); noise = torch.randn(4, 3, 64, 64, generator=g)
out = {}
for name, cls, cfg in [("sds", ToyWorldGuidance, {"guidance_scale": 7.5}), ("sdsneg", ToyWorldGuidance, {"guidance_scale": 5.0, "weighting": "fantasia3d"}),
                       ("vsd", ToyWorldVSDGuidance, {"guidance_scale": 7.5}), ("refine", ToyWorldRefineGuidance, {"strength": 0.4, "n_steps": 3, "guidance_scale": 5.0})]:
    m = cls(cfg)
    x = rgb.clone().requires_grad_(True)
    pu = PromptUtils("a red cube", "blue" if name == "sdsneg" else "")
    torch.manual_seed(1)
    if name == "refine":
        o = m(x, pu, elevation=el, azimuth=az, camera_distances=d, noise=noise)
    else:
        o = m(x, pu, elevation=el, azimuth=az, camera_distances=d, t=t, noise=noise)
    loss = [v for k, v in o.items() if k.startswith("loss_")][0]
    loss.backward()
    out[name + "_loss"] = loss.detach(); out[name + "_grad"] = x.grad
    if name == "vsd":
        # a second call after one LoRA step: phi moved
        torch.manual_seed(2)
        x2 = rgb.clone().requires_grad_(True)
        o2 = m(x2, pu, elevation=el, azimuth=az, camera_distances=d, t=t, noise=noise)
        o2["loss_vsd"].backward(); out["vsd2_grad"] = x2.grad; out["vsd_lora_loss"] = o["lora_loss"]
    # unseeded t draw order check
    if name == "sds":
        torch.manual_seed(3); x3 = rgb.clone().requires_grad_(True)
        o3 = m(x3, pu, elevation=el, azimuth=az, camera_distances=d); o3["loss_sds"].backward(); out["sds_rand_grad"] = x3.grad; out["sds_rand_t"] = o3["t"]
torch.save(out, "/tmp/ref/ref.pt")
print({k: float(v.float().abs().sum()) for k, v in out.items()})
