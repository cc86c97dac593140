"""Where the example workflows are and how to read them (UI files workflows/*.json, API copies
workflows/api/*.json, their input images workflows/inputs/)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PACK_ROOT = Path(__file__).resolve().parents[1]
NODES_DIR = PACK_ROOT / "nodes"
WORKFLOWS_DIR = PACK_ROOT / "workflows"
API_DIR = WORKFLOWS_DIR / "api"
INPUTS_DIR = WORKFLOWS_DIR / "inputs"


def load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def workflow_names() -> list[str]:
    return sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))


def load_pair(name: str) -> tuple[dict, dict]:
    return load_json(WORKFLOWS_DIR / f"{name}.json"), load_json(API_DIR / f"{name}.json")


def dump_json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def sampler_of(api: dict) -> tuple[str, dict]:
    """(node id, node) of the node whose IMAGE the first SaveImage saves."""
    save = next(n for n in api.values() if n["class_type"] == "SaveImage")
    src = save["inputs"]["images"][0]
    return src, api[src]


def load_api(name: str) -> dict:
    """The API copy of example ``name``, freshly read (callers may change it)."""
    return load_json(API_DIR / f"{name}.json")


def first_of(api: dict, class_type: str) -> tuple[str, dict]:
    """(node id, node) of the first API node of ``class_type``."""
    return next((nid, n) for nid, n in api.items() if n["class_type"] == class_type)


def by_class(api: dict, class_type: str) -> list[tuple[str, dict]]:
    """(node id, node) of every API node of ``class_type``, in file order."""
    return [(nid, n) for nid, n in api.items() if n["class_type"] == class_type]


def is_link(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool))
