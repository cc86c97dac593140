"""Datasets and results of the Ray runner: rows read by Ray Data, outputs' done markers, results as Parquet.

Rows are read by a Ray Data file datasource (Ray lists the files — local paths or any filesystem pyarrow
understands —, schedules the read tasks and streams the blocks; pyarrow decodes CSV and Parquet). Ray's
own ``read_csv`` / ``read_json`` / ``read_parquet`` give no row's position in its file (only a hash), and
the deterministic output names, the ``row`` seed policy and resume need it, so each block carries the
position and the row's values as JSON (one schema for every format; cells keep the types the built-in
runner sees: CSV cells are strings).
"""
from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq
from ray.data.datasource import FileBasedDatasource

from .dataset import json_row
from .errors import DatasetError
from .files import write_atomic
from .results import OK, ResultsTable, RowResult

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
JSONL_BLOCK_ROWS = 4096  # rows per block read from a JSON-lines file
JSONL_COLUMN_PROBE_LINES = 10_000  # lines of the first file read in the driver to learn the columns
SMALL_RESULTS_ROWS = 100_000  # results.csv is written next to the Parquet results up to this many rows
MARKERS = ".gentor-rows"  # per-row done markers (written after the outputs: the commit point of a row)
RESULTS_DIR = "results.parquet"
ROW_SCHEMA = pa.schema([("pos", pa.int64()), ("file", pa.string()), ("values", pa.string())])


def dataset_files(data: str) -> tuple[pa_fs.FileSystem, list[str], str]:
    """The filesystem, the data files (sorted) and their format for ``--data`` (a file or a folder)."""
    try:
        fs, path = pa_fs.FileSystem.from_uri(data)
    except (pa.ArrowInvalid, ValueError):
        fs, path = pa_fs.LocalFileSystem(), str(Path(data).expanduser().resolve())
    info = fs.get_file_info(path)
    if info.type == pa_fs.FileType.NotFound:
        raise DatasetError(f"dataset {data!r} not found; pass --data rows.csv, rows.jsonl, rows.parquet or a "
                           f"folder of them (local, or a URI pyarrow reads such as s3://bucket/rows/)")
    if info.type == pa_fs.FileType.Directory:
        found = fs.get_file_info(pa_fs.FileSelector(path, recursive=True))
        files = sorted(f.path for f in found if f.type == pa_fs.FileType.File
                       and not Path(f.path).name.startswith(("_", ".")))
    else:
        files = [path]
    kinds = {FORMATS.get(Path(f).suffix.lower()) for f in files}
    if not files or None in kinds or len(kinds) != 1:
        raise DatasetError(f"dataset {data!r}: expected .csv, .jsonl or .parquet files of one kind "
                           f"(got {', '.join(sorted({Path(f).suffix or '(no suffix)' for f in files})) or 'none'})")
    return fs, files, kinds.pop()


def dataset_columns(fs: pa_fs.FileSystem, first: str, kind: str) -> list[str]:
    """Column names from the first file: the CSV header, the Parquet schema, or the keys of the first
    JSON lines (the whole dataset is never read by the driver)."""
    if kind == "parquet":
        with fs.open_input_file(first) as f:
            return list(pq.ParquetFile(f).schema_arrow.names)
    with fs.open_input_stream(first) as f:
        text = io.TextIOWrapper(f, encoding="utf-8-sig")
        if kind == "csv":
            header = next(csv.reader(text), [])
            if not header:
                raise DatasetError(f"{first}: no header row; the first line must name the columns")
            return [c.strip() for c in header]
        columns: list[str] = []
        for n, line in enumerate(text, 1):
            if n > JSONL_COLUMN_PROBE_LINES:
                break
            if line.strip():
                obj = json_row(line, first, n)
                columns += [k for k in obj if k not in columns]
        return columns


class RowsDatasource(FileBasedDatasource):
    """CSV / JSON lines / Parquet files as blocks of (position in file, file, row values as JSON)."""

    def __init__(self, paths: list[str], kind: str, filesystem: pa_fs.FileSystem, block_rows: int = 1) -> None:
        super().__init__(paths, filesystem=filesystem)
        self.kind = kind
        self.block_rows = block_rows  # small blocks: a block is what one actor takes at a time

    def _open_input_source(self, filesystem: Any, path: str, **open_args: Any) -> pa.NativeFile:
        if self.kind == "parquet":  # Parquet needs random access
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        pos = 0
        for chunk in self._records(f, path):
            for i in range(0, len(chunk), self.block_rows):
                yield self._block(chunk[i:i + self.block_rows], pos, path)
                pos += len(chunk[i:i + self.block_rows])

    @staticmethod
    def _block(records: list[dict[str, Any]], pos: int, path: str) -> pa.Table:
        return pa.table({"pos": list(range(pos, pos + len(records))), "file": [path] * len(records),
                         "values": [json.dumps(r, default=str) for r in records]}, schema=ROW_SCHEMA)

    def _records(self, f: pa.NativeFile, path: str) -> Iterator[list[dict[str, Any]]]:
        if self.kind == "parquet":
            for batch in pq.ParquetFile(f).iter_batches():
                yield batch.to_pylist()
        elif self.kind == "csv":
            # Column names generated, so the header is read as the first data row: every column is
            # then inferred as text (cells stay strings, as the built-in runner's csv module reads them).
            reader = pa_csv.open_csv(f, read_options=pa_csv.ReadOptions(autogenerate_column_names=True),
                                     parse_options=pa_csv.ParseOptions(newlines_in_values=True))
            names: list[str] | None = None
            for batch in reader:
                rows = batch.to_pylist()
                if names is None:
                    names = [str(v).lstrip("\ufeff").strip() for v in rows[0].values()]
                    rows = rows[1:]
                yield [dict(zip(names, ("" if v is None else v for v in r.values()))) for r in rows]
        else:
            chunk: list[dict[str, Any]] = []
            for n, line in enumerate(io.TextIOWrapper(f, encoding="utf-8-sig"), 1):
                if line.strip():
                    chunk.append(json_row(line, path, n))
                if len(chunk) >= JSONL_BLOCK_ROWS:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk


def row_id(pos: int, file: str, single_file: bool) -> str:
    """The position in the file (as the built-in runner numbers rows); ``<file stem>-<pos>`` for a folder."""
    return str(pos) if single_file else f"{Path(file).stem}-{pos}"


# ----------------------------------------------------------------------------------------- ledger
class Ledger:
    """What is done, on disk under ``--out``: a marker per finished row, results as Parquet parts.

    A row is done when its marker (``.gentor-rows/<stem>.json``, its ok result row) exists and every
    file it names is there. The marker is written after the outputs, so a crash between an image and
    its result row neither loses the row (no marker: it runs again, overwriting the same names) nor
    runs it twice (marker: skipped, its result row is taken from the marker).
    """

    def __init__(self, out_dir: Path, with_name: bool) -> None:
        self.out_dir = Path(out_dir)
        self.markers = self.out_dir / MARKERS
        self.results_dir = self.out_dir / RESULTS_DIR
        self.with_name = with_name

    def exists(self) -> bool:
        """Whether an earlier run left results or markers here."""
        return self.results_dir.is_dir() or self.markers.is_dir()

    def clear(self) -> None:
        """--overwrite: forget earlier runs (their output files are overwritten as rows run again)."""
        for folder in (self.markers, self.results_dir):
            if folder.is_dir():
                for p in folder.iterdir():
                    p.unlink()
                folder.rmdir()
        (self.out_dir / "results.csv").unlink(missing_ok=True)

    def done(self, stem: str) -> RowResult | None:
        """The ok result of a finished row whose files are all present, else None."""
        try:
            data = json.loads((self.markers / f"{stem}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        result = RowResult(**{k: str(data.get(k, "")) for k in RowResult.__dataclass_fields__})
        files = [n for n in result.output_files.split(";") if n]
        if result.status != OK or not all((self.out_dir / n).is_file() for n in files):
            return None
        return result

    def commit(self, stem: str, result: RowResult) -> None:
        """Mark a row done (after its outputs were written)."""
        self.markers.mkdir(parents=True, exist_ok=True)
        write_atomic(self.markers / f"{stem}.json", json.dumps(asdict(result)).encode("utf-8"))

    def claim(self, stem: str, row: str) -> str | None:
        """Reserve an output name for a row; the row id that holds it already when another row does."""
        self.markers.mkdir(parents=True, exist_ok=True)
        path = self.markers / f"{stem}.claim"
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            holder = path.read_text(encoding="utf-8").strip()
            return None if holder in ("", row) else holder
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(row)
        return None

    # -------------------------------------------------------------- results
    @property
    def columns(self) -> list[str]:
        return ResultsTable(self.out_dir / "results.csv", with_name=self.with_name).columns

    def write_part(self, results: list[RowResult], run: str, seq: int) -> None:
        """One Parquet part of this run's result rows (temp file + rename)."""
        if not results:
            return
        self.results_dir.mkdir(parents=True, exist_ok=True)
        table = pa.table({c: [getattr(r, c) for r in results] for c in self.columns})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        write_atomic(self.results_dir / f"{run}-{seq:06d}.parquet", sink.getvalue().to_pybytes())

    def merged(self) -> dict[str, RowResult]:
        """Every row's latest result over all runs (an ok row is never replaced: it is not run again)."""
        rows: dict[str, RowResult] = {}
        parts = sorted(self.results_dir.glob("*.parquet")) if self.results_dir.is_dir() else []
        for part in parts:  # names start with the run's start time: oldest first
            for rec in pq.read_table(part).to_pylist():
                result = RowResult(**{k: str(rec.get(k) or "") for k in RowResult.__dataclass_fields__})
                if rows.get(result.row_id, result).status != OK or result.status == OK:
                    rows[result.row_id] = result
        return rows

    def write_csv(self, rows: dict[str, RowResult]) -> Path:
        """results.csv: the built-in runner's file, for results small enough to be read as one."""
        table = ResultsTable(self.out_dir / "results.csv", with_name=self.with_name, fsync=False)
        table.rows = rows
        table.save()
        return table.path


def new_run_id() -> str:
    """Sortable id of one run (its start time), prefixing its Parquet parts."""
    return time.strftime("%Y%m%dT%H%M%S") + f"{time.time() % 1:.6f}"[1:].replace(".", "_")

