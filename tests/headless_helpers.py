"""Helpers for the headless-client tests: a fake ComfyUI (HTTP + websocket, loopback, ephemeral port);
real servers come from the one launcher in tests/comfy_server.py (re-exported here)."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import socket
import struct
import threading
import time
import urllib.parse
from email.parser import BytesParser
from email.policy import default as email_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from collections.abc import Callable

from tests.comfy_server import ComfyServer, comfy_dir_or_skip, free_port  # noqa: F401 - re-exported

PACK_ROOT = Path(__file__).resolve().parents[1]
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _inp(kind: Any, **opts: Any) -> list[Any]:
    return [kind, opts] if opts else [kind]


def _node(required: dict[str, Any], optional: dict[str, Any] | None = None, output: tuple[str, ...] = (),
          output_node: bool = False, name: str = "") -> dict[str, Any]:
    inputs = {"required": required, **({"optional": optional} if optional else {})}
    return {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
            "output": list(output), "output_name": list(output), "name": name, "display_name": name,
            "output_node": output_node, "category": "test"}


FAKE_OBJECT_INFO: dict[str, Any] = {
    "EmptyImage": _node({"width": _inp("INT", default=512, min=1, max=4096),
                         "height": _inp("INT", default=512, min=1, max=4096),
                         "batch_size": _inp("INT", default=1, min=1, max=64),
                         "color": _inp("INT", default=0, min=0, max=0xFFFFFF)}, output=("IMAGE",)),
    "LoadImage": _node({"image": _inp([], image_upload=True)}, output=("IMAGE", "MASK")),
    "ImageBlend": _node({"image1": _inp("IMAGE"), "image2": _inp("IMAGE"),
                         "blend_factor": _inp("FLOAT", default=0.5, min=0.0, max=1.0),
                         "blend_mode": _inp(["normal", "multiply"])}, output=("IMAGE",)),
    "FakeSampler": _node({"image": _inp("IMAGE"), "seed": _inp("INT", default=0, min=0, control_after_generate=True),
                          "steps": _inp("INT", default=4, min=1, max=100),
                          "text": _inp("STRING", multiline=True),
                          "mode": _inp("COMBO", options=["a", "b"])},
                         {"strength": _inp("FLOAT", default=1.0), "extra": _inp("IMAGE")}, output=("IMAGE",)),
    "SaveImage": _node({"images": _inp("IMAGE"), "filename_prefix": _inp("STRING", default="ComfyUI")},
                       output_node=True),
    "PreviewImage": _node({"images": _inp("IMAGE")}, output_node=True),
}
for _k, _v in FAKE_OBJECT_INFO.items():
    _v["name"] = _v["display_name"] = _k


def trivial_workflow(color: int = 0, prefix: str = "t") -> dict[str, Any]:
    """EmptyImage -> SaveImage (works on the fake and on a real ComfyUI)."""
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1,
                                                          "color": color}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}


def blend_workflow(prefix: str = "blend") -> dict[str, Any]:
    """LoadImage x2 -> ImageBlend -> SaveImage (two image columns; fake and real ComfyUI)."""
    return {"10": {"class_type": "LoadImage", "inputs": {"image": "placeholder.png"}, "_meta": {"title": "first"}},
            "11": {"class_type": "LoadImage", "inputs": {"image": "placeholder.png"}, "_meta": {"title": "second"}},
            "12": {"class_type": "ImageBlend", "inputs": {"image1": ["10", 0], "image2": ["11", 0],
                                                          "blend_factor": 0.5, "blend_mode": "normal"}},
            "13": {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": prefix}}}


def write_csv_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """A dataset file: a header row from the first row's keys, then the rows."""
    import csv  # noqa: PLC0415

    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def png_bytes(width: int = 2, height: int = 2, rgb: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A small valid RGB PNG (stdlib zlib), for datasets that real ComfyUI must load."""
    import zlib

    raw = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_MAGIC + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------- websocket
class _WS:
    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.lock = sock, threading.Lock()

    def send(self, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        n = len(data)
        head = bytes([0x81, n]) if n < 126 else (bytes([0x81, 126]) + struct.pack(">H", n) if n < 65536
                                                  else bytes([0x81, 127]) + struct.pack(">Q", n))
        with self.lock:
            try:
                self.sock.sendall(head + data)
            except OSError:
                pass

    def read_loop(self) -> None:
        """Consume client frames until close/EOF (answers pings and close frames)."""
        f = self.sock.makefile("rb")
        while True:
            head = f.read(2)
            if len(head) < 2:
                return
            opcode, n = head[0] & 0x0F, head[1] & 0x7F
            if n == 126:
                n = struct.unpack(">H", f.read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", f.read(8))[0]
            mask = f.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(f.read(n)))
            if opcode == 8:
                with self.lock:
                    try:
                        self.sock.sendall(b"\x88\x00")
                    except OSError:
                        pass
                return
            if opcode == 9:
                with self.lock:
                    self.sock.sendall(bytes([0x8A, len(data)]) + data)


# --------------------------------------------------------------------------- fake server
HOLD_S = 120.0  # a held prompt ends by itself after this, so a failing test cannot hang forever


class FakeComfy:
    """Speaks the endpoints the client uses: /prompt /history /view /upload/image /interrupt /queue
    /object_info /ws (+ /static/<name> to serve dataset image URLs). ``kill()`` makes it vanish."""

    def __init__(self, delay: float = 0.0, websocket: bool = True,
                 fail: Callable[[dict[str, Any]], str | None] | None = None,
                 hold: Callable[[dict[str, Any]], bool] | None = None) -> None:
        self.delay, self.websocket, self.fail = delay, websocket, fail
        # A prompt for which hold(prompt) is true runs until it is interrupted (at most HOLD_S): a test can
        # then act while it is certainly in flight, whatever the machine's load.
        self.hold = hold
        self.object_info = json.loads(json.dumps(FAKE_OBJECT_INFO))
        self.uploads: dict[str, bytes] = {}
        self.files: dict[tuple[str, str, str], bytes] = {}
        self.static: dict[str, bytes] = {}
        self.history: dict[str, Any] = {}
        self.posted: list[tuple[str, dict[str, Any]]] = []
        self.interrupts: list[str | None] = []
        self.deleted: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self.fail_once_seen: set[str] = set()
        self.sockets: dict[str, _WS] = {}
        self._conns: set[socket.socket] = set()
        self._queue: queue.Queue[tuple[str, dict[str, Any], str] | None] = queue.Queue()
        self._running: str | None = None
        self._interrupt = threading.Event()
        self._killed = threading.Event()
        self._counter = 0
        self._lock = threading.Lock()
        self.httpd = self._make_server()
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._threads = [threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                          daemon=True),
                         threading.Thread(target=self._executor, daemon=True)]
        for t in self._threads:
            t.start()

    def _make_server(self) -> ThreadingHTTPServer:
        fake = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def process_request(self, request: Any, client_address: Any) -> None:
                fake._conns.add(request)
                super().process_request(request, client_address)

        return Server(("127.0.0.1", 0), _make_handler(self))

    # lifecycle --------------------------------------------------------------
    def kill(self) -> None:
        """Vanish like a killed process: listening socket and all connections closed, no more events."""
        self._killed.set()
        self._interrupt.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        for conn in list(self._conns):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        self._queue.put(None)

    close = kill

    def __enter__(self) -> FakeComfy:
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._killed.is_set():
            self.kill()

    # protocol ---------------------------------------------------------------
    def emit(self, client_id: str | None, kind: str, data: dict[str, Any]) -> None:
        ws = self.sockets.get(client_id or "")
        if ws is not None and not self._killed.is_set():
            ws.send({"type": kind, "data": data})

    def validate(self, prompt: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """ComfyUI-shaped validation: unknown class, no outputs, missing inputs, bad image, range."""
        for node_id, node in prompt.items():
            if node.get("class_type") not in self.object_info:
                return 400, {"error": {"type": "invalid_prompt", "message":
                                       f"Cannot execute because node {node.get('class_type')} does not exist.",
                                       "details": f"Node ID '#{node_id}'", "extra_info": {}}, "node_errors": {}}
        outputs = [k for k, v in prompt.items() if self.object_info[v["class_type"]].get("output_node")]
        if not outputs:
            return 400, {"error": {"type": "prompt_no_outputs", "message": "Prompt has no outputs",
                                   "details": "", "extra_info": {}}, "node_errors": {}}
        node_errors: dict[str, Any] = {}
        for node_id, node in prompt.items():
            info, reasons = self.object_info[node["class_type"]], []
            for name, spec in info["input"]["required"].items():
                value = node["inputs"].get(name)
                if value is None:
                    reasons.append({"type": "required_input_missing", "message": "Required input is missing",
                                    "details": name, "extra_info": {"input_name": name}})
                elif node["class_type"] == "LoadImage" and value not in self.uploads:
                    reasons.append({"type": "custom_validation_failed", "message": "Custom validation failed "
                                    "for node", "details": f"image - Invalid image file: {value}",
                                    "extra_info": {}})
                elif spec[0] == "INT" and isinstance(value, int) and value > spec[1].get("max", 1 << 62):
                    reasons.append({"type": "value_bigger_than_max", "message": "Value bigger than max",
                                    "details": f"{name}, {value} > {spec[1]['max']}",
                                    "extra_info": {"input_name": name}})
            if reasons:
                node_errors[node_id] = {"errors": reasons, "dependent_outputs": outputs,
                                        "class_type": node["class_type"]}
        if node_errors:
            details = "\n".join(f"{r['message']}: {r['details']}" for e in node_errors.values() for r in e["errors"])
            return 400, {"error": {"type": "prompt_outputs_failed_validation", "message":
                                   "Prompt outputs failed validation", "details": details, "extra_info": {}},
                         "node_errors": node_errors}
        return 200, {}

    def _executor(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or self._killed.is_set():
                return
            pid, prompt, client_id = item
            if pid in self.deleted:
                continue
            self._running = pid
            self._interrupt.clear()
            self._execute(pid, prompt, client_id)
            self._running = None

    def _message(self, messages: list[Any], client_id: str, kind: str, data: dict[str, Any]) -> None:
        data = {**data, "timestamp": int(time.time() * 1000)}
        messages.append([kind, data])
        self.emit(client_id, kind, data)

    def _execute(self, pid: str, prompt: dict[str, Any], client_id: str) -> None:
        messages: list[Any] = []
        self._message(messages, client_id, "execution_start", {"prompt_id": pid})
        self._message(messages, client_id, "execution_cached", {"nodes": [], "prompt_id": pid})
        error, error_node = (self.fail(prompt) if self.fail else None), next(iter(prompt))
        for node_id, node in prompt.items():
            text = json.dumps(node["inputs"], sort_keys=True)
            if "FAIL_ALWAYS" in text:
                error, error_node = "forced failure", node_id
            elif "FAIL_ONCE" in text and text not in self.fail_once_seen:
                self.fail_once_seen.add(text)
                error, error_node = "forced failure (once)", node_id
        outputs: dict[str, Any] = {}
        status = "success"
        for node_id, node in prompt.items():
            self.emit(client_id, "executing", {"node": node_id, "display_node": node_id, "prompt_id": pid})
            steps = node["inputs"].get("steps")
            if isinstance(steps, int):
                for i in range(1, steps + 1):
                    self.emit(client_id, "progress", {"value": i, "max": steps, "prompt_id": pid, "node": node_id})
            wait = HOLD_S if self.hold is not None and self.hold(prompt) else self.delay
            if node_id == next(iter(prompt)) and wait:
                if self._interrupt.wait(wait):
                    if self._killed.is_set():
                        return
                    status = "interrupted"
                    self._message(messages, client_id, "execution_interrupted",
                                  {"prompt_id": pid, "node_id": node_id, "node_type": node["class_type"],
                                   "executed": []})
                    break
            if error and node_id == error_node:
                status = "error"
                self._message(messages, client_id, "execution_error", {
                    "prompt_id": pid, "node_id": node_id, "node_type": node["class_type"], "executed": [],
                    "exception_message": error, "exception_type": "RuntimeError",
                    "traceback": ["Traceback (most recent call last):\n", "RuntimeError: " + error + "\n"],
                    "current_inputs": {}, "current_outputs": []})
                break
            if node["class_type"] == "SaveImage":
                with self._lock:
                    self._counter += 1
                    name = f"{node['inputs'].get('filename_prefix', 'ComfyUI')}_{self._counter:05d}_.png"
                self.files[("output", "", name)] = PNG_MAGIC + json.dumps({"prompt_id": pid, "prompt": prompt}).encode()
                outputs[node_id] = {"images": [{"filename": name, "subfolder": "", "type": "output"}]}
        if status == "success":
            self._message(messages, client_id, "execution_success", {"prompt_id": pid})
        if self._killed.is_set():
            return
        self.history[pid] = {"prompt": [0, pid, prompt, {"client_id": client_id}, []], "outputs": outputs,
                             "meta": {}, "status": {"status_str": "success" if status == "success" else "error",
                                                    "completed": status == "success", "messages": messages}}
        self.emit(client_id, "executing", {"node": None, "prompt_id": pid})


def _make_handler(fake: FakeComfy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # as aiohttp does; else delayed ACKs add 40 ms per request

        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

        def _send(self, status: int, body: bytes | dict[str, Any] | list[Any], ctype: str = "application/json") -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query))
            fake.requests.append(("GET", url.path))
            if url.path == "/ws":
                return self._websocket(query.get("clientId", ""))
            if url.path == "/object_info":
                return self._send(200, fake.object_info)
            if url.path == "/prompt":
                return self._send(200, {"exec_info": {"queue_remaining": fake._queue.qsize()}})
            if url.path == "/queue":
                pending = [[0, item[0]] for item in list(fake._queue.queue)
                           if item is not None and item[0] not in fake.deleted]
                running = [[0, fake._running]] if fake._running else []
                return self._send(200, {"queue_running": running, "queue_pending": pending})
            if url.path.startswith("/history/"):
                pid = url.path.split("/", 2)[2]
                return self._send(200, {pid: fake.history[pid]} if pid in fake.history else {})
            if url.path == "/view":
                key = (query.get("type", "output"), query.get("subfolder", ""), query.get("filename", ""))
                return self._send(200, fake.files[key], "image/png") if key in fake.files else self._send(404, b"")
            if url.path.startswith("/static/") and url.path[8:] in fake.static:
                return self._send(200, fake.static[url.path[8:]], "image/png")
            self._send(404, b"404: Not Found", "text/plain")

        def do_POST(self) -> None:  # noqa: N802 - http.server API
            path = urllib.parse.urlsplit(self.path).path
            fake.requests.append(("POST", path))
            body = self._body()
            if path == "/prompt":
                payload = json.loads(body)
                prompt, client_id = payload.get("prompt") or {}, payload.get("client_id", "")
                status, answer = fake.validate(prompt)
                if status != 200:
                    return self._send(status, answer)
                pid = payload.get("prompt_id") or hashlib.sha1(os.urandom(8)).hexdigest()
                fake.posted.append((pid, prompt))
                fake._queue.put((pid, prompt, client_id))
                return self._send(200, {"prompt_id": pid, "number": len(fake.posted), "node_errors": {}})
            if path == "/upload/image":
                msg = BytesParser(policy=email_policy).parsebytes(
                    b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body)
                for part in msg.iter_parts():
                    if part.get_param("name", header="content-disposition") == "image":
                        name = part.get_filename()
                        fake.uploads[name] = part.get_payload(decode=True)
                        return self._send(200, {"name": name, "subfolder": "", "type": "input"})
                return self._send(400, b"")
            if path == "/interrupt":
                pid = (json.loads(body or b"{}") or {}).get("prompt_id")
                fake.interrupts.append(pid)
                if pid is None or pid == fake._running:
                    fake._interrupt.set()
                return self._send(200, b"", "text/plain")
            if path == "/queue":
                fake.deleted += (json.loads(body or b"{}") or {}).get("delete", [])
                return self._send(200, b"", "text/plain")
            self._send(404, b"404: Not Found", "text/plain")

        def _websocket(self, client_id: str) -> None:
            if not fake.websocket or self.headers.get("Upgrade", "").lower() != "websocket":
                return self._send(404, b"no websocket here", "text/plain")
            key = self.headers["Sec-WebSocket-Key"]
            accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
            self.send_response(101, "Switching Protocols")
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", accept)
            self.end_headers()
            self.wfile.flush()
            ws = _WS(self.connection)
            fake.sockets[client_id] = ws
            ws.send({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": client_id}})
            try:
                ws.read_loop()
            finally:
                fake.sockets.pop(client_id, None)
                self.close_connection = True

    return Handler


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass (bounded loop)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# --------------------------------------------------------------------------- real ComfyUI
class ComfyProcess(ComfyServer):
    """The one launcher (tests/comfy_server.py) under the name the benchmarks use: ``start()`` only launches;
    call ``wait_ready()`` (several servers start in parallel that way)."""

    def start(self) -> "ComfyProcess":
        return self.launch()


def serve_dir(directory: Path) -> tuple[str, Callable[[], None]]:
    """Serve a folder over http on loopback (dataset image URLs); returns (base URL, stop)."""
    import functools
    from http.server import SimpleHTTPRequestHandler

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()

    return f"http://127.0.0.1:{httpd.server_address[1]}", stop


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR."""
    assert data.startswith(PNG_MAGIC), "not a PNG"
    return struct.unpack(">II", data[16:24])
