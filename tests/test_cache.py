"""The shared model cache: sharing, re-planning without disk reads, precision rules, LRU, errors."""
from __future__ import annotations

import pytest
import torch

from gentor import glue
from gentor.errors import GentorInterrupted
from gentor.loaders.cache import CACHE
from gentor.loaders.memory import MemoryOptions
from tests.qwen_helpers import T2I, t2i


@pytest.fixture(autouse=True)
def fresh_cache(qwen_roots):
    CACHE.unload()
    budget = CACHE.budget
    yield
    CACHE.budget = budget
    CACHE.unload()


def _transformer_entry():
    return CACHE.entries("qwen_image_transformer")[0]


def test_two_loaders_share_one_copy():
    first = t2i()
    module = _transformer_entry().value
    reads = CACHE.disk_reads
    second = t2i()
    assert _transformer_entry().value is module
    assert CACHE.disk_reads == reads, "the second loader must not read the disk again"
    assert torch.equal(first.image, second.image)


def test_offload_change_replans_without_disk_read():
    base = t2i(memory=MemoryOptions(offload="none"))
    reads = CACHE.disk_reads
    block = t2i(memory=MemoryOptions(offload="block"))
    back = t2i(memory=MemoryOptions(offload="none"))
    assert CACHE.disk_reads == reads
    assert torch.equal(base.image, block.image) and torch.equal(base.image, back.image)


def test_precisions_alternate_without_disk_reads():
    """Policy: each precision is its own copy; a narrower one is derived from a wider one in memory."""
    t2i(memory=MemoryOptions(weight_dtype="fp32"))
    reads, derivations = CACHE.disk_reads, CACHE.derivations
    t2i(memory=MemoryOptions(weight_dtype="fp8_e4m3fn", compute_dtype="fp32"))
    assert CACHE.disk_reads == reads, "fp32 -> fp8 is derived from the cached fp32 copy"
    assert CACHE.derivations == derivations + 2, "transformer and text encoder go to FP8; the VAE stays"
    kinds = [e.precision.storage for e in CACHE.entries("qwen_image_transformer")]
    assert sorted(map(str, kinds)) == ["torch.float32", "torch.float8_e4m3fn"], "both copies are kept"
    fp8 = next(e.value for e in CACHE.entries("qwen_image_transformer") if e.precision.cast)
    assert fp8.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    for _ in range(2):  # alternating never touches the disk
        t2i(memory=MemoryOptions(weight_dtype="fp32"))
        t2i(memory=MemoryOptions(weight_dtype="fp8_e4m3fn", compute_dtype="fp32"))
    assert CACHE.disk_reads == reads


def test_fp8_first_then_wider_reads_once():
    t2i(memory=MemoryOptions(weight_dtype="fp8_e4m3fn", compute_dtype="fp32"))
    reads = CACHE.disk_reads
    t2i(memory=MemoryOptions(weight_dtype="fp32"))
    assert CACHE.disk_reads == reads + 2, "fp8 cannot give fp32 back: transformer + text encoder read once"
    t2i(memory=MemoryOptions(weight_dtype="fp8_e4m3fn", compute_dtype="fp32"))
    assert CACHE.disk_reads == reads + 2


def test_changed_files_replace_the_stale_copy(qwen_roots):
    import os

    t2i()
    old = _transformer_entry().value
    config = qwen_roots / T2I / "transformer" / "config.json"
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # "edited" on disk
    try:
        t2i()
        assert len(CACHE.entries("qwen_image_transformer")) == 1, "the stale copy is gone, not kept beside"
        assert _transformer_entry().value is not old
    finally:
        os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_folder_gone_after_load_says_so(qwen_roots):
    import shutil

    from gentor.errors import ModelFolderError
    from gentor.loaders import qwen_image as loader
    from gentor.samplers import qwen_image as sampler
    from gentor.samplers.common import Request

    shutil.copytree(qwen_roots / T2I, qwen_roots / "tiny-gone")
    try:
        handle = loader.load_handle("tiny-gone", None)
        shutil.rmtree(qwen_roots / "tiny-gone")
        with pytest.raises(ModelFolderError, match="the files are gone .*moved, renamed or deleted after loading"):
            sampler.run(handle, "t2i", Request(prompt="p", steps=2, width=32, height=32))
    finally:
        shutil.rmtree(qwen_roots / "tiny-gone", ignore_errors=True)


def test_comfyui_eviction_drops_only_that_entry(monkeypatch):
    t2i()
    before = {e.kind for e in CACHE.entries()}
    monkeypatch.setattr(glue, "torch_device", lambda: torch.device("cpu"))
    CACHE.evicted_by_comfyui(_transformer_entry().key)
    after = {e.kind for e in CACHE.entries()}
    assert before - after == {"qwen_image_transformer"}, "siblings of the same folder stay"
    for kind in ("qwen2_5_vl", "autoencoder_kl_qwen_image"):
        CACHE.evicted_by_comfyui(CACHE.entries(kind)[0].key)
    assert CACHE.entries() == [], "the tokenizer and scheduler go with the last weighted entry that used them"


def test_lru_honours_ram_budget(qwen_roots):
    t2i(T2I)
    one = CACHE.total_bytes()
    CACHE.budget = int(one * 1.5)  # room for one pipeline, not two
    t2i("tiny-qwen-image-sharded")
    assert CACHE.total_bytes() <= CACHE.budget
    sources = [e["source"] for e in CACHE.inspect()]
    old = [s for s in sources if "/tiny-qwen-image/" in s]
    new = [s for s in sources if "/tiny-qwen-image-sharded/" in s]
    assert len(new) == 5, "the model in use keeps all its components"
    assert len(old) < 5, "least recently used components were evicted to fit the budget"


def test_unload_and_inspect():
    from gentor.loaders import qwen_image as loader
    from gentor.loaders.cache import report

    t2i()
    listing = CACHE.inspect()
    text = report(loader.load_handle(T2I, None), listing)
    assert text.startswith("model: qwen_image/qwen-image at ") and "cache: 5 components" in text
    assert "qwen_image_transformer" in text and "float32->float32" in text
    kinds = {e["kind"] for e in listing}
    assert {"qwen_image_transformer", "autoencoder_kl_qwen_image", "qwen2_5_vl"} <= kinds
    entry = next(e for e in listing if e["kind"] == "qwen_image_transformer")
    assert entry["bytes"] > 0 and entry["placement"].startswith("none@") and not entry["in_use"]
    assert CACHE.unload("tiny-qwen-image") >= 3
    assert CACHE.inspect() == [] and CACHE.total_bytes() == 0
    assert t2i().image.shape == (1, 32, 32, 3), "a stale handle reloads transparently"


def test_unload_really_frees_while_handles_live():
    """ComfyUI's output cache keeps our handles alive; unloading must still free the weights."""
    import weakref

    from gentor.loaders import qwen_image as loader

    handle = loader.load_handle(T2I, MemoryOptions(weight_dtype="fp8_e4m3fn"))  # FP8 hooks form cycles
    t2i(memory=handle.memory)
    ref = weakref.ref(_transformer_entry().value)
    CACHE.unload()
    assert ref() is None, "the transformer must be garbage after unload"
    assert handle.path() and t2i(memory=handle.memory).image.shape == (1, 32, 32, 3)


def test_interrupt_leaves_cache_consistent_and_model_usable():
    clean = t2i(steps=3)

    def cancel_at_first_step(value, total, preview):
        if value == 1:
            glue.request_interrupt()

    progress = []
    with pytest.raises(GentorInterrupted):
        t2i(steps=3, listener=lambda v, t, p: (progress.append(v), cancel_at_first_step(v, t, p)))
    assert progress == [1], "stops within one step of the cancel"
    assert all(not e["in_use"] for e in CACHE.inspect())
    again = t2i(steps=3)
    assert torch.equal(clean.image, again.image)


def test_failed_run_leaves_cache_consistent():
    def boom(value, total, preview):
        raise RuntimeError("listener failure")

    with pytest.raises(RuntimeError, match="listener failure"):
        t2i(listener=boom)
    assert all(not e["in_use"] for e in CACHE.inspect())
    assert torch.isfinite(t2i().image).all()
