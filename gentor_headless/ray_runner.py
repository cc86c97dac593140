"""``batch --ray``: the dataset + workflow contract on Ray Data, one ComfyUI server per actor.

Rows stream from Ray Data's reader (ray_data.RowsDatasource) into an actor pool (``map_batches`` with a
callable class); each actor owns one server — a ``--server`` URL leased from a small coordinator actor, or
one it starts itself (``--comfyui``, on its GPU) and stops when it ends — and keeps at most
``--per-server`` prompts in flight on it. Each row goes through the same RowAttempt as the built-in
runner; its outputs are written under the same names (temp file + rename), then its done marker, then
the driver writes its result row to Parquet. Actors that die are restarted by Ray and their batch
re-run (Ray Data's defaults for actor pools); rows already marked done are skipped, so nothing runs twice.
A server that dies under a row (attached: the actor moves to another URL; own: it starts a new one)
counts against ``--retries`` for that row.
"""
from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import ray.data
import ray.exceptions

import gentor_headless

from .client import ComfyClient
from .dataset import Row, safe_name
from .errors import Cancelled, DatasetError, ExecutionFailed, HeadlessError, PromptRejected, RowError, \
    ServerDown
from .ray_data import SMALL_RESULTS_ROWS, Ledger, RowsDatasource, dataset_files, new_run_id, row_id
from .ray_server import START_TIMEOUT_S, OwnServer
from .results import OK, RowResult
from .rowjob import RowAttempt, RowJob, output_stem
from .scheduler import Summary

log = logging.getLogger(__name__)
TASKS_IN_FLIGHT = 2  # per pool actor (see run_on_ray)
# How long the pool waits for all its actors before the first row (an actor starting its own ComfyUI takes up to
# ray_server.START_TIMEOUT_S); past that the run stops with Ray's "Timed out while starting actors".
ATTACHED_ACTOR_START_S = 120
STATE_POLL_S = 0.25  # how often actors look for a stop (Ctrl-C, invalid workflow)
PROBE_INTERVAL_S = 0.5
FLUSH_ROWS, FLUSH_SECONDS = 1000, 60.0  # a Parquet part of results at least this often
RESULT_COLUMNS = ["row_id", "name", "status", "output_files", "seed", "server", "seconds", "error"]
RESULT_SCHEMA = pa.schema([*((c, pa.string()) for c in RESULT_COLUMNS), ("skipped", pa.bool_()),
                           ("fatal", pa.string())])


@dataclass
class RayOptions:
    """Knobs of a Ray run (the CLI's ``--ray`` options plus the batch options both runners share)."""

    data: str
    out_dir: Path
    servers: list[str] = field(default_factory=list)
    comfyui: str | None = None
    comfyui_args: str = ""
    comfyui_python: str | None = None
    actors: int = 0
    gpus_per_actor: float = 1.0
    cpus_per_actor: float = 1.0
    per_server: int = 1
    rows_per_task: int = 1
    retries: int = 1
    server_wait: float = 60.0
    use_websocket: bool = True
    name_column: str | None = None
    resume: bool = False
    overwrite: bool = False


@ray.remote(num_cpus=0)
class Coordinator:
    """Which actor uses which ``--server`` URL, which URLs are down, and whether the run must stop."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.leases: dict[str, str] = {}
        self.down: set[str] = set()
        self.fatal = ""
        self.cancelled = False

    def lease(self, actor: str, avoid: str = "") -> str:
        """The actor's URL: its current one while usable, else the least-used URL that is up."""
        current = self.leases.get(actor)
        if current and current != avoid and current not in self.down:
            return current
        used = {u: sum(1 for a, v in self.leases.items() if v == u and a != actor) for u in self.urls}
        up = [u for u in self.urls if u != avoid and u not in self.down]
        choice = min(up or [u for u in self.urls if u != avoid] or self.urls, key=lambda u: used[u])
        self.leases[actor] = choice
        return choice

    def mark(self, url: str, up: bool) -> None:
        (self.down.discard if up else self.down.add)(url)

    def stop(self, reason: str) -> None:
        self.fatal = self.fatal or reason

    def cancel(self) -> None:
        self.cancelled = True

    def state(self) -> tuple[str, bool]:
        return self.fatal, self.cancelled


@dataclass
class WorkerConfig:
    """What every actor needs (pickled once into the actor pool)."""

    job: RowJob
    options: RayOptions
    single_file: bool


class RowWorker:
    """One actor of the pool: one server, ``per_server`` rows at a time, results as an Arrow table."""

    def __init__(self, config: WorkerConfig, coordinator: Any) -> None:
        self.cfg, self.opts, self.coord = config, config.options, coordinator
        self.ledger = Ledger(config.job.out_dir, with_name=bool(self.opts.name_column))
        self.key = ray.get_runtime_context().get_actor_id() or f"local-{random.getrandbits(64):x}"
        self.own: OwnServer | None = None
        self.lock = threading.Lock()
        if self.opts.comfyui:
            self.own = OwnServer(self.opts.comfyui, self.opts.comfyui_args, self.opts.comfyui_python,
                                 Path(self.opts.out_dir) / ".gentor-servers").start()
            self.url = self.own.url
        else:
            self.url = ray.get(self.coord.lease.remote(self.key))
        self.uploads: dict[str, dict[str, str]] = {}
        self.local = threading.local()
        self.fatal, self.cancelled = "", False
        self.pool = ThreadPoolExecutor(max(1, self.opts.per_server), thread_name_prefix="gentor-row")
        self._closed = threading.Event()
        threading.Thread(target=self._poll, daemon=True).start()

    # ------------------------------------------------------------------ lifecycle
    def _poll(self) -> None:
        while not self._closed.wait(STATE_POLL_S):
            try:
                fatal, cancelled = ray.get(self.coord.state.remote(), timeout=30)
                self.fatal, self.cancelled = self.fatal or fatal, self.cancelled or cancelled
            except Exception as exc:  # noqa: BLE001 - the driver is gone: stop taking rows
                log.warning("coordinator unreachable (%s); stopping", exc)
                self.cancelled = True
                return

    def __del__(self) -> None:
        """Ray Data deletes the callable when the pool shuts down: stop the server this actor started."""
        self._closed.set()
        if self.own is not None:
            self.own.stop()

    # ------------------------------------------------------------------ rows
    def __call__(self, batch: pa.Table) -> pa.Table:
        outcomes = [o for o in self.pool.map(self._one, batch.to_pylist()) if o is not None]
        columns = {c: [getattr(r, c) for r, _, _ in outcomes] for c in RESULT_COLUMNS}
        columns["skipped"] = [s for _, s, _ in outcomes]
        columns["fatal"] = [f for _, _, f in outcomes]
        return pa.table(columns, schema=RESULT_SCHEMA)  # typed even when no row of the batch ran

    def _client(self, url: str) -> ComfyClient:
        clients = getattr(self.local, "clients", None)
        if clients is None:
            clients = self.local.clients = {}
        if url not in clients:
            clients[url] = ComfyClient(url, use_websocket=self.opts.use_websocket)
        return clients[url]

    def _row(self, rec: dict[str, Any]) -> Row:
        import json  # noqa: PLC0415 - only here

        values = json.loads(rec["values"])
        row = Row(row_id(rec["pos"], rec["file"], self.cfg.single_file), rec["pos"], values)
        column = self.opts.name_column
        if column:
            value = str(values.get(column) or "").strip()
            if not value:
                raise RowError(f"row {row.row_id} has no value in the name column {column!r}; fill it in")
            row.name = safe_name(value)
        return row

    def _one(self, rec: dict[str, Any]) -> tuple[RowResult, bool, str] | None:
        try:
            row = self._row(rec)
        except RowError as exc:
            rid = row_id(rec["pos"], rec["file"], self.cfg.single_file)
            return RowResult(rid, "error", server=self.url, error=str(exc)), False, ""
        stem = output_stem(row)
        done = self.ledger.done(stem)
        if done is not None and done.row_id == row.row_id:
            return done, True, ""
        if self.fatal or self.cancelled:
            return None  # not run: the run is stopping
        if row.name:
            holder = self.ledger.claim(stem, row.row_id)
            if holder is not None:
                return RowResult(row.row_id, "error", server=self.url, name=row.name,
                                 error=f"output name {row.name!r} is already used by row {holder}; names in the "
                                       f"name column must be unique"), False, ""
        return self._attempts(row, stem)

    def _attempts(self, row: Row, stem: str) -> tuple[RowResult, bool, str]:
        salt, failures, losses = random.randrange(2**62), 0, 0
        while True:
            url = self.url
            attempt = RowAttempt(self.cfg.job, self._client(url), row, salt, self.uploads.setdefault(url, {}))
            try:
                result = attempt.run(should_stop=lambda: self.cancelled)
                self.ledger.commit(stem, result)
                return result, False, ""
            except ServerDown as exc:
                losses += 1
                self._client(url).close()
                if losses > self.opts.retries:
                    return attempt.failed(f"servers went away {losses} times while running this row; last: "
                                          f"{exc}"), False, ""
                problem = self._server_lost(url)
                if problem:
                    return attempt.failed(problem), False, ""
            except Cancelled:
                result = attempt.cancel()
                if result.status == OK:
                    # The prompt finished before the interrupt landed and its outputs were written: mark the row
                    # done like any other, or --resume (which decides from the markers) would run it again.
                    self.ledger.commit(stem, result)
                return result, False, ""
            except RowError as exc:
                return attempt.failed(str(exc)), False, ""
            except PromptRejected as exc:
                fatal = ""
                if not self.cfg.job.is_row_specific(exc):  # the workflow itself is invalid: stop the run
                    fatal = self.fatal = f"ComfyUI rejected the prompt of row {row.row_id}:\n{exc}"
                    self.coord.stop.remote(fatal)
                return attempt.failed(" | ".join(str(exc).splitlines())), False, fatal
            except (ExecutionFailed, HeadlessError) as exc:
                failures += 1
                if failures > self.opts.retries or self.cancelled or self.fatal:
                    return attempt.failed(str(exc)), False, ""
                log.warning("row %s failed on %s (attempt %d): %s; retrying", row.row_id, url, failures, exc)
            except Exception as exc:  # noqa: BLE001 - a bug must not lose the row's result
                log.exception("unexpected error in row %s", row.row_id)
                return attempt.failed(f"{type(exc).__name__}: {exc}"), False, ""

    def _server_lost(self, url: str) -> str:
        """Get a working server after ``url`` went away; the reason the row fails when there is none."""
        with self.lock:
            if self.url != url:  # another thread already replaced it
                return ""
            if self.own is not None:  # our own server died: start a new one in its place
                log.warning("own ComfyUI server %s died; starting a new one", url)
                self.own.stop()
                try:
                    self.own.start()
                except HeadlessError as exc:
                    return f"own ComfyUI server died and could not be restarted: {exc}"
                self.url = self.own.url
                return ""
            self.coord.mark.remote(url, False)
            deadline = time.monotonic() + self.opts.server_wait
            while not self.cancelled:
                candidate = ray.get(self.coord.lease.remote(self.key, url))
                for probe in dict.fromkeys([candidate, *self.opts.servers]):
                    try:
                        ComfyClient(probe, timeout=5, use_websocket=False).ping()
                    except ServerDown:
                        self.coord.mark.remote(probe, False)
                        continue
                    self.coord.mark.remote(probe, True)
                    self.url = ray.get(self.coord.lease.remote(self.key)) if probe == candidate else probe
                    return ""
                if time.monotonic() > deadline:
                    break
                time.sleep(PROBE_INTERVAL_S)
            return (f"no ComfyUI server reachable for {self.opts.server_wait:.0f}s ({', '.join(self.opts.servers)});"
                    f" restart one and run again with --resume")


RowCallback = Callable[[RowResult, int, int], None]


def run_on_ray(job: RowJob, options: RayOptions, on_row: RowCallback | None = None) -> Summary:
    """Run the dataset on the Ray cluster ``ray.init`` connected to; results under ``options.out_dir``."""
    start = time.perf_counter()
    fs, files, kind = dataset_files(options.data)
    ledger = Ledger(options.out_dir, with_name=bool(options.name_column))
    run, seq, pending, last_flush = new_run_id(), 0, [], time.monotonic()
    summary = Summary(total=0)
    coordinator = Coordinator.remote(list(options.servers))
    n_actors = options.actors or (len(options.servers) if not options.comfyui else 1)
    if options.comfyui:
        gpus = options.gpus_per_actor
    else:
        gpus = 0.0  # attached servers are elsewhere; the actor only speaks HTTP
    # One Ray task carries per_server x rows_per_task rows: more rows per task spread Ray's per-task cost
    # (tens of ms) over more rows, fewer spread the rows more evenly over the actors.
    batch = max(1, options.per_server) * max(1, options.rows_per_task)
    # Every actor (= server) up before the first row: otherwise the first one ready takes short rows faster than
    # the others start, and a run on N servers runs on one.
    ray.data.DataContext.get_current().wait_for_min_actors_s = int(
        START_TIMEOUT_S + ATTACHED_ACTOR_START_S if options.comfyui else ATTACHED_ACTOR_START_S)
    ds = ray.data.read_datasource(RowsDatasource(files, kind, fs, block_rows=batch))
    ds = ds.map_batches(RowWorker, fn_constructor_args=(WorkerConfig(job, options, len(files) == 1), coordinator),
                        batch_size=batch, batch_format="pyarrow",
                        # One task running and one waiting per actor: an actor that is up first cannot queue up the
                        # rows an actor still starting would take (Ray's default lets each hold several).
                        compute=ray.data.ActorPoolStrategy(size=n_actors,
                                                           max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT),
                        num_gpus=gpus or None, num_cpus=options.cpus_per_actor if options.comfyui else 0.0)

    def flush() -> None:
        nonlocal seq, pending, last_flush
        ledger.write_part(pending, run, seq)
        seq, pending, last_flush = seq + 1, [], time.monotonic()

    def on_sigint(signum: int, frame: Any) -> None:
        if summary.cancelled:  # a second Ctrl-C: stop waiting for the actors
            raise KeyboardInterrupt
        summary.cancelled = True
        coordinator.cancel.remote()  # actors interrupt their prompts, report those rows, skip the rest

    previous = signal.signal(signal.SIGINT, on_sigint) if threading.current_thread() is threading.main_thread() \
        else None
    stream = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    try:
        for table in stream:
            for rec in table.to_pylist():
                result = RowResult(**{c: rec[c] or "" for c in RESULT_COLUMNS})
                pending.append(result)
                if rec["skipped"]:
                    summary.skipped += 1
                    continue
                counter = {OK: "ok", "interrupted": "interrupted"}.get(result.status, "failed")
                setattr(summary, counter, getattr(summary, counter) + 1)
                if rec["fatal"] and not summary.fatal:
                    summary.fatal = rec["fatal"]
                if on_row is not None:
                    on_row(result, summary.ok + summary.failed + summary.interrupted, -1)
            if len(pending) >= FLUSH_ROWS or time.monotonic() - last_flush > FLUSH_SECONDS:
                flush()
            if summary.fatal:
                break  # closing the stream shuts the actor pool down: no more rows are queued
    except KeyboardInterrupt:
        summary.cancelled = True
    except ray.exceptions.RayError as exc:  # e.g. an actor could not start its server: say why, briefly
        cause = str(exc).strip().splitlines()
        summary.fatal = "Ray stopped the run: " + (cause[-1] if cause else type(exc).__name__)
        raise HeadlessError(f"{summary.fatal}; rows done so far are kept: run again with --resume") from exc
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        close = getattr(stream, "close", None)
        if close is not None:
            close()
        flush()
        seen = summary.ok + summary.failed + summary.interrupted + summary.skipped
        if seen <= SMALL_RESULTS_ROWS:  # merging all runs' parts is cheap: write results.csv too
            rows = ledger.merged()
            summary.total = len(rows)
            ledger.write_csv(rows)
        else:
            summary.total = seen
        summary.seconds = time.perf_counter() - start
    return summary


def connect(address: str | None) -> None:
    """``ray.init`` to ADDRESS (or a new local Ray / $RAY_ADDRESS when empty), shipping this client's code."""
    if ray.is_initialized():
        return
    package = str(Path(gentor_headless.__file__).resolve().parent)
    try:
        ray.init(address=address or None, runtime_env={"py_modules": [package]}, log_to_driver=False,
                 configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
        where = f"the Ray cluster at {address!r}" if address else "a Ray cluster ($RAY_ADDRESS, or a local one)"
        raise HeadlessError(f"could not join {where}: {str(exc).strip().splitlines()[-1]}. Check the address "
                            f"(`ray status` on the head node) and, where the cluster uses Ray's token "
                            f"authentication, set RAY_AUTH_MODE=token and the token") from exc


def check_out_dir(ledger: Ledger, options: RayOptions) -> None:
    """Refuse to mix with an earlier run unless --resume / --overwrite say what to do."""
    if ledger.exists() and not (options.resume or options.overwrite):
        raise DatasetError(f"{ledger.out_dir} holds results of an earlier run; pass --resume to run only the "
                           f"rows not done, or --overwrite to start again")
    if options.overwrite:
        ledger.clear()
