"""A ComfyUI server owned by one Ray actor: started on the actor's GPU, stopped when the actor ends."""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from .client import ComfyClient
from .errors import HeadlessError, ServerDown

START_TIMEOUT_S = 300.0  # a first start (custom nodes importing torch) can take minutes on a busy node
STOP_TIMEOUT_S = 20.0
LOG_TAIL_CHARS = 3000
VENV_PYTHONS = (".venv/bin/python", "venv/bin/python", "python_embeded/python.exe", ".venv/Scripts/python.exe")


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the actor process dies, even when Ray kills it."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes  # noqa: PLC0415
    import signal  # noqa: PLC0415

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def comfy_python(comfy_dir: Path, given: str | None = None) -> str:
    """The Python to start ComfyUI with: the given one, ComfyUI's own venv, else this interpreter."""
    if given:
        return given
    for rel in VENV_PYTHONS:
        if (comfy_dir / rel).exists():
            return str(comfy_dir / rel)
    return sys.executable


def free_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



def stop_process(proc: "subprocess.Popen | None", timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM a child process, then SIGKILL when it does not exit in time (nothing when it is gone already)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)

class OwnServer:
    """``python main.py --listen 127.0.0.1 --port <free> ARGS`` in ``comfy_dir``; log under ``log_dir``."""

    def __init__(self, comfy_dir: str | Path, args: str = "", python: str | None = None,
                 log_dir: str | Path | None = None, start_timeout: float = START_TIMEOUT_S) -> None:
        self.comfy_dir = Path(comfy_dir).expanduser().resolve()
        if not (self.comfy_dir / "main.py").is_file():
            raise HeadlessError(f"--comfyui {comfy_dir}: no main.py there (expected a ComfyUI checkout). "
                                f"Point --comfyui at the ComfyUI folder on every Ray node.")
        self.python = comfy_python(self.comfy_dir, python)
        self.args = shlex.split(args)
        self.log_dir = Path(log_dir) if log_dir else self.comfy_dir / "user"
        self.start_timeout = start_timeout
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "OwnServer":
        """Launch and wait until the HTTP API answers; raise with the log's tail when it does not."""
        self.port = free_port()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"comfyui-{socket.gethostname()}-{self.port}.log"
        cmd = [self.python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        client = ComfyClient(self.url, timeout=5, use_websocket=False)
        deadline = time.monotonic() + self.start_timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise HeadlessError(f"ComfyUI ({' '.join(cmd)}) exited with code {self.proc.returncode} "
                                        f"while starting; log {self.log_path}:\n{self.log_tail()}")
                try:
                    client.ping()
                    return self
                except ServerDown:
                    time.sleep(0.25)
        finally:
            client.close()
        self.stop()
        raise HeadlessError(f"ComfyUI did not answer on port {self.port} within {self.start_timeout:.0f}s; "
                            f"log {self.log_path}:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc)

    def log_tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL_CHARS:]
