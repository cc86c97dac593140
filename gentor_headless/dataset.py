"""Datasets (CSV / JSONL rows), ``--map COLUMN=NODE.INPUT`` parsing, and building one prompt per row."""
from __future__ import annotations

import csv
import hashlib
import json
import random
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

from .errors import DatasetError, RowError
from .workflow import Target, Workflow, apply_seed_policy, clone, drop_node, is_image_target, \
    parse_assignment, parse_target, seed_targets, set_value

Uploader = Callable[[bytes, str], str]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Leading bytes of the formats ComfyUI's LoadImage (PIL) reads; WebP is RIFF....WEBP.
IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
               (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


@dataclass
class Row:
    """One dataset row: its id (0-based position), optional output name and column values."""

    row_id: str
    index: int
    values: dict[str, Any]
    name: str | None = None


@dataclass
class Mapping:
    """``COLUMN=NODE.INPUT``; image mappings upload their files / URLs."""

    column: str
    target: Target
    image: bool


@dataclass
class Dataset:
    """Rows, their columns and the folder relative image paths are resolved against."""

    path: Path
    columns: list[str]
    rows: list[Row] = field(default_factory=list)


def load_dataset(path: str | Path) -> Dataset:
    """Read ``.csv`` (header row) or ``.jsonl`` / ``.json`` (one object per line)."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"dataset file {str(p)!r} not found; pass --data rows.csv or rows.jsonl")
    rows: list[dict[str, Any]] = []
    columns: list[str] = []
    if p.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            obj = json_row(line, p, n)
            rows.append(obj)
            columns += [k for k in obj if k not in columns]
    else:
        with p.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in reader.fieldnames or []]
            for raw in reader:
                rows.append({(k or "").strip(): v for k, v in raw.items() if k is not None})
        if not columns:
            raise DatasetError(f"{p}: no header row; the first line must name the columns")
    return Dataset(p, columns, [Row(str(i), i, r) for i, r in enumerate(rows)])


def json_row(line: str, path: str | Path, n: int) -> dict[str, Any]:
    """One line of a JSON-lines dataset: a JSON object, else a DatasetError naming the file and line."""
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise DatasetError(f"{path}: line {n} is not JSON ({exc}); expected one object per line") from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: line {n} is {type(obj).__name__}, expected a JSON object")
    return obj


def missing_column(ds: Dataset, column: str, what: str) -> DatasetError:
    """The error for an option naming a column the dataset lacks (lists the columns it has)."""
    return DatasetError(f"{what} names column {column!r}, which {ds.path.name} does not have; "
                        f"its columns are: {', '.join(ds.columns) or '(none)'}")


def parse_maps(workflow: Workflow, ds: Dataset, maps: list[str],
               image_columns: list[str] | None = None) -> list[Mapping]:
    """Check every ``--map`` against the dataset's columns and the workflow's nodes and inputs."""
    out = []
    for item in maps:
        column, target_text = parse_assignment(item, "--map")
        if column not in ds.columns:
            raise missing_column(ds, column, f"--map {item}")
        target = parse_target(workflow, target_text.strip(), f"--map {item}")
        image = is_image_target(workflow, target) or column in (image_columns or [])
        out.append(Mapping(column, target, image))
    for column in image_columns or []:
        if column not in ds.columns:
            raise missing_column(ds, column, "--image-column")
    return out


def safe_name(text: str) -> str:
    """A file-name-safe stem of a name-column value (image suffix dropped)."""
    text = text.strip()
    if text.lower().endswith(IMAGE_SUFFIXES):
        text = text.rsplit(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "_"


def apply_name_column(ds: Dataset, column: str | None) -> None:
    """Set ``row.name`` from the name column; names must be present and unique (they name files)."""
    if not column:
        return
    if column not in ds.columns:
        raise missing_column(ds, column, "--name-column")
    seen: dict[str, str] = {}
    for row in ds.rows:
        value = str(row.values.get(column) or "").strip()
        if not value:
            raise DatasetError(f"row {row.row_id} has no value in the name column {column!r}; "
                               f"fill it in or drop --name-column")
        name = safe_name(value)
        if name in seen:
            raise DatasetError(f"name column {column!r}: rows {seen[name]} and {row.row_id} both give the "
                               f"output name {name!r}; names must be unique")
        seen[name] = row.row_id
        row.name = name


def read_image(value: str, base_dir: Path, timeout: float = 30.0) -> tuple[bytes, str]:
    """Bytes and file name of a local path (relative to the dataset or the cwd) or an http(s) URL."""
    value = value.strip()
    if value.lower().startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(value, timeout=timeout) as resp:  # noqa: S310 - http(s) only
                data = resp.read()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = (f"HTTP {exc.code} {exc.reason}" if isinstance(exc, urllib.error.HTTPError)
                      else getattr(exc, "reason", exc))
            raise RowError(f"image URL {value} could not be downloaded ({reason})") from exc
        name = Path(urllib.request.url2pathname(value.split("?", 1)[0])).name or "image.png"
        return data, name
    path = Path(value).expanduser()
    candidates = [path] if path.is_absolute() else [base_dir / path, Path.cwd() / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.read_bytes(), candidate.name
    # the dataset's folder is often the working directory: name each folder once
    folders = dict.fromkeys(str(c.parent.resolve()) for c in candidates)
    raise RowError(f"image file {value!r} not found (looked in {', '.join(folders)})")


def image_kind(data: bytes) -> str | None:
    """The image format the bytes start with (PNG, JPEG, GIF, WebP, BMP, TIFF), or None."""
    if data[:4] == b"RIFF":
        return "WebP" if data[8:12] == b"WEBP" else None
    return next((kind for magic, kind in IMAGE_MAGIC if data.startswith(magic)), None)


def check_image(data: bytes, name: str, where: str) -> None:
    """Refuse a reference that is not an image before it is uploaded (ComfyUI would fail the row later,
    and a retry cannot help)."""
    if image_kind(data) is None:
        raise RowError(f"{where}: {name!r} is not an image (got {len(data)} bytes starting with {data[:16]!r}, "
                       f"expected a PNG, JPEG, WebP, GIF, BMP or TIFF file). Point the column at an image.")


def upload_name(data: bytes, name: str) -> str:
    """Content-addressed upload name, so identical images are stored once and never collide."""
    digest = hashlib.sha1(data).hexdigest()[:12]
    return f"gentor_{digest}_{safe_name(name)}{Path(name).suffix.lower() or '.png'}"


def build_prompt(workflow: Workflow, row: Row, mappings: list[Mapping], base_dir: Path,
                 seed_policy: str, rng: random.Random, upload: Uploader,
                 url_timeout: float = 30.0) -> Workflow:
    """The row's prompt: mapped values (images uploaded), seeds per policy; RowError on bad cells.

    An empty cell keeps the workflow's value, except for an image column: there the loader node and
    the inputs it feeds are removed (an optional reference image left out).
    """
    prompt = clone(workflow)
    mapped: set[Target] = set()
    for m in mappings:
        value = row.values.get(m.column)
        if value is None or (isinstance(value, str) and not value.strip()):
            if m.image:
                drop_node(prompt, m.target.node)
            continue
        if m.target.node not in prompt:
            continue  # removed by an empty image cell earlier
        where = f"row {row.row_id} column {m.column!r} (-> {m.target})"
        if m.image:
            data, name = read_image(str(value), base_dir, url_timeout)
            check_image(data, name, where)
            value = upload(data, upload_name(data, name))
        try:
            set_value(prompt, m.target, value, where)
        except Exception as exc:
            raise RowError(str(exc)) from exc
        mapped.add(m.target)
    seed_cell = row.values.get("seed")
    if seed_cell not in (None, "") and not any(m.column == "seed" for m in mappings):
        for target in seed_targets(prompt):
            if target not in mapped:
                try:
                    set_value(prompt, target, seed_cell, f"row {row.row_id} column 'seed'")
                except Exception as exc:
                    raise RowError(str(exc)) from exc
                mapped.add(target)
    apply_seed_policy(prompt, seed_policy, row.index, rng, skip=mapped)
    return prompt
