"""Which parameters to train: short fine-tunes from version 7, loss on fixed held-out batches."""
import sys, json, torch
from lift3d.priors.toyworld.viewdiff import train_viewdiff_recipe, ViewDiffToyPrior
from lift3d.priors.toyworld.multiview_train import MultiViewDataset, multiview_loss
from lift3d.priors.toyworld.model import make_scheduler
label, train_unet, lr, steps = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
GPB = int(__import__("os").environ.get("GPB", "4"))
def held_loss(model):
    import os
    ds = MultiViewDataset(GPB, 0, 4000, 4, 64, os.path.expanduser("~/.cache/lift3d/toyworld"),
                          ["a snowman", "a chair", "a mug"], 0.2, False, feature_regions=False)
    sched = make_scheduler(model.cfg)
    out = []
    with torch.no_grad():
        for i in range(8):
            out.append(float(multiview_loss(model.eval(), sched, ds.batch(900 + i), torch.Generator().manual_seed(100 + i), 4)))
    return sum(out) / len(out), out
if label == "before":
    print("before", held_loss(ViewDiffToyPrior.from_single_view("shipped")), flush=True); sys.exit()
out = f"/tmp/vdwhich-{label}"
import shutil; shutil.rmtree(out, ignore_errors=True)
final = train_viewdiff_recipe(None, {"threads": 1, "steps": steps, "groups_per_batch": int(__import__("os").environ.get("TRAIN_GPB", "4")), "lr": lr, "warmup_steps": 10,
                                     "train_unet": train_unet, "log_every": 10, "ckpt_every": 100000, "sample_every": 0,
                                     "out_dir": out}, progress=False)
print(label, held_loss(ViewDiffToyPrior.load(final)), flush=True)
print(open(out + "/train_log.csv").read())
