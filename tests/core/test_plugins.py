from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

import lift3d.registry as registry
from lift3d.launch import run
from lift3d.registry import PluginImportError, find, load_plugins

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "extensions" / "lift3d_example_guidance"


pytestmark = pytest.mark.usefixtures("fresh_plugins")


def test_plugin_folder_from_env_is_discovered(tmp_path, monkeypatch):
    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "my_plugin.py").write_text(textwrap.dedent("""
        from lift3d import register
        from lift3d.guidance.base import BaseGuidance

        @register("env-folder-guidance")
        class EnvFolderGuidance(BaseGuidance):
            pass
    """))
    monkeypatch.setenv("LIFT3D_EXTENSIONS", str(tmp_path / "plug"))
    load_plugins(root=tmp_path / "nowhere")
    assert find("env-folder-guidance", "guidance").__name__ == "EnvFolderGuidance"


def test_broken_plugin_stops_with_its_path_and_traceback(tmp_path, monkeypatch):
    pkg = tmp_path / "ext" / "extensions" / "broken_plugin"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("import nonexistent_module_xyz\n")
    with pytest.raises(PluginImportError) as err:
        load_plugins(root=tmp_path / "ext")
    msg = str(err.value)
    assert str(pkg) in msg and "nonexistent_module_xyz" in msg and "Traceback" in msg


def test_entry_point_plugins_are_loaded(monkeypatch, tmp_path):
    mod = tmp_path / "ep_plugin_mod.py"
    mod.write_text(textwrap.dedent("""
        from lift3d import register
        from lift3d.guidance.base import BaseGuidance

        @register("entry-point-guidance")
        class EntryPointGuidance(BaseGuidance):
            pass
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    from importlib.metadata import EntryPoint

    eps = [EntryPoint(name="ep-plugin", value="ep_plugin_mod", group=registry.ENTRY_POINT_GROUP)]
    import importlib.metadata as md

    monkeypatch.setattr(md, "entry_points", lambda group=None: [e for e in eps if e.group == group])
    assert registry.load_entry_point_plugins() == ["ep-plugin"]
    assert find("entry-point-guidance").__name__ == "EntryPointGuidance"

    bad = [EntryPoint(name="bad", value="no_such_module_abc", group=registry.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(md, "entry_points", lambda group=None: bad)
    with pytest.raises(PluginImportError, match="'bad' .*no_such_module_abc"):
        registry.load_entry_point_plugins()


def test_worked_example_plugin_trains_by_name(tmp_path, monkeypatch, tiny_recipe):
    plug_dir = tmp_path / "myplugins"
    shutil.copytree(EXAMPLE, plug_dir / EXAMPLE.name)
    monkeypatch.setenv("LIFT3D_EXTENSIONS", str(plug_dir))
    monkeypatch.chdir(tmp_path)  # no extensions/ folder here: the env var must do it
    code = run([
        "--config", str(tiny_recipe), "--train", f"exp_root_dir={tmp_path / 'out'}",
        "system.guidance_type=mean-color-guidance", "system.guidance={color: [0.9, 0.1, 0.2]}",
        "system.loss={lambda_color: 1.0, lambda_mse: 0}", "trainer.max_steps=40", "trainer.val_check_interval=null",
    ])
    assert code == 0
    (export,) = (tmp_path / "out" / "tiny-test").glob("*/save/it40-export/model.json")
    rgb = torch.tensor(json.loads(export.read_text())["rgb"])
    start_err = (torch.tensor([0.5, 0.5, 0.5]) - torch.tensor([0.9, 0.1, 0.2])).norm()
    assert (rgb - torch.tensor([0.9, 0.1, 0.2])).norm() < 0.5 * start_err


def test_the_guidance_written_in_the_docs_trains_by_name(tmp_path, monkeypatch, tiny_recipe):
    """docs/plugins.md's class, as printed, is under 40 lines and trains: the doc cannot drift."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "plugins.md").read_text()
    section = doc[doc.index("## 2. The class"):doc.index("## 3.")]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) < 40
    plug = tmp_path / "docplug"
    plug.mkdir()
    # Its own name, so it cannot collide with the shipped example that registers the same class name.
    (plug / "doc_guidance.py").write_text(code.replace('"mean-color-guidance"', '"doc-mean-color-guidance"'))
    monkeypatch.setenv("LIFT3D_EXTENSIONS", str(plug))
    monkeypatch.chdir(tmp_path)
    assert run([
        "--config", str(tiny_recipe), "--train", f"exp_root_dir={tmp_path / 'out'}",
        "system.guidance_type=doc-mean-color-guidance", "system.guidance={color: [0.9, 0.1, 0.2]}",
        "system.loss={lambda_color: 1.0, lambda_mse: 0}", "trainer.max_steps=40", "trainer.val_check_interval=null",
    ]) == 0
    (export,) = (tmp_path / "out" / "tiny-test").glob("*/save/it40-export/model.json")
    rgb = torch.tensor(json.loads(export.read_text())["rgb"])
    start_err = (torch.tensor([0.5, 0.5, 0.5]) - torch.tensor([0.9, 0.1, 0.2])).norm()
    assert (rgb - torch.tensor([0.9, 0.1, 0.2])).norm() < 0.5 * start_err
