"""Runs a dataset through one or more ComfyUI servers: one worker per in-flight slot, retries, resume."""
from __future__ import annotations

import collections
import logging
import os
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

from .client import ComfyClient, execution_seconds, output_files
from .dataset import Dataset, Mapping, Row, build_prompt
from .errors import Cancelled, ExecutionFailed, HeadlessError, NoServer, PromptRejected, RowError, \
    ServerDown
from .results import OK, ResultsTable, RowResult
from .workflow import Workflow, seed_targets, seeds_used

log = logging.getLogger(__name__)


@dataclass
class BatchOptions:
    """Knobs of a batch run (see the CLI's help for each)."""

    out_dir: Path
    seed_policy: str = "fixed"
    retries: int = 1
    per_server: int = 1
    timeout: float | None = None
    server_wait: float = 60.0
    probe_interval: float = 0.5
    use_websocket: bool = True
    url_timeout: float = 30.0
    extra_data: dict[str, Any] | None = None


@dataclass
class Task:
    """A row waiting to run, with its retry bookkeeping."""

    row: Row
    seed_salt: int
    attempts: int = 0
    server_losses: int = 0
    avoid: str = ""


@dataclass
class ServerState:
    """Whether a server is usable; ``down_since`` is set while it cannot be reached."""

    url: str
    down_since: float | None = None
    reason: str = ""
    uploads: dict[str, str] = field(default_factory=dict)


@dataclass
class Summary:
    """Outcome of a batch run."""

    total: int = 0
    skipped: int = 0
    ok: int = 0
    failed: int = 0
    interrupted: int = 0
    fatal: str = ""
    cancelled: bool = False
    seconds: float = 0.0
    timings: dict[str, tuple[float, float | None]] = field(default_factory=dict)


RowCallback = Callable[[RowResult, int, int], None]


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file through a temp file + os.replace, so a stopped run never leaves half a file."""
    fd, tmp = tempfile.mkstemp(prefix=".dl-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class BatchRunner:
    """Shares the rows of a dataset among servers; every finished row is written to results.csv."""

    def __init__(self, workflow: Workflow, dataset: Dataset, mappings: list[Mapping], servers: list[str],
                 results: ResultsTable, options: BatchOptions, on_row: RowCallback | None = None) -> None:
        self.workflow = workflow
        self.dataset = dataset
        self.mappings = mappings
        self.servers = [ServerState(url) for url in servers]
        self.results = results
        self.options = options
        self.on_row = on_row
        self.summary = Summary(total=len(dataset.rows))
        self._queue: collections.deque[Task] = collections.deque()
        self._lock = threading.Condition()
        self._remaining = 0
        self._stop = threading.Event()  # no new rows (validation failure, all servers gone)
        self._cancel = threading.Event()  # Ctrl-C: also interrupt what runs

    # -------------------------------------------------------------- public
    def run(self) -> Summary:
        """Run every row not already ok in results.csv; Ctrl-C interrupts in-flight prompts cleanly."""
        start = time.perf_counter()
        done = self.results.done_ids()
        todo = [r for r in self.dataset.rows if r.row_id not in done]
        self.summary.skipped = len(self.dataset.rows) - len(todo)
        self._queue.extend(Task(r, random.randrange(2**62)) for r in todo)
        self._remaining = len(todo)
        if todo:
            self._probe_all()
        workers = [threading.Thread(target=self._worker, args=(s, i), daemon=True,
                                    name=f"gentor-{s.url}-{i}")
                   for s in self.servers for i in range(max(1, self.options.per_server))] if todo else []
        for w in workers:
            w.start()
        try:
            self._supervise()
        except KeyboardInterrupt:
            self.cancel()
        self._stop.set()  # releases workers waiting for a server that is down
        with self._lock:
            self._lock.notify_all()
        for w in workers:
            w.join(timeout=30)
        self.summary.seconds = time.perf_counter() - start
        return self.summary

    def cancel(self) -> None:
        """Stop taking rows and interrupt the prompts in flight (rows are recorded as interrupted)."""
        self.summary.cancelled = True
        self._cancel.set()
        self._stop.set()
        with self._lock:
            self._lock.notify_all()

    # ------------------------------------------------------------ supervise
    def _probe_all(self) -> None:
        reasons = []
        for state in self.servers:
            client = ComfyClient(state.url, timeout=5, use_websocket=False)
            try:
                client.ping()
            except ServerDown as exc:
                state.down_since, state.reason = time.monotonic(), exc.reason
                reasons.append(f"{state.url} ({exc.reason})")
            finally:
                client.close()
        if len(reasons) == len(self.servers):
            raise NoServer("no ComfyUI server is reachable: " + "; ".join(reasons)
                                + ". Start ComfyUI (python main.py --listen 127.0.0.1 --port 8188) "
                                  "or fix --server.")
        for reason in reasons:
            log.warning("server %s is down; its share goes to the others until it answers", reason)

    def _supervise(self) -> None:
        while True:
            with self._lock:
                if self._remaining <= 0 or (self._stop.is_set() and not self._busy()):
                    return
                self._lock.wait(0.1)
            self._check_all_down()

    def _busy(self) -> bool:
        return self._remaining > len(self._queue)

    def _check_all_down(self) -> None:
        now = time.monotonic()
        if not all(s.down_since is not None for s in self.servers):
            return
        if min(now - (s.down_since or now) for s in self.servers) < self.options.server_wait:
            return
        reason = "; ".join(f"{s.url} ({s.reason})" for s in self.servers)
        message = (f"no ComfyUI server reachable for {self.options.server_wait:.0f}s: {reason}; "
                   f"restart one and run again with --resume")
        self.summary.fatal = message
        self._stop.set()
        while True:
            with self._lock:
                if not self._queue:
                    break
                task = self._queue.popleft()
            self._finish(RowResult(task.row.row_id, "error", error=message, name=task.row.name or ""))

    # --------------------------------------------------------------- worker
    def _take(self, state: ServerState) -> Task | None:
        with self._lock:
            while not self._stop.is_set():
                others_up = any(s is not state and s.down_since is None for s in self.servers)
                for i, task in enumerate(self._queue):
                    if task.avoid != state.url or not others_up:
                        del self._queue[i]
                        return task
                if self._remaining <= 0:
                    return None
                self._lock.wait(0.1)
            return None

    def _requeue(self, task: Task) -> None:
        with self._lock:
            self._queue.appendleft(task)
            self._lock.notify_all()

    def _wait_until_up(self, state: ServerState, client: ComfyClient) -> bool:
        while state.down_since is not None:
            if self._stop.wait(self.options.probe_interval):
                return False
            try:
                client.ping()
            except ServerDown:
                continue
            log.warning("server %s answers again", state.url)
            state.down_since = None
        return True

    def _worker(self, state: ServerState, slot: int) -> None:
        client = ComfyClient(state.url, use_websocket=self.options.use_websocket)
        try:
            while not self._stop.is_set():
                if state.down_since is not None and not self._wait_until_up(state, client):
                    return
                task = self._take(state)
                if task is None:
                    return
                try:
                    self._run_task(task, state, client)
                except Exception as exc:  # noqa: BLE001 - e.g. results.csv cannot be written: stop cleanly
                    log.exception("row %s could not be recorded", task.row.row_id)
                    self.summary.fatal = f"stopped: row {task.row.row_id} could not be recorded ({exc})"
                    self._stop.set()
                    with self._lock:
                        self._remaining -= 1
                        self._lock.notify_all()
        finally:
            client.close()

    def _upload(self, client: ComfyClient, state: ServerState, data: bytes, name: str) -> str:
        if name not in state.uploads:
            state.uploads[name] = client.upload_image(data, name)
        return state.uploads[name]

    def _run_task(self, task: Task, state: ServerState, client: ComfyClient) -> None:
        row, t0 = task.row, time.perf_counter()
        base = RowResult(row.row_id, "error", server=state.url, name=row.name or "")
        prompt: Workflow = {}
        prompt_id = ""
        try:
            prompt = build_prompt(self.workflow, row, self.mappings, self.dataset.path.parent,
                                  self.options.seed_policy, random.Random(task.seed_salt),
                                  lambda data, name: self._upload(client, state, data, name),
                                  self.options.url_timeout)
            base.seed = seeds_used(prompt)
            prompt_id = client.queue_prompt(prompt, self.options.extra_data)
            entry = client.wait(prompt_id, self.options.timeout, should_stop=self._cancel.is_set)
            base.output_files = ";".join(self._download(client, entry, row))
            base.status, base.seconds = OK, f"{time.perf_counter() - t0:.3f}"
            self._finish(base)
            self.summary.timings[row.row_id] = (time.perf_counter() - t0, execution_seconds(entry))
        except ServerDown as exc:
            state.down_since, state.reason = time.monotonic(), exc.reason
            task.server_losses += 1
            log.warning("%s went away during row %s (%s); the row goes back to the queue",
                        state.url, row.row_id, exc.reason)
            if task.server_losses > len(self.servers) + self.options.retries:
                self._fail(base, t0, f"servers went away {task.server_losses} times while running this "
                                     f"row; last: {exc}")
            else:
                self._requeue(task)
        except Cancelled:
            self._cancelled(client, state, prompt_id, row, base, t0)
        except RowError as exc:
            self._fail(base, t0, str(exc))
        except PromptRejected as exc:
            if not self._row_specific(exc):  # the workflow itself is invalid: queue nothing more
                self.summary.fatal = f"ComfyUI rejected the prompt of row {row.row_id}:\n{exc}"
                self._stop.set()
            self._fail(base, t0, " | ".join(str(exc).splitlines()))
        except (ExecutionFailed, HeadlessError) as exc:
            task.attempts += 1
            if task.attempts <= self.options.retries and not self._stop.is_set():
                log.warning("row %s failed on %s (attempt %d of %d): %s; retrying", row.row_id,
                            state.url, task.attempts, self.options.retries + 1, exc)
                task.avoid = state.url
                self._requeue(task)
            else:
                self._fail(base, t0, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must not lose the row or the results file
            log.exception("unexpected error in row %s", row.row_id)
            self._fail(base, t0, f"{type(exc).__name__}: {exc}")

    def _row_specific(self, exc: PromptRejected) -> bool:
        """True when every validation error names an input fed from the row (a bad cell, not the workflow)."""
        fed = {(m.target.node, m.target.input) for m in self.mappings}
        if "seed" in self.dataset.columns:
            fed |= {(t.node, t.input) for t in seed_targets(self.workflow)}
        reasons = [(node_id, (r.get("extra_info") or {}).get("input_name"))
                   for node_id, info in exc.node_errors.items() for r in info.get("errors", [])]
        return bool(reasons) and all(reason in fed for reason in reasons)

    def _cancelled(self, client: ComfyClient, state: ServerState, prompt_id: str, row: Row,
                   base: RowResult, t0: float) -> None:
        entry = None
        if prompt_id:
            try:
                entry = client.cancel(prompt_id)
            except HeadlessError as exc:
                log.warning("could not interrupt %s on %s: %s", prompt_id, state.url, exc)
        if entry is not None:  # it had finished before the interrupt reached it: keep it
            try:
                base.output_files = ";".join(self._download(client, entry, row))
                base.status, base.seconds = OK, f"{time.perf_counter() - t0:.3f}"
                self._finish(base)
                return
            except HeadlessError as exc:
                log.warning("row %s finished but its outputs could not be fetched: %s", row.row_id, exc)
        self._fail(base, t0, "stopped by the user (Ctrl-C); run again with --resume", status="interrupted")

    def _fail(self, result: RowResult, t0: float, error: str, status: str = "error") -> None:
        result.status, result.error = status, error
        result.seconds = f"{time.perf_counter() - t0:.3f}"
        self._finish(result)

    def _download(self, client: ComfyClient, entry: dict[str, Any], row: Row) -> list[str]:
        out = self.options.out_dir
        out.mkdir(parents=True, exist_ok=True)
        names = []
        for i, item in enumerate(output_files(entry)):
            data = client.view(item["filename"], item["subfolder"], item["type"])
            suffix = Path(item["filename"]).suffix or ".bin"
            name = f"{row.name or row.row_id}_{i}{suffix}"
            write_atomic(out / name, data)
            names.append(name)
        return names

    def _finish(self, result: RowResult) -> None:
        with self._lock:
            self.results.record(result)
            self._remaining -= 1
            counter = {OK: "ok", "interrupted": "interrupted"}.get(result.status, "failed")
            setattr(self.summary, counter, getattr(self.summary, counter) + 1)
            finished = self.summary.ok + self.summary.failed + self.summary.interrupted
            if self.on_row is not None:
                self.on_row(result, finished, self.summary.total - self.summary.skipped)
            self._lock.notify_all()
