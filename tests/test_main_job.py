"""scripts/main_job.sh as the README runs it, against a real ComfyUI (COMFYUI_DIR): it must not collide with a
ComfyUI already listening on the README's ports, leave nothing in the temp folder, nor log a database error."""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from tests.comfy_server import comfy_dir_or_skip

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "main_job.sh"
README_PORTS = (8188, 8189)  # the README's own servers
JOB_TIMEOUT_S = 600


def _occupy(port: int) -> socket.socket | None:
    """Listen on ``port`` (as another ComfyUI would), or None when something already does."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    sock.listen(1)
    return sock


def test_main_job_runs_on_a_free_port_and_cleans_up(tmp_path):
    comfy_dir = comfy_dir_or_skip()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = tmp_path / "out"
    busy = [s for s in map(_occupy, README_PORTS) if s is not None]
    env = dict(os.environ, TMPDIR=str(scratch), GENTOR_NO_INSTALL="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("GENTOR_PORT", None)
    try:
        job = subprocess.run(["bash", str(SCRIPT), str(comfy_dir), str(out)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    finally:
        for sock in busy:
            sock.close()
    assert job.returncode == 0, f"{job.stdout[-3000:]}\n{job.stderr[-3000:]}"
    assert list(out.glob("*.png")), job.stdout
    assert list(scratch.glob("gentor-main.*")) == []  # its scratch base is removed (torch may cache here)
    log = (out / "comfyui.log").read_text(encoding="utf-8", errors="replace")
    assert "To see the GUI go to" in log
    assert "Failed to initialize database" not in log
    for port in README_PORTS:  # held above (by this test or by another server): the job must pick another
        assert f"127.0.0.1:{port}" not in job.stdout
