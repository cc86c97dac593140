"""Run an example API workflow's Gentor part without ComfyUI, the way the nodes pass it on: the loader node's
widgets to the backend's ``load_handle``, the settings node's widgets to ``make_settings``, the task node's
widgets and LoadImage inputs to the sampler (shared by the per-backend workflow tests)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from PIL import Image

from gentor.loaders.cache import ModelHandle
from gentor.samplers.common import Request, Result
from tests import workflow_files as wf

MAX_IMAGE_INPUTS = 10


@dataclass(frozen=True)
class Backend:
    """What ``run_api`` needs of one backend: its nodes' ids and the functions those nodes call."""

    loader_node: str
    load_handle: Callable[..., ModelHandle]
    run: Callable[[ModelHandle, str, Request], Result]
    settings_node: str = ""
    make_settings: Callable[..., Any] | None = None
    settings_keys: tuple[str, ...] = ()  # the settings node's widgets, as make_settings names its parameters
    image_mode: str = "RGB"


@dataclass
class WorkflowRun:
    """One ``run_api`` call: what went in (handle, settings, request) and what came out."""

    handle: ModelHandle
    settings: Any
    request: Request
    result: Result


def only(api: dict, class_type: str) -> tuple[str, dict]:
    """(node id, node) of the workflow's one ``class_type`` node."""
    found = wf.by_class(api, class_type)
    assert len(found) == 1, f"expected one {class_type} node, found {len(found)}"
    return found[0]


def input_image(api: dict, link: list, mode: str = "RGB") -> Image.Image:
    """The picture a LoadImage node behind ``link`` loads (workflows/inputs/), converted to ``mode``."""
    with Image.open(wf.INPUTS_DIR / api[link[0]]["inputs"]["image"]) as img:
        return img.convert(mode)


def task_request(api: dict, settings: Any = None, image_mode: str = "RGB") -> tuple[str, Request]:
    """(task, Request) of the workflow's one task node: its widgets, its LoadImage inputs in image_k order."""
    _, task = wf.sampler_of(api)
    inputs = task["inputs"]
    images = [input_image(api, inputs[f"image_{k}"], image_mode) for k in range(1, MAX_IMAGE_INPUTS + 1)
              if inputs.get(f"image_{k}") is not None]
    request = Request(prompt=inputs["prompt"], negative=inputs["negative"], seed=inputs["seed"],
                      steps=inputs["steps"], cfg=inputs["cfg"], width=inputs["width"], height=inputs["height"],
                      batch_size=inputs.get("batch_size", 1), images=images, settings=settings)
    return ("edit" if images else "t2i"), request


def load_handle(api: dict, backend: Backend) -> ModelHandle:
    """The loader node's widgets to ``load_handle`` (the memory socket: default options, as unconnected)."""
    _, load = only(api, backend.loader_node)
    widgets = {k: v for k, v in load["inputs"].items() if not wf.is_link(v)}
    return backend.load_handle(**widgets, memory=None)


def settings_of(api: dict, backend: Backend) -> Any:
    """The settings node's bundle, or None where the backend has no settings node."""
    if not backend.settings_node:
        return None
    _, node = only(api, backend.settings_node)
    return backend.make_settings(**{k: node["inputs"][k] for k in backend.settings_keys})


def run_api(api: dict, backend: Backend) -> WorkflowRun:
    """Run the workflow's loader -> settings -> task chain on the backend's real loader and sampler."""
    handle = load_handle(api, backend)
    settings = settings_of(api, backend)
    task, request = task_request(api, settings, backend.image_mode)
    return WorkflowRun(handle, settings, request, backend.run(handle, task, request))
