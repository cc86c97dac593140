"""results.csv: one line per dataset row, rewritten atomically (temp file + os.replace) after every row."""
from __future__ import annotations

import csv
import io
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import DatasetError
from .files import write_atomic

COLUMNS = ["row_id", "status", "output_files", "seed", "server", "seconds", "error"]
OK = "ok"


@dataclass
class RowResult:
    """What happened to one row (``status``: ok, error, interrupted)."""

    row_id: str
    status: str
    output_files: str = ""
    seed: str = ""
    server: str = ""
    seconds: str = ""
    error: str = ""
    name: str = ""


class ResultsTable:
    """Thread-safe table keyed by row id, mirrored to a CSV file after every change."""

    def __init__(self, path: str | Path, with_name: bool = False, fsync: bool = True) -> None:
        self.path = Path(path)
        self.with_name = with_name
        self.fsync = fsync
        self.rows: dict[str, RowResult] = {}
        self._lock = threading.Lock()

    @property
    def columns(self) -> list[str]:
        """Column order of the file (``name`` after ``row_id`` when a name column is used)."""
        return COLUMNS[:1] + ["name"] + COLUMNS[1:] if self.with_name else list(COLUMNS)

    def load(self) -> None:
        """Read an existing results.csv (the source of truth for --resume)."""
        if not self.path.is_file():
            return
        with self.path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DatasetError(f"{self.path} is not a results file of this tool (missing columns "
                                   f"{', '.join(missing)}; found {', '.join(reader.fieldnames or [])}); "
                                   f"move it away or choose another --out")
            for line in reader:
                known = {k: (line.get(k) or "") for k in RowResult.__dataclass_fields__}
                self.rows[known["row_id"]] = RowResult(**known)

    def done_ids(self) -> set[str]:
        """Row ids whose status is ok."""
        return {k for k, v in self.rows.items() if v.status == OK}

    def record(self, result: RowResult) -> None:
        """Insert or replace one row's result and rewrite the file atomically."""
        with self._lock:
            self.rows[result.row_id] = result
            self._write()

    def save(self) -> None:
        """Rewrite the file from ``rows`` (atomically)."""
        with self._lock:
            self._write()

    def _write(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for key in sorted(self.rows, key=lambda k: (0, int(k)) if k.isdigit() else (1, k)):
            writer.writerow(asdict(self.rows[key]))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, buf.getvalue().encode("utf-8"), fsync=self.fsync)
