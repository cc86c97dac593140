"""The ComfyUI launcher's choices, without starting ComfyUI: which Python, the extra_model_paths.yaml it
writes, skipping with a reason."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from gentor import registry
from tests import comfy_server as cs


def _fake_comfy(tmp_path: Path, *venvs: str) -> Path:
    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    (comfy / "main.py").write_text("")
    for venv in venvs:
        (comfy / venv / "bin").mkdir(parents=True)
        (comfy / venv / "bin" / "python").symlink_to(sys.executable)
    return comfy


@pytest.mark.parametrize("venvs, chosen", [((".venv",), ".venv"), (("venv",), "venv"),
                                           ((".venv", "venv"), ".venv")])
def test_comfy_python_accepts_dot_venv_or_venv(tmp_path, venvs, chosen):
    comfy = _fake_comfy(tmp_path, *venvs)
    assert cs.comfy_python(comfy) == str(comfy / chosen / "bin" / "python")


def test_comfy_python_falls_back_to_the_test_interpreter(tmp_path):
    assert cs.comfy_python(_fake_comfy(tmp_path)) == sys.executable


def test_extra_model_paths_has_a_named_section_base_path_and_every_folder_key(tmp_path):
    yaml = pytest.importorskip("yaml")
    path = cs.write_extra_model_paths(tmp_path / "extra.yaml", tmp_path / "my models")
    data = yaml.safe_load(path.read_text())
    # ComfyUI's loader reads {section: {base_path: ..., <folder key>: <path relative to base_path>}}.
    assert list(data) == ["gentor_tests"]
    section = data["gentor_tests"]
    assert section.pop("base_path") == str(tmp_path / "my models")
    want = {key for spec in registry.BACKENDS for key in spec.folder_keys}
    assert section == {key: f"{key}/" for key in want}


def test_skips_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.delenv("COMFYUI_DIR", raising=False)
    with pytest.raises(pytest.skip.Exception, match="set COMFYUI_DIR"):
        cs.comfy_dir_or_skip()
    monkeypatch.setenv("COMFYUI_DIR", str(tmp_path))
    with pytest.raises(pytest.skip.Exception, match="has no main.py"):
        cs.comfy_dir_or_skip()


def test_skips_when_comfyuis_python_lacks_requirements(monkeypatch, tmp_path):
    comfy = _fake_comfy(tmp_path)
    bare = comfy / "venv" / "bin" / "python"
    bare.parent.mkdir(parents=True)
    bare.write_text("#!/bin/sh\nexit 1\n")  # a Python that cannot import anything
    bare.chmod(0o755)
    monkeypatch.setenv("COMFYUI_DIR", str(comfy))
    with pytest.raises(pytest.skip.Exception, match="lacks torch"):
        cs.comfy_dir_or_skip()


def test_server_command_is_cpu_loopback_and_quiet(tmp_path):
    srv = cs.ComfyServer(_fake_comfy(tmp_path, "venv"), tmp_path / "base")
    assert srv.cmd[1:4] == ["main.py", "--cpu", "--listen"] and "127.0.0.1" in srv.cmd
    assert srv.env["OMP_NUM_THREADS"] == "1" and srv.env["HF_HUB_OFFLINE"] == "1"
    database = srv.cmd[srv.cmd.index("--database-url") + 1]
    assert database == f"sqlite:///{tmp_path / 'base' / 'user' / 'comfyui.db'}"  # not the checkout's user/
    assert os.path.basename(os.path.dirname(os.path.dirname(srv.python))) == "venv"


def test_server_runs_from_a_checkout_view_without_the_users_model_paths(tmp_path):
    """ComfyUI's main.py reads the extra_model_paths.yaml beside its real path: the server runs a copy of
    main.py in a view of the checkout that links everything else and leaves the user's yaml out."""
    comfy = _fake_comfy(tmp_path, ".venv")
    (comfy / "main.py").write_text("print('main')\n")
    (comfy / "extra_model_paths.yaml").write_text("users:\n    base_path: /elsewhere\n    loras: loras/\n")
    (comfy / "comfy").mkdir()
    (comfy / "folder_paths.py").write_text("")
    srv = cs.ComfyServer(comfy, tmp_path / "base")
    srv.prepare()
    view = srv.checkout
    assert not (view / "extra_model_paths.yaml").exists()
    assert (view / "main.py").is_file() and not (view / "main.py").is_symlink()
    assert (view / "main.py").read_text() == "print('main')\n"
    assert (view / "comfy").resolve() == (comfy / "comfy").resolve() and (view / "folder_paths.py").is_symlink()
    assert (comfy / "extra_model_paths.yaml").is_file()  # the checkout itself is untouched
    srv.prepare()  # a restart on the same base reuses the view
    assert sorted(p.name for p in view.iterdir()) == sorted(p.name for p in comfy.iterdir()
                                                            if p.name != "extra_model_paths.yaml")
