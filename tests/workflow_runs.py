"""Run an example workflow's task node without ComfyUI, the way the node builds its request (shared by the
per-backend workflow tests)."""
from __future__ import annotations

from typing import Any

from PIL import Image

from gentor.samplers.common import Request
from tests import workflow_check as wc

MAX_IMAGE_INPUTS = 10


def task_request(api: dict, settings: Any = None, image_mode: str = "RGB") -> tuple[str, Request]:
    """(task, Request) of the workflow's one task node: its widgets, its LoadImage inputs in image_k order."""
    _, task = wc.sampler_of(api)
    inputs = task["inputs"]
    images = []
    for k in range(1, MAX_IMAGE_INPUTS + 1):
        link = inputs.get(f"image_{k}")
        if link is not None:
            with Image.open(wc.INPUTS_DIR / api[link[0]]["inputs"]["image"]) as img:
                images.append(img.convert(image_mode))
    request = Request(prompt=inputs["prompt"], negative=inputs["negative"], seed=inputs["seed"],
                      steps=inputs["steps"], cfg=inputs["cfg"], width=inputs["width"], height=inputs["height"],
                      batch_size=inputs.get("batch_size", 1), images=images, settings=settings)
    return ("edit" if images else "t2i"), request
