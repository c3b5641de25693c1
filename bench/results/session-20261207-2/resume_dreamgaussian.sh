set -e
cd /tmp/rcrepo
PY=/work/main/.venv/bin/python
export OMP_NUM_THREADS=1 PYTHONPATH=/tmp/rcrepo
$PY launch.py --config configs/tiny/dreamgaussian.yaml --train "prompt=a red cube" exp_root_dir=/tmp/rc/a use_timestamp=false checkpoint.every_n_train_steps=60 checkpoint.keep_all=true trainer.enable_progress_bar=false data.n_test_views=4
mkdir -p /tmp/rc/b && cp -r /tmp/rc/a/dreamgaussian /tmp/rc/b/ && rm -rf /tmp/rc/b/dreamgaussian/a_red_cube/save
T=/tmp/rc/b/dreamgaussian/a_red_cube
$PY launch.py --config $T/configs/parsed.yaml --train "resume=$T/ckpts/step=120.ckpt" trainer.enable_progress_bar=false
$PY - <<'PY'
import torch, trimesh
a = torch.load('/tmp/rc/a/dreamgaussian/a_red_cube/ckpts/last.ckpt', weights_only=True)
b = torch.load('/tmp/rc/b/dreamgaussian/a_red_cube/ckpts/last.ckpt', weights_only=True)
sa, sb = a['state_dict'], b['state_dict']
print('keys equal', sa.keys() == sb.keys(), 'steps', a['global_step'], b['global_step'])
print('all tensors equal', all(torch.equal(sa[k], sb[k]) for k in sa if torch.is_tensor(sa[k])))
for t in 'ab':
    m = trimesh.load(f'/tmp/rc/{t}/dreamgaussian/a_red_cube/save/it350-export/model.obj', force='mesh', process=False)
    print(t, 'vertices', len(m.vertices), 'faces', len(m.faces))
PY
