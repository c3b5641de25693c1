#!/bin/bash
# How the 2026-12-07 results were made (the foundation refactor against commit 9f97226).
set -e
# 1. The baseline tree: git archive 9f97226 | tar -x -C /tmp/oldrepo ; this commit's tree in /tmp/newrepo.
# 2. Each recipe on "a snowman", both trees side by side, one thread each, then compare_runs.py:
for r in dreamgaussian dreamfusion magic3d prolificdreamer fantasia3d; do
  for tree in old new; do
    (cd /tmp/${tree}repo && OMP_NUM_THREADS=1 python launch.py --config configs/tiny/$r.yaml --train "prompt=a snowman" \
      exp_root_dir=/tmp/cmp/$tree use_timestamp=false trainer.enable_progress_bar=false data.n_test_views=8) &
  done
  wait
done
python bench/results/session-20261207/compare_runs.py dreamgaussian dreamfusion magic3d prolificdreamer fantasia3d
# 3. Training-step time against the baseline tree, alternating child processes, alone on the machine:
for c in dreamfusion dreamgaussian prolificdreamer; do
  python bench/train_step.py --baseline-repo /tmp/oldrepo --config configs/tiny/$c.yaml --rounds 5 --warmup 3 --steps 15 --threads 2
done
# 4. Image-to-3D on all 33 objects (input rendered at elevation 10, azimuth 30), two halves side by side:
#    python bench/toyworld_t23d.py --recipes configs/tiny/image-to-3d.yaml --prompts <half> --image-camera 10,30 \
#        --out bench/results/session-20261207/i23d-part<k>
