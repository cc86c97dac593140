"""API-format workflows: loading, node/input targets (``NODE.INPUT``), typed values, seeds, --set."""
from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import WorkflowError

SEED_INPUTS = ("seed", "noise_seed")
IMAGE_LOADERS = ("LoadImage", "LoadImageMask", "LoadImageOutput")

Workflow = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Target:
    """One input of one node of an API workflow."""

    node: str
    input: str

    def __str__(self) -> str:
        return f"{self.node}.{self.input}"


def is_api_format(data: Any) -> bool:
    """True for ``{id: {"class_type": ..., "inputs": {...}}}``."""
    return isinstance(data, dict) and bool(data) and all(
        isinstance(v, dict) and "class_type" in v for v in data.values())


def is_ui_format(data: Any) -> bool:
    """True for a saved UI workflow (``nodes`` and ``links`` lists)."""
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def load_json(path: str | Path) -> Any:
    """Read a workflow file, with a clear message when it is missing or not JSON."""
    p = Path(path)
    if not p.is_file():
        raise WorkflowError(f"workflow file {str(p)!r} not found; pass the path of a .json workflow "
                            f"(API format: File > Export (API) in ComfyUI)")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise WorkflowError(f"workflow file {str(p)!r} is not valid JSON ({exc})") from exc


def unwrap_api(data: Any) -> Workflow | None:
    """Return the API prompt inside ``data`` (bare, or wrapped as ``{"prompt": {...}}``), else None."""
    if is_api_format(data):
        return data
    if isinstance(data, dict) and is_api_format(data.get("prompt")):
        return data["prompt"]
    return None


def node_label(workflow: Workflow, node_id: str) -> str:
    """``id ClassType ("title")`` for messages."""
    node = workflow[node_id]
    title = (node.get("_meta") or {}).get("title")
    extra = f' "{title}"' if title and title != node["class_type"] else ""
    return f"{node_id} {node['class_type']}{extra}"


def describe_nodes(workflow: Workflow) -> str:
    """One line per node: id, class, title and its inputs (linked inputs marked) for error messages."""
    lines = []
    for node_id in sorted(workflow, key=lambda k: (len(k), k)):
        inputs = workflow[node_id].get("inputs") or {}
        names = [f"{k} (linked)" if is_link(v) else k for k, v in inputs.items()]
        lines.append(f"  {node_label(workflow, node_id)}: {', '.join(names) or '(no inputs)'}")
    return "\n".join(lines)


def is_link(value: Any) -> bool:
    """``[node_id, output_index]`` in an API workflow."""
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))
            and not isinstance(value[0], bool) and isinstance(value[1], int))


def find_node(workflow: Workflow, ref: str) -> str:
    """Resolve a node id or a unique node title to the node id."""
    if ref in workflow:
        return ref
    matches = [k for k, v in workflow.items() if (v.get("_meta") or {}).get("title") == ref]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise WorkflowError(f"node title {ref!r} is used by several nodes ({', '.join(matches)}); "
                            f"use the node id instead. Nodes in the workflow:\n{describe_nodes(workflow)}")
    raise WorkflowError(f"no node with id or title {ref!r} in the workflow. Nodes and their inputs:\n"
                        f"{describe_nodes(workflow)}")


def parse_target(workflow: Workflow, text: str, what: str = "target") -> Target:
    """Parse ``NODE.INPUT`` (node id or title) and check both exist in the workflow."""
    if "." not in text:
        raise WorkflowError(f"{what} {text!r} is not NODE.INPUT (e.g. 3.seed). Nodes and their inputs:\n"
                            f"{describe_nodes(workflow)}")
    ref, name = text.rsplit(".", 1)
    node_id = find_node(workflow, ref)
    inputs = workflow[node_id].get("inputs") or {}
    if name not in inputs:
        raise WorkflowError(
            f"node {node_label(workflow, node_id)} has no input {name!r} (from {what} {text!r}); "
            f"its inputs are: {', '.join(inputs) or '(none)'}. Nodes and their inputs:\n"
            f"{describe_nodes(workflow)}")
    if is_link(inputs[name]):
        src = str(inputs[name][0])
        raise WorkflowError(
            f"input {name!r} of node {node_label(workflow, node_id)} is connected to node "
            f"{node_label(workflow, src) if src in workflow else src}; a value cannot replace a link. "
            f"Set the value on the node that produces it instead.")
    return Target(node_id, name)


def coerce(value: Any, current: Any, where: str) -> Any:
    """Convert a value from the command line or a dataset cell to the type of the input's current value."""
    try:
        if isinstance(current, bool):
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(current, int):
            if isinstance(value, bool):
                raise ValueError
            number = float(value) if not isinstance(value, int) else value
            if number != int(number):
                raise ValueError
            return int(number)
        if isinstance(current, float):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
    except (ValueError, TypeError, OverflowError):
        kind = {bool: "true/false", int: "an integer", float: "a number"}[type(current)]
        raise WorkflowError(f"{where}: {value!r} is not {kind} (the workflow has {current!r} there)") from None
    if isinstance(current, str):
        return value if isinstance(value, str) else json.dumps(value) if isinstance(value, (dict, list)) \
            else str(value)
    return value


def set_value(workflow: Workflow, target: Target, value: Any, where: str) -> None:
    """Write a coerced value into the workflow (in place)."""
    inputs = workflow[target.node]["inputs"]
    inputs[target.input] = coerce(value, inputs[target.input], where)


def parse_assignment(text: str, what: str = "--set") -> tuple[str, str]:
    """Split ``LEFT=RIGHT`` at the first ``=``."""
    if "=" not in text:
        raise WorkflowError(f"{what} {text!r} has no '='; expected e.g. "
                            f"{'3.steps=20' if what == '--set' else 'prompt=6.text'}")
    left, right = text.split("=", 1)
    return left.strip(), right


def apply_sets(workflow: Workflow, sets: list[str]) -> None:
    """Apply ``--set NODE.INPUT=VALUE`` options (VALUE coerced to the input's type)."""
    for item in sets:
        left, value = parse_assignment(item, "--set")
        target = parse_target(workflow, left, "--set")
        set_value(workflow, target, value, f"--set {item}")


def seed_targets(workflow: Workflow) -> list[Target]:
    """Literal integer seed inputs (``seed`` / ``noise_seed``) of the workflow."""
    found = []
    for node_id in sorted(workflow, key=lambda k: (len(k), k)):
        inputs = workflow[node_id].get("inputs") or {}
        for name in SEED_INPUTS:
            if isinstance(inputs.get(name), int) and not isinstance(inputs.get(name), bool):
                found.append(Target(node_id, name))
    return found


def apply_seed_policy(workflow: Workflow, policy: str, row_index: int,
                      rng: random.Random, skip: set[Target] | frozenset[Target] = frozenset()) -> None:
    """fixed: keep the workflow's seeds; row: seed + row index; random: a fresh seed per row."""
    if policy not in ("fixed", "row", "random"):
        raise WorkflowError(f"--seed-policy {policy!r}: expected fixed, row or random")
    for target in seed_targets(workflow):
        if target in skip or policy == "fixed":
            continue
        inputs = workflow[target.node]["inputs"]
        inputs[target.input] = (inputs[target.input] + row_index if policy == "row"
                                else rng.randrange(0, 2**32))


def seeds_used(workflow: Workflow) -> str:
    """The seed values of the workflow as a results.csv cell (``;``-joined when several differ)."""
    values = []
    for target in seed_targets(workflow):
        v = str(workflow[target.node]["inputs"][target.input])
        if v not in values:
            values.append(v)
    return ";".join(values)


def is_image_target(workflow: Workflow, target: Target) -> bool:
    """A LoadImage-style ``image`` input: its dataset values are uploaded files."""
    return target.input == "image" and workflow[target.node]["class_type"] in IMAGE_LOADERS


def drop_node(workflow: Workflow, node_id: str) -> None:
    """Remove a node and every input linked to it (used for empty optional image cells)."""
    workflow.pop(node_id, None)
    changed = True
    while changed:
        changed = False
        for other in list(workflow.values()):
            inputs = other.get("inputs") or {}
            for name, value in list(inputs.items()):
                if is_link(value) and str(value[0]) not in workflow:
                    del inputs[name]
                    changed = True


def clone(workflow: Workflow) -> Workflow:
    """Deep copy (each row gets its own)."""
    return copy.deepcopy(workflow)
