"""Exceptions of the headless client; every message says what was found, what was expected, what to do."""
from __future__ import annotations

from typing import Any


class HeadlessError(Exception):
    """Base class of every error the headless client raises on purpose."""


class UsageError(HeadlessError):
    """Bad command line, workflow, mapping or dataset: nothing was queued."""


class WorkflowError(UsageError):
    """The workflow file or a --set/--map target is wrong."""


class ConversionError(WorkflowError):
    """A UI-format workflow cannot be converted faithfully to the API format."""


class DatasetError(UsageError):
    """The dataset file or its columns do not match what the command needs."""


class ServerDown(HeadlessError):
    """A ComfyUI server could not be reached or went away while a prompt was running."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(
            f"ComfyUI server {url} is not reachable ({reason}). Check that it is running "
            f"(python main.py --listen ... --port ...) and that the URL is right.")
        self.url = url
        self.reason = reason


class NoServer(HeadlessError):
    """None of the --server URLs answers."""


class RowError(HeadlessError):
    """A dataset row cannot be run (missing image file, unreachable URL, bad value); others go on."""


class PromptRejected(HeadlessError):
    """ComfyUI refused the prompt (HTTP 400): validation failed; carries ComfyUI's own report."""

    def __init__(self, error: Any, node_errors: dict[str, Any]) -> None:
        self.error = error
        self.node_errors = node_errors or {}
        super().__init__(format_validation(error, self.node_errors))


class ExecutionFailed(HeadlessError):
    """The prompt was queued but failed while running (execution_error) or was interrupted."""

    def __init__(self, message: str, details: dict[str, Any] | None = None,
                 interrupted: bool = False) -> None:
        super().__init__(message)
        self.details = details or {}
        self.interrupted = interrupted


class Cancelled(HeadlessError):
    """The user stopped the run (Ctrl-C)."""


def format_validation(error: Any, node_errors: dict[str, Any]) -> str:
    """Format a /prompt 400 answer the way ComfyUI logs it (``* Class id:`` / ``  - message: details``)."""
    lines: list[str] = []
    if isinstance(error, dict):
        lines.append(f"{error.get('message', 'Prompt rejected')}"
                     + (f" ({error.get('type')})" if error.get("type") else ""))
        details = error.get("details")
        if details and not node_errors:
            lines.append(f"  {details}")
    elif error:
        lines.append(str(error))
    for node_id, info in (node_errors or {}).items():
        lines.append(f"* {info.get('class_type', '?')} {node_id}:")
        for reason in info.get("errors", []):
            lines.append(f"  - {reason.get('message', '')}: {reason.get('details', '')}")
    return "\n".join(lines) if lines else "ComfyUI rejected the prompt (no details given)"


def format_execution_error(data: dict[str, Any], traceback: bool = False) -> str:
    """Format an ``execution_error`` message (node, exception type and message, optional traceback)."""
    head = (f"node {data.get('node_id', '?')} ({data.get('node_type', '?')}) raised "
            f"{data.get('exception_type', 'an exception')}: {data.get('exception_message', '').strip()}")
    if traceback and data.get("traceback"):
        return head + "\n" + "".join(data["traceback"]).rstrip()
    return head
