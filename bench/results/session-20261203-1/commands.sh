python -m lift3d.priors.toyworld train threads=2 autocast=bf16 out_dir=~/.cache/lift3d/runs/e1-bf16   # alone on both cores, data cache already rendered; 8768 s wall
