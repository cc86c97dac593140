"""HTTP + websocket protocol of one ComfyUI server: queue, follow, fetch history, upload, view, interrupt."""
from __future__ import annotations

import http.client
import json
import logging
import socket
import time
import urllib.parse
import uuid
from typing import Any
from collections.abc import Callable

from .errors import Cancelled, ExecutionFailed, HeadlessError, PromptRejected, ServerDown, \
    format_execution_error

try:  # websocket-client is optional: without it the client polls /history.
    import websocket  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - exercised only where the package is missing
    websocket = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

EventHandler = Callable[[str, dict[str, Any]], None]
_NET_ERRORS = (OSError, http.client.HTTPException)


def normalize_url(url: str) -> str:
    """Accept ``host:port`` or a full URL; return ``http(s)://host:port[/prefix]`` without a trailing slash."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HeadlessError(f"server URL {url!r} is not an http(s) URL; expected e.g. http://127.0.0.1:8188")
    return url.rstrip("/")


def execution_seconds(entry: dict[str, Any]) -> float | None:
    """Server-side execution time of a history entry (execution_start -> end message timestamps)."""
    start = end = None
    for item in (entry.get("status") or {}).get("messages", []):
        event, data = item[0], item[1] if len(item) > 1 else {}
        if event == "execution_start":
            start = data.get("timestamp")
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            end = data.get("timestamp")
    if start is None or end is None:
        return None
    return (end - start) / 1000.0


def output_files(entry: dict[str, Any]) -> list[dict[str, str]]:
    """Files listed in a history entry's outputs (SaveImage ``images`` and the like), node ids in order.

    Files of type ``output`` are returned; if there are none, ``temp`` files (PreviewImage) instead.
    """
    found: list[dict[str, str]] = []
    outputs = entry.get("outputs") or {}
    for node_id in sorted(outputs, key=lambda k: (len(k), k)):
        for _key, items in (outputs[node_id] or {}).items():
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, dict) and "filename" in item:
                    found.append({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                  "type": item.get("type", "output"), "node": node_id})
    saved = [f for f in found if f["type"] == "output"]
    return saved or found


class ComfyClient:
    """One connection to one ComfyUI server (not thread-safe: use one per worker thread)."""

    def __init__(self, url: str, timeout: float = 30.0, use_websocket: bool = True,
                 client_id: str | None = None) -> None:
        self.url = normalize_url(url)
        parts = urllib.parse.urlsplit(self.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self.client_id = client_id or uuid.uuid4().hex
        self.use_websocket = use_websocket and websocket is not None
        self._conn: http.client.HTTPConnection | None = None
        self._ws: Any = None
        self._object_info: dict[str, Any] | None = None

    # ------------------------------------------------------------------ HTTP
    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self.timeout)
        return self._conn

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """One HTTP request on a kept-alive connection; a stale connection is retried once."""
        full = self._prefix + path
        last: Exception | None = None
        for _attempt in range(2):
            conn = self._connection()
            try:
                conn.request(method, full, body=body, headers=headers or {})
                resp = conn.getresponse()
                data = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    self._drop_connection()
                return resp.status, data
            except _NET_ERRORS as exc:
                last = exc
                self._drop_connection()
                if isinstance(exc, (ConnectionRefusedError, socket.timeout)):
                    break
        raise ServerDown(self.url, f"{method} {path}: {type(last).__name__}: {last}")

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def get_json(self, path: str) -> Any:
        """GET a JSON document; a non-200 answer raises HeadlessError with the server's text."""
        status, data = self.request("GET", path)
        if status != 200:
            raise HeadlessError(f"{self.url}{path} answered HTTP {status}: {data[:300]!r}")
        return json.loads(data)

    def post_json(self, path: str, payload: Any) -> tuple[int, bytes]:
        """POST a JSON body; returns (status, raw body)."""
        body = json.dumps(payload).encode()
        return self.request("POST", path, body, {"Content-Type": "application/json"})

    def ping(self) -> None:
        """Raise ServerDown unless the server answers GET /prompt (queue info)."""
        self.get_json("/prompt")

    def object_info(self) -> dict[str, Any]:
        """Node definitions of the server (cached)."""
        if self._object_info is None:
            self._object_info = self.get_json("/object_info")
        return self._object_info

    def queue_prompt(self, prompt: dict[str, Any], extra_data: dict[str, Any] | None = None) -> str:
        """POST /prompt; returns the prompt id or raises PromptRejected with ComfyUI's node_errors."""
        payload: dict[str, Any] = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            payload["extra_data"] = extra_data
        if self.use_websocket:
            self._ensure_ws()  # listen before queueing so no event can be missed
        status, data = self.post_json("/prompt", payload)
        try:
            answer = json.loads(data)
        except ValueError:
            answer = None
        if status == 400 and isinstance(answer, dict):
            raise PromptRejected(answer.get("error"), answer.get("node_errors") or {})
        if status != 200 or not isinstance(answer, dict) or "prompt_id" not in answer:
            raise HeadlessError(f"{self.url}/prompt answered HTTP {status}: {data[:500]!r}")
        if answer.get("node_errors"):
            log.warning("%s: some outputs failed validation and will be skipped:\n%s", self.url,
                        PromptRejected(None, answer["node_errors"]))
        return str(answer["prompt_id"])

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The history entry of a prompt, or None while it is not finished."""
        return self.get_json(f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)

    def view(self, filename: str, subfolder: str = "", type_: str = "output") -> bytes:
        """Download one file through /view."""
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type_})
        status, data = self.request("GET", f"/view?{query}")
        if status != 200:
            raise HeadlessError(f"{self.url}/view could not send {subfolder}/{filename} ({type_}): "
                                f"HTTP {status}")
        return data

    def upload_image(self, data: bytes, filename: str, overwrite: bool = True) -> str:
        """POST /upload/image (multipart); returns the name to use as a LoadImage value."""
        boundary = uuid.uuid4().hex
        safe = filename.replace('"', "_")
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{safe}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n",
            f'--{boundary}\r\nContent-Disposition: form-data; name="overwrite"\r\n\r\n'
            f'{"true" if overwrite else "false"}\r\n'.encode(),
            f'--{boundary}\r\nContent-Disposition: form-data; name="type"\r\n\r\ninput\r\n'.encode(),
            f"--{boundary}--\r\n".encode(),
        ]
        status, body = self.request("POST", "/upload/image", b"".join(parts),
                                    {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        if status != 200:
            raise HeadlessError(f"{self.url}/upload/image refused {filename!r}: HTTP {status} {body[:200]!r}")
        answer = json.loads(body)
        sub = answer.get("subfolder") or ""
        return f"{sub}/{answer['name']}" if sub else answer["name"]

    def interrupt(self, prompt_id: str | None = None) -> None:
        """Drop a prompt from the queue if still pending and stop it if running (all prompts if None)."""
        if prompt_id:
            self.post_json("/queue", {"delete": [prompt_id]})
        self.post_json("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def cancel(self, prompt_id: str, timeout: float = 10.0) -> dict[str, Any] | None:
        """Interrupt a prompt and wait until the server no longer holds it.

        Returns its history entry when it finished anyway (it may have completed just before the
        interrupt arrived: its outputs are then valid), or None when it was removed or stopped.
        """
        deadline = time.monotonic() + timeout
        while True:
            self.interrupt(prompt_id)
            queue = self.get_json("/queue")
            held = {str(item[1]) for key in ("queue_running", "queue_pending") for item in queue.get(key, [])}
            if prompt_id not in held or time.monotonic() > deadline:
                entry = self.history(prompt_id)
                ok = entry is not None and (entry.get("status") or {}).get("status_str") == "success"
                return entry if ok else None
            time.sleep(0.05)

    # ------------------------------------------------------------- websocket
    def _ensure_ws(self) -> None:
        if self._ws is not None or not self.use_websocket:
            return
        scheme = "wss" if self._https else "ws"
        url = f"{scheme}://{self._host}:{self._port}{self._prefix}/ws?clientId={self.client_id}"
        try:
            self._ws = websocket.create_connection(url, timeout=self.timeout)
            self._ws.settimeout(0.25)
        except Exception as exc:  # noqa: BLE001 - any failure means "poll instead"
            if isinstance(exc, ConnectionRefusedError):
                raise ServerDown(self.url, f"websocket: {exc}") from exc
            log.info("%s: no websocket (%s: %s); following prompts by polling /history",
                     self.url, type(exc).__name__, exc)
            self.use_websocket = False
            self._ws = None

    def _close_ws(self) -> None:
        if self._ws is not None:
            try:
                self._ws.close()
            except Exception:  # noqa: BLE001 - closing a dead socket may fail; nothing to do
                pass
            self._ws = None

    def close(self) -> None:
        """Close the websocket and the HTTP connection."""
        self._close_ws()
        self._drop_connection()

    def wait(self, prompt_id: str, timeout: float | None = None, on_event: EventHandler | None = None,
             should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Follow a queued prompt to its end; return its history entry.

        Raises ExecutionFailed (execution_error / interrupted), ServerDown, Cancelled (should_stop)
        or HeadlessError on timeout.
        """
        deadline = None if not timeout else time.monotonic() + timeout
        entry = None
        if self._ws is not None:
            entry = self._wait_ws(prompt_id, deadline, on_event, should_stop)
        if entry is None:
            entry = self._wait_poll(prompt_id, deadline, should_stop)
        return self._check(entry)

    def _check_stop(self, prompt_id: str, deadline: float | None,
                    should_stop: Callable[[], bool] | None) -> None:
        if should_stop is not None and should_stop():
            raise Cancelled(f"prompt {prompt_id} stopped by the user")
        if deadline is not None and time.monotonic() > deadline:
            raise HeadlessError(f"prompt {prompt_id} on {self.url} did not finish in time "
                                f"(--timeout); it may still be running there")

    def _wait_ws(self, prompt_id: str, deadline: float | None, on_event: EventHandler | None,
                 should_stop: Callable[[], bool] | None) -> dict[str, Any] | None:
        last_poll = time.monotonic()
        while True:
            self._check_stop(prompt_id, deadline, should_stop)
            try:
                raw = self._ws.recv()
            except websocket.WebSocketTimeoutException:
                if time.monotonic() - last_poll > 5.0:  # safety net for a missed event
                    last_poll = time.monotonic()
                    entry = self.history(prompt_id)
                    if entry is not None:
                        return entry
                continue
            except Exception as exc:  # noqa: BLE001 - closed socket: check the server over HTTP
                log.info("%s: websocket closed (%s); checking over HTTP", self.url, exc)
                self._close_ws()
                return None  # _wait_poll raises ServerDown if the server is gone
            if not isinstance(raw, str) or not raw:
                continue  # binary preview frames
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            kind, data = msg.get("type", ""), msg.get("data") or {}
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if on_event is not None and kind != "status":
                on_event(kind, data)
            if kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                for _ in range(50):
                    entry = self.history(prompt_id)
                    if entry is not None:
                        return entry
                    time.sleep(0.01)
                return None

    def _wait_poll(self, prompt_id: str, deadline: float | None,
                   should_stop: Callable[[], bool] | None) -> dict[str, Any]:
        delay = 0.01
        failures = 0
        while True:
            self._check_stop(prompt_id, deadline, should_stop)
            try:
                entry = self.history(prompt_id)
                failures = 0
            except ServerDown:
                failures += 1
                if failures >= 3:
                    raise
                entry = None
            if entry is not None and (entry.get("status") or {}).get("status_str") is not None:
                return entry
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _check(self, entry: dict[str, Any]) -> dict[str, Any]:
        status = entry.get("status") or {}
        if status.get("status_str") == "success" or status.get("completed"):
            return entry
        for item in status.get("messages", []):
            event, data = item[0], item[1] if len(item) > 1 else {}
            if event == "execution_error":
                raise ExecutionFailed(format_execution_error(data), data)
            if event == "execution_interrupted":
                raise ExecutionFailed(f"interrupted in node {data.get('node_id')} "
                                      f"({data.get('node_type')})", data, interrupted=True)
        raise ExecutionFailed(f"prompt ended with status {status.get('status_str')!r} and no error message",
                              {})
