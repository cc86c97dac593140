"""Run an example API workflow's Gentor part without ComfyUI, the way the nodes pass it on (shared by the
per-backend workflow tests). From the task node (the one whose image is saved) back along its links: the
model (loader widgets + its Memory Options node to ``load_handle``, then each Gentor LoRA on the way), the
settings node's widgets to ``make_settings``, the task's own widgets, LoadImage inputs and Speed Options to the
sampler."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from PIL import Image

from gentor.loaders import lora
from gentor.loaders.cache import ModelHandle
from gentor.loaders.memory import MemoryOptions
from gentor.samplers.common import Request, Result
from gentor.samplers.speed import SpeedOptions
from tests import workflow_files as wf

MAX_IMAGE_INPUTS = 10
LORA_NODE = "GentorLoRA"
MEMORY_NODE = "GentorMemoryOptions"
SPEED_NODE = "GentorSpeedOptions"


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
    """(task, Request) of the workflow's one task node: its widgets, its LoadImage inputs in image_k order, its
    Speed Options node."""
    _, task = wf.sampler_of(api)
    inputs = task["inputs"]
    images = [input_image(api, inputs[f"image_{k}"], image_mode) for k in range(1, MAX_IMAGE_INPUTS + 1)
              if inputs.get(f"image_{k}") is not None]
    speed = linked(api, task, "speed")
    if speed is not None:
        assert speed["class_type"] == SPEED_NODE, speed["class_type"]
        speed = SpeedOptions(**widgets(speed))
    request = Request(prompt=inputs["prompt"], negative=inputs["negative"], seed=inputs["seed"],
                      steps=inputs["steps"], cfg=inputs["cfg"], width=inputs["width"], height=inputs["height"],
                      batch_size=inputs.get("batch_size", 1), images=images, settings=settings, speed=speed)
    return ("edit" if images else "t2i"), request


def widgets(node: dict) -> dict:
    """A node's widget values (its inputs that are not links)."""
    return {k: v for k, v in node["inputs"].items() if not wf.is_link(v)}


def linked(api: dict, node: dict, name: str) -> dict | None:
    """The node behind ``node``'s input ``name`` (None when the input is not connected)."""
    link = node["inputs"].get(name)
    return api[link[0]] if link is not None else None


def model_of(api: dict, node: dict, backend: Backend) -> ModelHandle:
    """The handle ``node``'s model input carries: the loader's (with its memory options), plus each LoRA."""
    source = linked(api, node, "model")
    if source["class_type"] == LORA_NODE:
        w = widgets(source)
        return lora.with_lora(model_of(api, source, backend), w["lora_name"], w["strength"])
    assert source["class_type"] == backend.loader_node, source["class_type"]
    memory = linked(api, source, "memory")
    if memory is not None:
        assert memory["class_type"] == MEMORY_NODE, memory["class_type"]
        memory = MemoryOptions(**widgets(memory))
    return backend.load_handle(**widgets(source), memory=memory)


def settings_of(api: dict, node: dict, backend: Backend) -> Any:
    """The bundle of the settings node wired to ``node`` (None when its settings input is not connected)."""
    source = linked(api, node, "settings")
    if source is None:
        return None
    assert source["class_type"] == backend.settings_node, source["class_type"]
    return backend.make_settings(**{k: source["inputs"][k] for k in backend.settings_keys})


def run_api(api: dict, backend: Backend) -> WorkflowRun:
    """Run the workflow's task node on the backend's real loader and sampler, as the nodes wire it."""
    _, task_node = wf.sampler_of(api)
    handle = model_of(api, task_node, backend)
    settings = settings_of(api, task_node, backend)
    task, request = task_request(api, settings, backend.image_mode)
    return WorkflowRun(handle, settings, request, backend.run(handle, task, request))
