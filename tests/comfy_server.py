"""The one launcher for a real ComfyUI (DESIGN.md §8), used by every server test and benchmark.

    with ComfyServer(comfy_dir, base_dir, models_dir, input_images) as srv:   # starts and waits
        entry = srv.run(api_workflow, timeout=120)                            # the /history entry

    srv = ComfyServer(comfy_dir, base_dir).launch()   # several at once: launch all, then wait_ready() each

``main.py --cpu`` on a free loopback port. Layout under ``base_dir``: ``custom_nodes/comfyui-gentor`` ->
symlink to the pack root (the checkout itself is never modified), ``input/`` (the given images copied in),
``extra_model_paths.yaml`` (every registered backend's folder keys under ``base_path: models_dir``, or the
text given), ``comfyui.log`` (stdout + stderr of the server), ``comfyui-checkout/`` (``isolated_checkout``:
the server never reads the user's own ``ComfyUI/extra_model_paths.yaml``). ComfyUI's Python is its own
venv (``.venv/`` or ``venv/``
inside ``$COMFYUI_DIR``) when there is one, else the interpreter running the tests.
Only the standard library (+ PIL for images); importable without the pack (benchmarks).
"""
from __future__ import annotations

import functools
import importlib.util
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
from types import ModuleType
from typing import Any, Iterable

PACK_ROOT = Path(__file__).resolve().parents[1]
PACK_LINK_NAME = "comfyui-gentor"  # the folder name users clone; the pack must not depend on it
START_TIMEOUT_S = 240.0  # a fresh ComfyUI's first start takes ~60 s; later ones ~10 s
STOP_TIMEOUT_S = 20.0
IMPORT_FAILURE_MARKERS = ("Cannot import", "IMPORT FAILED")
# ComfyUI's main.py always loads the extra_model_paths.yaml beside itself (the user's own model folders)
# before --extra-model-paths-config: the test server runs from a checkout view without it.
USER_CONFIG_FILES = ("extra_model_paths.yaml",)
ENTRY_SCRIPT = "main.py"
CHECKOUT_VIEW = "comfyui-checkout"
VENV_PYTHONS = (".venv/bin/python", "venv/bin/python", ".venv/Scripts/python.exe", "venv/Scripts/python.exe")
# What ComfyUI's Python must import for the pack's server tests to mean anything.
REQUIRED_MODULES = ("torch", "aiohttp", "yaml", "diffusers", "transformers", "safetensors")
# OpenMP threads spin-wait on a busy shared machine (20-100x slower steps); one thread changes no result.
QUIET_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


class PromptRejected(Exception):
    """POST /prompt answered with an HTTP error (validation failure: 400 + node_errors)."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {json.dumps(body)[:2000]}")
        self.status = status
        self.body = body


class ServerDied(RuntimeError):
    pass


def _die_with_parent() -> None:
    """In the child before exec: on Linux, get SIGTERM when the test process dies (even by SIGKILL or a
    timeout), so no orphaned server outlives its tests. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes  # noqa: PLC0415
    import signal  # noqa: PLC0415

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port() -> int:
    """A loopback port nobody listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def comfy_python(comfy_dir: Path) -> str:
    """The Python of ComfyUI's own venv (``.venv/`` or ``venv/``), else the interpreter running the tests."""
    for rel in VENV_PYTHONS:
        cand = Path(comfy_dir) / rel
        if cand.exists():
            return str(cand)
    return sys.executable


@functools.lru_cache(maxsize=None)
def missing_modules(python: str) -> tuple[str, ...]:
    """Which of REQUIRED_MODULES ``python`` cannot import (checked once per interpreter)."""
    code = ("import importlib.util, sys\n"
            f"print(' '.join(m for m in {REQUIRED_MODULES!r} if importlib.util.find_spec(m) is None))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        return REQUIRED_MODULES
    return tuple(out.stdout.split())


def comfy_dir_or_skip() -> Path:
    """$COMFYUI_DIR as a usable ComfyUI checkout, or skip the calling test with the reason."""
    import pytest  # noqa: PLC0415 - only tests call this

    value = os.environ.get("COMFYUI_DIR")
    if not value:
        pytest.skip("needs a real ComfyUI: set COMFYUI_DIR to a ComfyUI checkout whose Python (its .venv/ or "
                    "venv/, else this one) has ComfyUI's and the pack's requirements")
    path = Path(value)
    if not (path / "main.py").is_file():
        pytest.skip(f"COMFYUI_DIR={value} has no main.py; point it at a ComfyUI checkout")
    python = comfy_python(path)
    missing = missing_modules(python)
    if missing:
        pytest.skip(f"COMFYUI_DIR={value}: its Python {python} lacks {', '.join(missing)}; install ComfyUI's "
                    f"requirements.txt and the pack's requirements.txt into it")
    return path


# ----------------------------------------------------------------------------- the registry, without the pack
def pack_registry() -> ModuleType:
    """The pack's registry.py (stdlib only), whether or not the pack is importable as ``gentor``."""
    if "gentor" in sys.modules:
        from gentor import registry  # noqa: PLC0415

        return registry
    name = "_gentor_registry_for_tests"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, PACK_ROOT / "registry.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def folder_keys() -> list[str]:
    """Every model folder key any registered backend reads, in registry order, each once."""
    return list(dict.fromkeys(key for spec in pack_registry().BACKENDS for key in spec.folder_keys))


def write_extra_model_paths(path: Path, models_dir: Path) -> Path:
    """An extra_model_paths.yaml mapping every backend folder key to ``models_dir/<key>/`` (named section +
    base_path, as ComfyUI's loader requires)."""
    lines = ["gentor_tests:", f"    base_path: {json.dumps(str(models_dir))}"]
    lines += [f"    {key}: {key}/" for key in folder_keys()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def isolated_checkout(comfy_dir: Path, dest: Path) -> Path:
    """A view of the ComfyUI checkout that runs the same code without the user's own configuration: every
    entry is a symlink except ``main.py``, which is copied (main.py finds extra_model_paths.yaml beside its
    *real* path, so a symlinked main.py would still read the checkout's), and USER_CONFIG_FILES are left out.
    Imports resolve through the links; the checkout itself is never modified."""
    dest.mkdir(parents=True, exist_ok=True)
    for entry in sorted(Path(comfy_dir).iterdir()):
        target = dest / entry.name
        if entry.name in USER_CONFIG_FILES or target.exists() or target.is_symlink():
            continue
        if entry.name == ENTRY_SCRIPT:
            shutil.copy2(entry, target)
        else:
            target.symlink_to(entry, target_is_directory=entry.is_dir())
    return dest


# ----------------------------------------------------------------------------- the server's models folder
DECOY_PLAIN = "decoy-not-a-model"  # a folder with a config but no weights: no loader may list it
DECOY_OTHER = "decoy-other-pipeline"  # a diffusers pipeline of a family no Gentor backend reads
STRAY_FILE = "stray-file.safetensors"
DECOYS = (DECOY_PLAIN, DECOY_OTHER, STRAY_FILE)
LINK_PREFIX = "linked-"  # linked-<tiny folder>: a symlink to a model kept outside the models folder


def write_server_models(tiny_root: Path, out: Path, own_keys: Iterable[str]) -> Path:
    """A models folder for a server: a copy of every tiny model in ``tiny_root``, for each a symlink
    ``linked-<name>`` to the original outside ``out`` (models kept on another disk), and decoys in each
    backend's own folder key."""
    for key_dir in sorted(p for p in tiny_root.iterdir() if p.is_dir()):
        shutil.copytree(key_dir, out / key_dir.name, symlinks=True)
        for variant in sorted(p for p in key_dir.iterdir() if p.is_dir()):
            (out / key_dir.name / f"{LINK_PREFIX}{variant.name}").symlink_to(variant.resolve(),
                                                                           target_is_directory=True)
    for key in own_keys:
        folder = out / key
        (folder / DECOY_PLAIN / "transformer").mkdir(parents=True)
        (folder / DECOY_PLAIN / "transformer" / "config.json").write_text("{}")
        (folder / DECOY_PLAIN / "README.md").write_text("not a model\n")
        (folder / DECOY_OTHER).mkdir()
        (folder / DECOY_OTHER / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
        (folder / STRAY_FILE).write_bytes(b"\0" * 16)
    return out


# ----------------------------------------------------------------------------- the server
class ComfyServer:
    """A real ComfyUI on loopback. ``start()`` launches and waits; ``launch()`` + ``wait_ready()`` split it."""

    def __init__(self, comfy_dir: Path | str, base_dir: Path | str, models_dir: Path | str | None = None,
                 input_images: Iterable[Path] = (), env: dict[str, str] | None = None, link_pack: bool = True,
                 extra_args: tuple[str, ...] = (), cpus: str | None = None,
                 start_timeout: float = START_TIMEOUT_S, extra_model_paths: str | None = None,
                 cpu: bool = True) -> None:
        self.comfy_dir = Path(comfy_dir).resolve()
        self.checkout = Path(base_dir) / CHECKOUT_VIEW
        self.extra_model_paths = extra_model_paths  # the yaml's text; None: every folder key under models_dir
        self.base_dir = Path(base_dir)
        self.models_dir = Path(models_dir) if models_dir is not None else self.base_dir / "models"
        self.input_images = list(input_images)
        self.link_pack = link_pack
        self.start_timeout = start_timeout
        self.port = free_port()
        self.python = comfy_python(self.comfy_dir)
        self.log_path = self.base_dir / "comfyui.log"
        self.client_id = uuid.uuid4().hex
        self.env = {**os.environ, **OFFLINE, **QUIET_THREADS, "PYTHONUNBUFFERED": "1", **(env or {})}
        device = ("--cpu",) if cpu else ()  # cpu=False: ComfyUI picks the GPU (GPU benchmarks)
        self.cmd = [self.python, ENTRY_SCRIPT, *device, "--listen", "127.0.0.1", "--port", str(self.port),
                    "--disable-auto-launch", "--base-directory", str(self.base_dir),
                    "--extra-model-paths-config", str(self.base_dir / "extra_model_paths.yaml"),
                    # ComfyUI's default database is the checkout's user/comfyui.db (absent in a fresh clone)
                    "--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}", *extra_args]
        if cpus and shutil.which("taskset"):  # pin to these cores (benchmarks)
            self.cmd = ["taskset", "-c", cpus, *self.cmd]
        self.proc: subprocess.Popen | None = None
        self.start_seconds = 0.0
        self._t0 = 0.0

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}"

    def prepare(self) -> None:
        if not (self.comfy_dir / "main.py").is_file():
            raise FileNotFoundError(f"COMFYUI_DIR={self.comfy_dir} has no main.py (expected a ComfyUI checkout)")
        nodes = self.base_dir / "custom_nodes"
        nodes.mkdir(parents=True, exist_ok=True)
        link = nodes / PACK_LINK_NAME
        if self.link_pack and not link.exists():
            link.symlink_to(PACK_ROOT, target_is_directory=True)
        (self.base_dir / "user").mkdir(exist_ok=True)
        inputs = self.base_dir / "input"
        inputs.mkdir(exist_ok=True)
        for img in self.input_images:
            shutil.copy2(img, inputs / Path(img).name)
        yaml_path = self.base_dir / "extra_model_paths.yaml"
        if self.extra_model_paths is None:
            write_extra_model_paths(yaml_path, self.models_dir)
        else:
            yaml_path.write_text(self.extra_model_paths, encoding="utf-8")
        isolated_checkout(self.comfy_dir, self.checkout)

    def launch(self) -> "ComfyServer":
        """Start the process without waiting for it to listen."""
        self.prepare()
        self._t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=self.checkout, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        return self

    def wait_ready(self, timeout: float | None = None) -> "ComfyServer":
        """Poll until the HTTP API answers; raise with the log's tail if the process dies or times out."""
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise ServerDied(f"ComfyUI exited with code {code} while starting; log tail:\n{self.log_tail()}")
            try:
                self.get_json("/queue", timeout=2)
                self.start_seconds = time.monotonic() - self._t0
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, json.JSONDecodeError):
                time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"ComfyUI did not listen on port {self.port} in time; log tail:\n{self.log_tail()}")

    def start(self) -> "ComfyServer":
        return self.launch().wait_ready()

    def kill(self) -> None:
        """SIGKILL (a crash, as far as clients can tell)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL when it does not exit in time (the headless runner's own stop)."""
        from gentor_headless.ray_server import stop_process

        stop_process(self.proc, STOP_TIMEOUT_S)

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
        return [ln for ln in self.log_text().splitlines() if any(m in ln for m in IMPORT_FAILURE_MARKERS)
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

    def python_has(self, module: str) -> bool:
        """Whether ComfyUI's Python can import ``module`` (e.g. an optional engine's package)."""
        code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
        return subprocess.run([self.python, "-c", code], capture_output=True, timeout=120).returncode == 0

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

        out = []
        for image in entry.get("outputs", {}).get(node_id, {}).get("images", []):
            img = Image.open(io.BytesIO(self.view(image)))
            img.load()
            out.append(img)
        return out


# ----------------------------------------------------------------------------- history entries
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


def refusal(server: ComfyServer, prompt: dict, timeout: float = 180.0) -> tuple[str, str, str]:
    """Queue a prompt that must be refused; return (how, node id, message) whichever layer refused it:
    ("validation", node, details) for ComfyUI's HTTP 400 (0.8.0 checks combo values itself), or
    ("execution", node, exception message) for a node raising (0.3.64 passes any combo value on)."""
    try:
        prompt_id = server.queue(prompt)
    except PromptRejected as rejected:
        assert rejected.status == 400, rejected
        node_errors = rejected.body.get("node_errors") or {}
        assert len(node_errors) == 1, rejected.body
        (node_id, errors), = node_errors.items()
        text = " | ".join(f"{e.get('type')}: {e.get('message')}: {e.get('details')} "
                          f"{json.dumps(e.get('extra_info', {}))}" for e in errors["errors"])
        return "validation", node_id, text
    entry = server.wait(prompt_id, timeout)
    assert status_of(entry) == "error", describe(entry)
    (err,) = messages(entry, "execution_error")
    return "execution", err["node_id"], err["exception_message"]
