"""Runs a dataset through one or more ComfyUI servers: one worker per in-flight slot, retries, resume."""
from __future__ import annotations

import collections
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

from .client import ComfyClient, execution_seconds
from .dataset import Dataset, Mapping, Row
from .errors import Cancelled, ExecutionFailed, HeadlessError, NoServer, PromptRejected, RowError, \
    ServerDown
from .results import OK, ResultsTable, RowResult
from .rowjob import RowAttempt, RowJob
from .workflow import Workflow

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
        self.job = RowJob(workflow, tuple(mappings), dataset.path.parent, options.out_dir, options.seed_policy,
                          options.timeout, options.url_timeout, options.extra_data, "seed" in dataset.columns)
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

    def _run_task(self, task: Task, state: ServerState, client: ComfyClient) -> None:
        row = task.row
        attempt = RowAttempt(self.job, client, row, task.seed_salt, state.uploads)
        try:
            self._finish(attempt.run(should_stop=self._cancel.is_set))
            self.summary.timings[row.row_id] = (time.perf_counter() - attempt.t0,
                                                execution_seconds(attempt.entry or {}))
        except ServerDown as exc:
            state.down_since, state.reason = time.monotonic(), exc.reason
            task.server_losses += 1
            log.warning("%s went away during row %s (%s); the row goes back to the queue",
                        state.url, row.row_id, exc.reason)
            if task.server_losses > len(self.servers) + self.options.retries:
                self._finish(attempt.failed(f"servers went away {task.server_losses} times while running "
                                            f"this row; last: {exc}"))
            else:
                self._requeue(task)
        except Cancelled:
            self._finish(attempt.cancel())
        except RowError as exc:
            self._finish(attempt.failed(str(exc)))
        except PromptRejected as exc:
            if not self.job.is_row_specific(exc):  # the workflow itself is invalid: queue nothing more
                self.summary.fatal = f"ComfyUI rejected the prompt of row {row.row_id}:\n{exc}"
                self._stop.set()
            self._finish(attempt.failed(" | ".join(str(exc).splitlines())))
        except (ExecutionFailed, HeadlessError) as exc:
            task.attempts += 1
            if task.attempts <= self.options.retries and not self._stop.is_set():
                log.warning("row %s failed on %s (attempt %d of %d): %s; retrying", row.row_id,
                            state.url, task.attempts, self.options.retries + 1, exc)
                task.avoid = state.url
                self._requeue(task)
            else:
                self._finish(attempt.failed(str(exc)))
        except Exception as exc:  # noqa: BLE001 - a bug must not lose the row or the results file
            log.exception("unexpected error in row %s", row.row_id)
            self._finish(attempt.failed(f"{type(exc).__name__}: {exc}"))

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
