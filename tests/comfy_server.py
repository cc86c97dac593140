"""A real ComfyUI for the server tests (DESIGN.md §8): started from ``$COMFYUI_DIR`` on a free loopback
port with the pack linked into a private base directory and the tiny models as its ``qwen_image`` folder.

    with ComfyServer(comfy_dir, base_dir, models_dir, input_images) as srv:
        prompt_id = srv.queue(api_workflow)
        entry = srv.wait(prompt_id, timeout=120)   # the /history entry

Layout under ``base_dir``: ``custom_nodes/comfyui-gentor`` -> symlink to the pack root,
``input/`` (the example images copied in), ``extra_model_paths.yaml`` (``qwen_image: qwen_image/`` under
``base_path: models_dir``), ``comfyui.log`` (stdout + stderr of the server).
Only the standard library (+ PIL for images and websocket-client for progress, both test requirements).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterable

PACK_ROOT = Path(__file__).resolve().parents[1]
PACK_LINK_NAME = "comfyui-gentor"  # the folder name users clone; the pack must not depend on it
START_TIMEOUT_S = 120.0
IMPORT_FAILURE_MARKERS = ("Cannot import", "IMPORT FAILED")


class PromptRejected(Exception):
    """POST /prompt answered with an HTTP error (validation failure: 400 + node_errors)."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {json.dumps(body)[:2000]}")
        self.status = status
        self.body = body


class ServerDied(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def comfy_python(comfy_dir: Path) -> str:
    """$COMFYUI_DIR/.venv/bin/python when that venv exists, else the interpreter running the tests."""
    for cand in (comfy_dir / ".venv" / "bin" / "python", comfy_dir / ".venv" / "Scripts" / "python.exe"):
        if cand.exists():
            return str(cand)
    return sys.executable


def write_extra_model_paths(path: Path, models_dir: Path) -> Path:
    path.write_text(f"gentor_tests:\n    base_path: {json.dumps(str(models_dir))}\n    qwen_image: qwen_image/\n",
                    encoding="utf-8")
    return path


class ComfyServer:
    def __init__(self, comfy_dir: Path | str, base_dir: Path | str, models_dir: Path | str,
                 input_images: Iterable[Path] = (), start_timeout: float = START_TIMEOUT_S) -> None:
        self.comfy_dir = Path(comfy_dir).resolve()
        self.base_dir = Path(base_dir)
        self.models_dir = Path(models_dir)
        self.input_images = list(input_images)
        self.start_timeout = start_timeout
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base_dir / "comfyui.log"
        self.client_id = uuid.uuid4().hex
        self.start_seconds = 0.0

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}"

    def prepare(self) -> list[str]:
        if not (self.comfy_dir / "main.py").is_file():
            raise FileNotFoundError(f"COMFYUI_DIR={self.comfy_dir} has no main.py (expected a ComfyUI checkout)")
        nodes = self.base_dir / "custom_nodes"
        nodes.mkdir(parents=True, exist_ok=True)
        link = nodes / PACK_LINK_NAME
        if not link.exists():
            link.symlink_to(PACK_ROOT, target_is_directory=True)
        inputs = self.base_dir / "input"
        inputs.mkdir(exist_ok=True)
        for img in self.input_images:
            shutil.copy2(img, inputs / Path(img).name)
        yaml = write_extra_model_paths(self.base_dir / "extra_model_paths.yaml", self.models_dir)
        self.port = free_port()
        return [comfy_python(self.comfy_dir), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--disable-auto-launch", "--base-directory", str(self.base_dir),
                "--extra-model-paths-config", str(yaml)]

    def start(self) -> "ComfyServer":
        cmd = self.prepare()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "PYTHONUNBUFFERED": "1"}
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)
        deadline = t0 + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerDied(f"ComfyUI exited with code {self.proc.returncode} while starting; "
                                 f"log tail:\n{self.log_tail()}")
            try:
                self.get_json("/queue", timeout=2)
                self.start_seconds = time.monotonic() - t0
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"ComfyUI did not listen on port {self.port} within {self.start_timeout:.0f} s; "
                           f"log tail:\n{self.log_tail()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ------------------------------------------------------------------ log
    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def import_failures(self) -> list[str]:
        """Log lines reporting that the pack failed to import (core modules failing, e.g. audio without
        torchaudio, are not ours and are ignored)."""
        lines = self.log_text().splitlines()
        return [ln for ln in lines if any(m in ln for m in IMPORT_FAILURE_MARKERS)
                and (PACK_LINK_NAME in ln or str(PACK_ROOT) in ln)]

    # ------------------------------------------------------------------ HTTP
    def request(self, method: str, path: str, body: Any = None, timeout: float = 30) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def get_json(self, path: str, timeout: float = 30) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
            return json.loads(resp.read())

    def post_json(self, path: str, body: Any, timeout: float = 30) -> tuple[int, Any]:
        status, raw = self.request("POST", path, body, timeout)
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    def object_info(self) -> dict:
        return self.get_json("/object_info", timeout=60)

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        """POST /prompt; the prompt id, or PromptRejected (400 with node_errors on validation failure)."""
        status, body = self.post_json("/prompt", {"prompt": prompt, "client_id": client_id or self.client_id})
        if status != 200 or not isinstance(body, dict) or "prompt_id" not in body:
            raise PromptRejected(status, body)
        return body["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self.get_json(f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 120.0) -> dict:
        """Block until the prompt is in /history (finished, any outcome); return its entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.history(prompt_id)
            if entry is not None and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            if not self.alive():
                raise ServerDied(f"ComfyUI exited while running {prompt_id}; log tail:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} not finished within {timeout:.0f} s (queue: "
                           f"{json.dumps(self.get_json('/queue'))[:500]}); log tail:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 120.0) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def view(self, image: dict) -> bytes:
        """Bytes of an output image named in a history entry ({filename, subfolder, type})."""
        query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
        with urllib.request.urlopen(f"{self.url}/view?{query}", timeout=30) as resp:
            return resp.read()

    def output_images(self, entry: dict, node_id: str) -> list:
        """PIL images a node (SaveImage) wrote, read back through /view."""
        import io  # noqa: PLC0415

        from PIL import Image  # noqa: PLC0415

        images = entry.get("outputs", {}).get(node_id, {}).get("images", [])
        out = []
        for image in images:
            img = Image.open(io.BytesIO(self.view(image)))
            img.load()
            out.append(img)
        return out


def status_of(entry: dict) -> str:
    return entry.get("status", {}).get("status_str", "?")


def messages(entry: dict, kind: str) -> list[dict]:
    """The data of each ``kind`` message (execution_error, execution_interrupted, ...) in a history entry."""
    return [data for name, data in entry.get("status", {}).get("messages", []) if name == kind]


def describe(entry: dict) -> str:
    """A failure summary for assertion messages."""
    errs = messages(entry, "execution_error")
    if errs:
        e = errs[0]
        return (f"{status_of(entry)}: node {e.get('node_id')} ({e.get('node_type')}) raised "
                f"{e.get('exception_type')}: {e.get('exception_message')}\n{''.join(e.get('traceback', []))}")
    return f"{status_of(entry)}: {json.dumps(entry.get('status'))[:2000]}"
