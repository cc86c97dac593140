"""One dataset row -> one prompt -> its output files and its result row: the part both batch runners share.

The built-in runner (scheduler.py) and the Ray runner (ray_runner.py) differ only in how rows reach a
server and how failures are retried; mapping, uploads, seeds, output names, atomic writes and the result
row are made here, once.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable

from .client import ComfyClient, output_files
from .dataset import Mapping, Row, build_prompt
from .errors import HeadlessError, PromptRejected
from .files import write_atomic
from .results import OK, RowResult
from .workflow import Workflow, seed_targets, seeds_used

log = logging.getLogger(__name__)
def output_stem(row: Row) -> str:
    """What a row's output files are named after: its name-column value, else its row id."""
    return row.name or row.row_id


def output_name(row: Row, index: int, server_filename: str) -> str:
    """``<name or row id>_<index><suffix of the server's file>``: deterministic, so reruns overwrite."""
    return f"{output_stem(row)}_{index}{Path(server_filename).suffix or '.bin'}"


@dataclass(frozen=True)
class RowJob:
    """Everything that turns a row into a prompt and its outputs into files (the same for every row)."""

    workflow: Workflow
    mappings: tuple[Mapping, ...]
    base_dir: Path
    out_dir: Path
    seed_policy: str = "fixed"
    timeout: float | None = None
    url_timeout: float = 30.0
    extra_data: dict[str, Any] | None = None
    has_seed_column: bool = False

    def is_row_specific(self, exc: PromptRejected) -> bool:
        """True when every validation error names an input fed from the row (a bad cell, not the workflow)."""
        fed = {(m.target.node, m.target.input) for m in self.mappings}
        if self.has_seed_column:
            fed |= {(t.node, t.input) for t in seed_targets(self.workflow)}
        reasons = [(node_id, (r.get("extra_info") or {}).get("input_name"))
                   for node_id, info in exc.node_errors.items() for r in info.get("errors", [])]
        return bool(reasons) and all(reason in fed for reason in reasons)


Uploads = dict[str, str]


class RowAttempt:
    """One attempt at one row on one server; ``prompt_id`` is set once queued (for interrupting it)."""

    def __init__(self, job: RowJob, client: ComfyClient, row: Row, seed_salt: int,
                 uploads: Uploads | None = None) -> None:
        self.job, self.client, self.row = job, client, row
        self.rng = random.Random(seed_salt)
        self.uploads = uploads if uploads is not None else {}
        self.prompt_id = ""
        self.t0 = time.perf_counter()
        self.result = RowResult(row.row_id, "error", server=client.url, name=row.name or "")
        self.entry: dict[str, Any] | None = None

    def _upload(self, data: bytes, name: str) -> str:
        # uploads are content-addressed: each server receives an image once per run
        if name not in self.uploads:
            self.uploads[name] = self.client.upload_image(data, name)
        return self.uploads[name]

    def run(self, should_stop: Callable[[], bool] | None = None) -> RowResult:
        """Build the prompt, queue it, follow it, download its outputs; the ok result row.

        Raises what the client raises (RowError, PromptRejected, ExecutionFailed, ServerDown, Cancelled);
        the runner decides what each means for retries.
        """
        job = self.job
        prompt = build_prompt(job.workflow, self.row, list(job.mappings), job.base_dir, job.seed_policy,
                              self.rng, self._upload, job.url_timeout)
        self.result.seed = seeds_used(prompt)
        self.prompt_id = self.client.queue_prompt(prompt, job.extra_data)
        self.entry = self.client.wait(self.prompt_id, job.timeout, should_stop=should_stop)
        return self.succeeded(self.entry)

    def succeeded(self, entry: dict[str, Any]) -> RowResult:
        """Download a finished prompt's outputs under the row's names; the ok result row."""
        self.result.output_files = ";".join(self.download(entry))
        self.result.status, self.result.error = OK, ""
        self.result.seconds = f"{time.perf_counter() - self.t0:.3f}"
        return self.result

    def failed(self, error: str, status: str = "error") -> RowResult:
        """The result row of a failed (or interrupted) row."""
        self.result.status, self.result.error = status, error
        self.result.output_files = ""
        self.result.seconds = f"{time.perf_counter() - self.t0:.3f}"
        return self.result

    def cancel(self) -> RowResult:
        """Interrupt the prompt in flight; keep its outputs when it had finished anyway (they are valid)."""
        entry = None
        if self.prompt_id:
            try:
                entry = self.client.cancel(self.prompt_id)
            except HeadlessError as exc:
                log.warning("could not interrupt %s on %s: %s", self.prompt_id, self.client.url, exc)
        if entry is not None:
            try:
                return self.succeeded(entry)
            except HeadlessError as exc:
                log.warning("row %s finished but its outputs could not be fetched: %s", self.row.row_id, exc)
        return self.failed("stopped by the user (Ctrl-C); run again with --resume", status="interrupted")

    def download(self, entry: dict[str, Any]) -> list[str]:
        """Fetch every output file of the entry and write it as ``<stem>_<i><suffix>`` (temp file + rename)."""
        out = self.job.out_dir
        out.mkdir(parents=True, exist_ok=True)
        names = []
        for i, item in enumerate(output_files(entry)):
            data = self.client.view(item["filename"], item["subfolder"], item["type"])
            name = output_name(self.row, i, item["filename"])
            write_atomic(out / name, data)
            names.append(name)
        return names
