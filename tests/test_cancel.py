"""Long work stops: Cancel lands inside one forward (before the next block: decoder layer, transformer
block, VAE up block), not only between steps or tokens, and while a model loads (before the next tensor).
The cancel points are the shared hooks of loaders/cancel.py, installed by the placement for the run only."""
from __future__ import annotations

import pytest
import torch

from gentor import glue
from gentor.errors import GentorInterrupted
from gentor.loaders.cancel import blocks_of, cancel_points
from gentor.samplers.common import Request
from tests import tiny_vlm


@pytest.fixture(autouse=True)
def roots(model_roots):
    from gentor.loaders.cache import CACHE

    yield model_roots
    glue._interrupt.clear()  # a test that failed before its cancel landed leaves no request behind
    CACHE.unload()  # later test files count the cache's entries


class CancelAtFirst:
    """A global forward hook: the first module whose class name has ``marker`` asks for Cancel after it ran."""

    def __init__(self, marker: str) -> None:
        self.marker, self.ran = marker, 0

    def __call__(self, module, _args, _out) -> None:
        if self.marker in type(module).__name__:
            self.ran += 1
            if self.ran == 1:
                glue.request_interrupt()

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_forward_hook(self)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def test_cancel_points_hook_every_block_and_leave_nothing_behind():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ModuleList([torch.nn.Linear(4, 4)]))
    assert len(blocks_of(model)) == 3  # the Sequential's two children and the list's one
    with cancel_points([model, "not a module"]) as hooked:
        assert hooked == 3
        glue.request_interrupt()
        with pytest.raises(GentorInterrupted):
            model[0](torch.zeros(1, 4))
    assert all(not m._forward_pre_hooks for m in model.modules()), "the run's hooks are removed"
    model[0](torch.zeros(1, 4))


def test_enhancer_prefill_stops_between_decoder_layers():
    from gentor.loaders import vlm as loader
    from gentor.samplers import vlm as sampler

    handle = loader.load_handle(tiny_vlm.QWEN2_5_VL, None)
    tokens: list[int] = []
    with CancelAtFirst("DecoderLayer") as cancel, pytest.raises(GentorInterrupted):
        sampler.enhance(handle, Request(prompt="a tree " * 200, steps=20),
                        listener=lambda value, _t, _p: tokens.append(value))
    assert cancel.ran == 1, "the second decoder layer of the prefill never ran"
    assert tokens == [], "stopped inside the prefill, before the first token"


def test_qwen_image_vae_decode_stops_between_up_blocks():
    from tests.qwen_helpers import t2i

    steps: list[int] = []
    with CancelAtFirst("UpBlock") as cancel, pytest.raises(GentorInterrupted):
        t2i(listener=lambda value, _t, _p: steps.append(value))
    assert steps and steps[-1] == max(steps), "every denoising step ran; Cancel came in the decode"
    assert cancel.ran == 1, "the decode stopped after its first up block"


def test_loading_stops_between_tensors(tiny_root):
    from diffusers import AutoencoderKLQwenImage

    from gentor.loaders.streaming import load_diffusers

    glue.request_interrupt()
    with pytest.raises(GentorInterrupted):
        load_diffusers(AutoencoderKLQwenImage, tiny_root / "qwen_image" / "tiny-qwen-image" / "vae", None)
    load_diffusers(AutoencoderKLQwenImage, tiny_root / "qwen_image" / "tiny-qwen-image" / "vae", None)
