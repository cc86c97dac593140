"""Small helpers for the Qwen-Image tests (run through the real loader and sampler)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from gentor.loaders import qwen_image as loader
from gentor.loaders.memory import MemoryOptions
from gentor.samplers import qwen_image as sampler
from gentor.samplers.common import Request

T2I = "tiny-qwen-image"
EDIT = "tiny-qwen-image-edit"
EDIT_PLUS = "tiny-qwen-image-edit-2511"
SHARDED = "tiny-qwen-image-sharded"
SIZE = 32
STEPS = 2


def t2i(name: str = T2I, memory: MemoryOptions | None = None, listener=None, **kw) -> sampler.Result:
    kw = {"prompt": "a red fox sitting in fresh snow", "seed": 7, "steps": STEPS, "width": SIZE,
          "height": SIZE, **kw}
    return sampler.run(loader.load_handle(name, memory), "t2i", Request(**kw), listener=listener)


def edit(name: str, images: list[Image.Image], **kw) -> sampler.Result:
    kw = {"prompt": "make picture 1 look like a watercolor", "seed": 3, "steps": STEPS, "width": SIZE,
          "height": SIZE, **kw}
    return sampler.run(loader.load_handle(name, None), "edit", Request(images=images, **kw))


def picture(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))
