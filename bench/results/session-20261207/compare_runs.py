"""Compare two trial folders per recipe (/tmp/cmp/old and /tmp/cmp/new): the final state dicts and exported OBJ."""
import sys, glob, filecmp, torch
for r in sys.argv[1:]:
    a = torch.load(glob.glob(f"/tmp/cmp/old/{r}/*/ckpts/last.ckpt")[0], weights_only=True, map_location="cpu")
    b = torch.load(glob.glob(f"/tmp/cmp/new/{r}/*/ckpts/last.ckpt")[0], weights_only=True, map_location="cpu")
    sa, sb = a["state_dict"], b["state_dict"]
    keys = set(sa) & set(sb)
    d = max(float((sa[k].float() - sb[k].float()).abs().max()) for k in keys if sa[k].shape == sb[k].shape)
    oa = sorted(glob.glob(f"/tmp/cmp/old/{r}/*/save/it*-export/model.obj"))[-1]
    ob = sorted(glob.glob(f"/tmp/cmp/new/{r}/*/save/it*-export/model.obj"))[-1]
    print(f"{r}: step {a['global_step']}/{b['global_step']}, keys only in one: {sorted(set(sa) ^ set(sb))}, "
          f"max |diff| {d}, OBJ identical: {filecmp.cmp(oa, ob, shallow=False)}")
