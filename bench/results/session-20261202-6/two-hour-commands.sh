set -e
cd /tmp/snap
source .venv/bin/activate
O=/tmp/prior2h
date +%s > $O/t0
python -m lift3d.priors.toyworld train steps=6000 threads=2 autocast=bf16 out_dir=$O/run1 \
    model.ray_conditioning=true model.camera_harmonics=4 feature_weight=10 corner_weight=4 \
    region_weight_final=0.25 'focus_prompts=[a snowman,a chair,a mug]' focus_fraction=0.25 > $O/run1.log 2>&1
date +%s > $O/t1
python -m lift3d.priors.toyworld train steps=1500 autocast=bf16 lr=1e-4 warmup_steps=50 ema_decay=0.998 threads=2 \
    init_from=$O/run1/toyworld.safetensors model.ray_conditioning=true \
    model.camera_harmonics=4 'focus_prompts=[a snowman,a chair,a mug]' focus_fraction=0.2 \
    feature_weight=4 min_snr_gamma=null out_dir=$O/run2 > $O/run2.log 2>&1
date +%s > $O/t2
