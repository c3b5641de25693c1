"""$LIFT3D_EXTENSIONS must name folders that exist: a typo there is an error, not a plugin quietly missing."""

from __future__ import annotations

import os

import pytest

import lift3d.registry as registry
from lift3d.launch import main
from lift3d.registry import ExtensionPathError, PluginImportError, extension_dirs, load_plugins


@pytest.fixture(autouse=True)
def _no_plugins_recorded(monkeypatch):
    monkeypatch.setattr(registry, "_loaded_plugin_paths", set())


def test_a_folder_that_does_not_exist_is_an_error_naming_the_variable_and_the_path(tmp_path, monkeypatch):
    good, missing = tmp_path / "plugins", tmp_path / "plugnis"
    good.mkdir()
    monkeypatch.setenv("LIFT3D_EXTENSIONS", os.pathsep.join([str(good), str(missing)]))
    with pytest.raises(ExtensionPathError, match=rf"\$LIFT3D_EXTENSIONS names the plugin folder '{missing}', "
                                                 r"which does not exist"):
        load_plugins(root=tmp_path / "nowhere")
    assert issubclass(ExtensionPathError, PluginImportError)  # launch reports it in one line


def test_a_file_is_not_a_plugin_folder(tmp_path, monkeypatch):
    (tmp_path / "plugin.py").write_text("")
    monkeypatch.setenv("LIFT3D_EXTENSIONS", str(tmp_path / "plugin.py"))
    with pytest.raises(ExtensionPathError, match=r"plugin\.py', which is a file, not a folder"):
        extension_dirs()


def test_a_relative_path_is_shown_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIFT3D_EXTENSIONS", "exts")
    with pytest.raises(ExtensionPathError, match=rf"'exts' \({tmp_path / 'exts'}\), which does not exist"):
        extension_dirs()


def test_existing_folders_empty_entries_and_a_missing_repo_extensions_folder_are_fine(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    monkeypatch.setenv("LIFT3D_EXTENSIONS", os.pathsep.join(["", str(a), "", str(b), ""]))
    assert extension_dirs(tmp_path / "nowhere") == [tmp_path / "nowhere" / "extensions", a, b]
    load_plugins(root=tmp_path / "nowhere")


def test_launch_stops_with_one_line_naming_the_variable(tmp_path, monkeypatch, capsys, tiny_recipe):
    monkeypatch.setenv("LIFT3D_EXTENSIONS", str(tmp_path / "missing"))
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(tiny_recipe), "--train", f"exp_root_dir={tmp_path / 'out'}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "LIFT3D_EXTENSIONS" in err[0] and str(tmp_path / "missing") in err[0]
    assert not (tmp_path / "out").exists()
