"""Resuming from last.ckpt continues bit for bit: every geometry, every Gaussian densification strategy.

Each case shrinks a recipe of ``configs/tiny`` (tiny renders, few steps), trains it N steps without
a break, then k steps, saves ``last.ckpt`` and resumes to N in a fresh system built after a
different global seed, the way ``launch.py`` builds it. Every tensor of the two final systems and of
their optimizers must be equal (``torch.equal``), not merely close: state left out of a checkpoint
(densification statistics, an occupancy grid, a schedule's position) shows up as a difference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import imageio.v3 as iio
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from lift3d.config import load_config
from lift3d.geometry.gaussian_strategy import STRATEGIES
from lift3d.launch import load_experiment
from lift3d.registry import find, registered
from lift3d.utils.checkpoint import AtomicCheckpointIO, LastCheckpoint

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny"


def tiny_recipe(tmp: Path, name: str, edit: Callable[[dict, Path], None]) -> Path:
    """``configs/tiny/<name>`` with 16 px renders, one camera per step and ``edit`` applied, written to ``tmp``."""
    raw_cfg, _ = load_config(TINY / name)
    raw = OmegaConf.to_container(raw_cfg, resolve=False)
    raw["data"] = {**raw.get("data", {}), "height": 16, "width": 16, "batch_size": 1,
                   "eval_height": 16, "eval_width": 16, "n_val_views": 1, "n_test_views": 1}
    edit(raw, tmp)
    path = tmp / name
    path.write_text(yaml.safe_dump(raw))
    return path


def train(recipe: Path, steps: int, root: Path, seed_before: int, resume: Path | None = None) -> tuple[Any, Any]:
    """Train like ``launch.py --train`` (minus validation, test renders and export) up to ``steps``."""
    cfg, _, prov = load_experiment(str(recipe), [])
    pl.seed_everything(seed_before, verbose=False)
    system = find(cfg.system_type, "system")(cfg.system, cfg_key="system", prov=prov, seed=cfg.seed,
                                             save_dir=root / "save")
    plan = [(start, dict(st.data)) for start, st in zip(system.stage_starts(), system.cfg.stages)]
    dm = find(cfg.data_type, "data")(cfg.data, cfg_key="data", prov=prov, seed=cfg.seed, stage_plan=plan)
    system.check_data(dm)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, plugins=[AtomicCheckpointIO()], default_root_dir=str(root), inference_mode=False,
        callbacks=[LastCheckpoint(root / "ckpts", every_n_train_steps=0)],
    )
    trainer.fit(system, datamodule=dm, ckpt_path=str(resume) if resume else None, weights_only=True)
    assert trainer.global_step == steps
    return system, trainer


def assert_identical(a: Any, b: Any, where: str) -> None:
    """Tensors equal bit for bit (shapes included), recursively through dicts and lists."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b), f"{where}: a tensor on one side only"
        assert a.shape == b.shape, f"{where}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where}: values differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def check_resume_is_exact(tmp: Path, recipe: Path, total: int, stop: int) -> tuple[Any, Any]:
    seed = yaml.safe_load(recipe.read_text()).get("seed", 0)
    full, full_tr = train(recipe, total, tmp / "full", seed)
    train(recipe, stop, tmp / "part", seed)
    ckpt = tmp / "part" / "ckpts" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == stop
    # The resumed process starts from another global RNG state: nothing may depend on it.
    resumed, res_tr = train(recipe, total, tmp / "resumed", seed + 1000, resume=ckpt)
    assert type(full.geometry) is type(resumed.geometry)
    assert_identical(full.state_dict(), resumed.state_dict(), "state_dict")
    for i, (a, b) in enumerate(zip(full_tr.optimizers, res_tr.optimizers)):
        assert_identical(a.state_dict(), b.state_dict(), f"optimizer[{i}]")
    # Guidances that learn (VSD's LoRA and its own optimizer) are part of the state too.
    assert full._guidances.keys() == resumed._guidances.keys()
    for name, g in full._guidances.items():
        if any(p.requires_grad for p in g.parameters()):
            assert_identical(dict(g.state_dict()), dict(resumed._guidances[name].state_dict()), f"guidance {name}")
    return full, resumed


# ---------------------------------------------------------------------------------------------
# The cases: one per geometry (and per Gaussian strategy), each from a tiny recipe


def _hash_grid(raw: dict, tmp: Path) -> None:
    raw["system"]["geometry"].update(isosurface_resolution=16)
    raw["system"]["geometry"]["pos_encoding_config"].update(n_levels=4, log2_hashmap_size=10)
    raw["system"]["renderer"].update(num_samples_per_ray=16)


def implicit_volume(raw: dict, tmp: Path) -> None:
    """DreamFusion: hash-grid NeRF, occupancy grid updated during training, SDS on the toy prior."""
    _hash_grid(raw, tmp)
    # Updates of the occupancy grid before and after the resume point.
    raw["system"]["renderer"].update(grid_resolution=8, occ_warmup_steps=2, occ_update_interval=2)
    raw["system"]["loss"]["lambda_opaque"] = [2, 0.0, 10.0, 6]


def implicit_sdf(raw: dict, tmp: Path) -> None:
    """NeuS on ground-truth renders: SDF hash grid, learnt sharpness in the renderer, eikonal term."""
    _hash_grid(raw, tmp)


def dmtet(raw: dict, tmp: Path) -> None:
    """Magic3D: one NeRF step, the switch to DMTet, the resume in the DMTet stage."""
    _hash_grid(raw, tmp)
    coarse, fine = raw["system"]["stages"]
    coarse["steps"] = 1
    fine["steps"] = 5
    fine["geometry"].update(isosurface_resolution=12, feature_fit_steps=3, feature_grid_max_resolution=16)
    fine["data"] = {}


def gaussians(strategy: str) -> Callable[[dict, Path], None]:
    def edit(raw: dict, tmp: Path) -> None:
        """DreamGaussian's Gaussian stage: densify at steps 3 and 6, statistics gathered in between."""
        raw["system"]["geometry"].update(
            strategy=strategy, n_init=200, densify_from_iter=1, densification_interval=3, densify_until_iter=7,
            # A threshold that some Gaussians pass and others do not, so the statistics decide which.
            densify_grad_threshold=5.0, opacity_reset_interval=0, max_num=100_000, isosurface_resolution=16,
            # Pruning by screen size reads the largest radii seen since the last pass.
            max_screen_size=4.5)
        raw["system"]["stages"] = [{"name": "gaussians", "steps": 8}]
    return edit


def fixed_mesh(texture: str) -> Callable[[dict, Path], None]:
    def edit(raw: dict, tmp: Path) -> None:
        """DreamGaussian to its texture stage: a mesh from the Gaussians, its appearance refined."""
        raw["system"]["geometry"].update(n_init=200, densify_from_iter=100, isosurface_resolution=16)
        gs, tex = raw["system"]["stages"]
        gs["steps"] = 2
        tex["steps"] = 4
        tex["geometry"].update(texture=texture, texture_size=32, feature_fit_steps=3, feature_grid_max_resolution=16)
        tex["guidance"]["n_steps"] = 2
        if texture == "field":
            tex["optimizer"] = {"params": {"geometry.feature_field": {"lr": 0.01}}}
        tex["data"] = {}
    return edit


def vsd(raw: dict, tmp: Path) -> None:
    """ProlificDreamer's NeRF stage: VSD trains a LoRA with its own optimizer inside the guidance."""
    _hash_grid(raw, tmp)
    raw["system"]["stages"] = [{"name": "nerf", "steps": 5}]


def image_to_3d(raw: dict, tmp: Path) -> None:
    """One image to 3D: the single-image data module's reference view next to random views."""
    _hash_grid(raw, tmp)
    img = np.zeros((16, 16, 4), dtype=np.uint8)
    img[4:12, 5:11] = [200, 40, 40, 255]
    iio.imwrite(tmp / "input.png", img)
    raw["image"] = str(tmp / "input.png")
    raw["data"].update(ref_height=16, ref_width=16)


CASES = {
    "implicit-volume": ("dreamfusion.yaml", implicit_volume, 6, 3),
    "implicit-sdf": ("reference-neus.yaml", implicit_sdf, 5, 2),
    "tetrahedra-sdf-grid": ("magic3d.yaml", dmtet, 6, 4),
    # Resumed right before the switch: the conversion (new random feature grids) runs in the resumed process.
    "tetrahedra-sdf-grid[at-switch]": ("magic3d.yaml", dmtet, 6, 1),
    **{f"gaussian-splatting[{s}]": ("dreamgaussian.yaml", gaussians(s), 8, 6) for s in STRATEGIES},
    "mesh[uv]": ("dreamgaussian.yaml", fixed_mesh("uv"), 6, 4),
    "mesh[field]": ("dreamgaussian.yaml", fixed_mesh("field"), 6, 4),
    "implicit-volume[vsd]": ("prolificdreamer.yaml", vsd, 5, 2),
    "implicit-volume[image]": ("image-to-3d.yaml", image_to_3d, 5, 2),
}


def test_every_builtin_geometry_and_strategy_has_a_resume_case():
    builtin = {n for n in registered("geometry") if find(n, "geometry").__module__.startswith("lift3d.")}
    covered = {name.split("[")[0] for name in CASES}
    assert builtin <= covered, f"no resume-equivalence case for {sorted(builtin - covered)}"
    assert {f"gaussian-splatting[{s}]" for s in STRATEGIES} <= set(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_equals_the_uninterrupted_run(case, tmp_path):
    config, edit, total, stop = CASES[case]
    full, resumed = check_resume_is_exact(tmp_path, tiny_recipe(tmp_path, config, edit), total, stop)
    if case.startswith("gaussian-splatting["):
        check_densification_state_was_saved(tmp_path / "part" / "ckpts" / "last.ckpt", resumed, case[19:-1])


def check_densification_state_was_saved(ckpt: Path, resumed: Any, strategy: str) -> None:
    """The resume point is in the middle of densification: last.ckpt holds the statistics the next
    pass reads, and that pass changes the set (without them the resumed run ends with other Gaussians)."""
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    saved, n_saved = state["geometry._extra_state"], state["geometry.xyz"].shape[0]
    assert saved["strategy"] == strategy
    if strategy == "default":
        for name in ("grad_accum", "denom", "max_radii"):
            assert saved["state"][name].shape == (n_saved,)
        assert saved["state"]["denom"].sum() > 0  # gathered since the pass at step 3, read at step 6
        assert resumed.geometry.num_points > n_saved  # the pass at step 6 added Gaussians


def test_gaussian_checkpoints_load_into_any_count_with_or_without_densification_state():
    make = find("gaussian-splatting", "geometry")
    a = make({"n_init": 30, "seed": 1, "init_scale": 0.05})
    a.strategy.grad_accum = torch.arange(30.0)
    a.strategy.denom = torch.full((30,), 2.0)
    state = a.state_dict()

    b = make({"n_init": 7, "seed": 2, "init_scale": 0.05})  # another count than the checkpoint's
    b.load_state_dict(state, strict=True)
    assert b.num_points == 30 and torch.equal(b.strategy.grad_accum, torch.arange(30.0))
    assert_identical(b.strategy.state_dict(), a.strategy.state_dict(), "strategy")

    # Written before the statistics were saved: loads strictly, statistics restart at zero.
    old = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    c = make({"n_init": 7, "seed": 2, "init_scale": 0.05})
    c.load_state_dict(old, strict=True)
    assert c.num_points == 30 and torch.equal(c.strategy.grad_accum, torch.zeros(30))

    # Another strategy's state means nothing to this one: fresh statistics, and a warning.
    d = make({"n_init": 7, "seed": 2, "init_scale": 0.05, "strategy": "none"})
    with pytest.warns(UserWarning, match="belongs to strategy 'default'"):
        d.load_state_dict(state, strict=True)
    assert d.num_points == 30
    e = make({"n_init": 7, "seed": 2, "init_scale": 0.05})
    with pytest.warns(UserWarning, match="belongs to strategy 'none'"):
        e.load_state_dict(d.state_dict(), strict=True)
    assert e.num_points == 30 and torch.equal(e.strategy.denom, torch.zeros(30))
