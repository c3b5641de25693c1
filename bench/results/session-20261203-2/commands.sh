# Version 7 of the toy-world prior (2026-12-03, second session): the packaged recipe, whole, under
# bf16 autocast, alone on both cores of this session's CPU (data cache rendered beforehand, 78 s):
# 4,221 s wall = 1 h 10 min (stages 2,518 / 652 / 540 / 506 s). Every logged loss equals the first
# session's run of the same command on a slower CPU (bench/results/session-20261203-1/), digit for digit.
python -m lift3d.priors.toyworld train threads=2 autocast=bf16 out_dir=~/.cache/lift3d/runs/e2-bf16
W=~/.cache/lift3d/runs/e2-bf16/v6-front/toyworld.safetensors   # = lift3d/priors/toyworld/weights/toyworld.safetensors now
python -m lift3d.priors.toyworld eval --n 32 --seed 1 --prompts "a snowman" "a chair" "a mug" "a red cube" "a blue cube" --weights $W   # eval-v7-n32-seed1-front.txt, 89 s
python -m lift3d.priors.toyworld eval --n 64 --seed 2 --prompts "a snowman" "a chair" "a mug" --weights $W   # eval-v7-n64-seed2-front.txt, 2 min 2 s
python -m lift3d.priors.toyworld eval --n 8 --weights $W   # eval-v7-n8-all.txt, 2 min 13 s
python bench/toyworld_t23d.py --recipes configs/tiny/dreamgaussian.yaml --prompts "a snowman" "a chair" "a mug" --threads 1   # beside the next line
python bench/toyworld_t23d.py --recipes configs/tiny/dreamgaussian.yaml --prompts "a red cone" "a purple torus" --threads 1
# then, two at a time on one thread each:
python bench/toyworld_t23d.py --recipes configs/tiny/magic3d.yaml --prompts "a red cube" --threads 1       # t23d-magic3d-v7-red-cube.*
python bench/toyworld_t23d.py --recipes configs/tiny/dreamfusion.yaml --prompts "a snowman" "a green sphere" --threads 1   # t23d-dreamfusion-v7-snowman-green-sphere.*
python bench/toyworld_t23d.py --recipes configs/tiny/dreamfusion.yaml --prompts "a chair" "a mug" --threads 1              # t23d-dreamfusion-v7-chair-mug.*
python bench/toyworld_t23d.py --recipes configs/tiny/dreamfusion.yaml --prompts "a blue cylinder" --threads 1             # t23d-dreamfusion-v7-blue-cylinder.*
python bench/prior_speed.py --threads 2 --runs 5 --autocast   # prior_speed-autocast.txt, alone
# dreamgaussian, all 33 prompts, two halves side by side, one thread each, nothing else running:
python bench/toyworld_t23d.py --recipes configs/tiny/dreamgaussian.yaml --threads 1 --prompts <list_prompts()[1::2]>   # t23d-dreamgaussian-33prompts-v7-part-a.*
python bench/toyworld_t23d.py --recipes configs/tiny/dreamgaussian.yaml --threads 1 --prompts <list_prompts()[0::2]>   # t23d-dreamgaussian-33prompts-v7-part-b.*
