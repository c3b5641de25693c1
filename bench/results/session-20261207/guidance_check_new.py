# Run in this checkout after guidance_reference_old.py: prints the largest difference of each output (0.0: identical).
import sys, torch
torch.set_num_threads(1)
from lift3d.guidance.toyworld import ToyWorldGuidance, ToyWorldVSDGuidance, ToyWorldRefineGuidance
from lift3d.guidance.base import GuidanceInput, CameraBatch
from lift3d.priors.toyworld.vocab import pad_tokens, tokenize

class PU:  # a stand-in with the processor's API
    def __init__(self, p, n=""):
        self.prompt, self.negative_prompt = p, n
        self.text_embeddings = pad_tokens([tokenize(p)])
        self.uncond = pad_tokens([tokenize(n)]) if n else torch.zeros_like(self.text_embeddings)
    def get_text_embeddings(self, el, az, d, view_dependent_prompting=True):
        B = el.shape[0]
        return self.text_embeddings.expand(B, -1), self.uncond.expand(B, -1)

ref = torch.load("/tmp/ref/ref.pt")
torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
rgb = torch.rand(4, 32, 32, 3, generator=g)
el = torch.tensor([10., 30., -5., 50.]); az = torch.tensor([0., 90., -120., 170.]); d = torch.tensor([2., 1.9, 2.1, 2.])
t = torch.tensor([100, 400, 700, 950]); noise = torch.randn(4, 3, 64, 64, generator=g)
cams = CameraBatch.from_angles(el, az, d)
worst = {}
for name, cls, cfg in [("sds", ToyWorldGuidance, {"guidance_scale": 7.5}), ("sdsneg", ToyWorldGuidance, {"guidance_scale": 5.0, "weighting": "fantasia3d"}),
                       ("vsd", ToyWorldVSDGuidance, {"guidance_scale": 7.5}), ("refine", ToyWorldRefineGuidance, {"strength": 0.4, "n_steps": 3, "guidance_scale": 5.0})]:
    m = cls(cfg)
    x = rgb.clone().requires_grad_(True)
    pu = PU("a red cube", "blue" if name == "sdsneg" else "")
    torch.manual_seed(1)
    inp = GuidanceInput(cameras=cams, rgb=x, prompt=pu)
    o = m(inp, t=None if name == "refine" else t, noise=noise)
    loss = list(o.losses.values())[0]
    loss.backward()
    worst[name + "_loss"] = float((loss.detach() - ref[name + "_loss"]).abs())
    worst[name + "_grad"] = float((x.grad - ref[name + "_grad"]).abs().max())
    if name == "vsd":
        torch.manual_seed(2)
        x2 = rgb.clone().requires_grad_(True)
        o2 = m(GuidanceInput(cameras=cams, rgb=x2, prompt=pu), t=t, noise=noise)
        o2["loss_vsd"].backward(); worst["vsd2_grad"] = float((x2.grad - ref["vsd2_grad"]).abs().max())
        worst["vsd_lora_loss"] = float((o["lora_loss"] - ref["vsd_lora_loss"]).abs())
    if name == "sds":
        torch.manual_seed(3); x3 = rgb.clone().requires_grad_(True)
        o3 = m(GuidanceInput(cameras=cams, rgb=x3, prompt=pu)); o3["loss_sds"].backward()
        worst["sds_rand_grad"] = float((x3.grad - ref["sds_rand_grad"]).abs().max()); worst["sds_rand_t"] = float((o3["t"] - ref["sds_rand_t"]).abs().max())
print(worst)
