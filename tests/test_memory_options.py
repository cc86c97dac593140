"""GentorMemoryOptions on a CPU: FP8 really stored, bounded error per compute dtype, offload hooks real."""
from __future__ import annotations

import pytest
import torch

from gentor.errors import InputError
from gentor.loaders.cache import CACHE
from gentor.loaders.memory import MemoryOptions, Precision, is_wider, resolve, stored_dtypes
from tests.qwen_helpers import rel_err, t2i

# Measured on the tiny T2I model (32x32, 2 steps, image-level relative error vs fp32 weights):
# e4m3fn: 1.2e-3 (fp32 compute), 3.3e-3 (bf16), 1.3e-3 (fp16); e5m2: 3.6e-3, 5.3e-3, 4.1e-3.
# Bounds below leave ~3x headroom.
FP8_TOLERANCE = {"fp8_e4m3fn": 1e-2, "fp8_e5m2": 2e-2}


pytestmark = pytest.mark.usefixtures("fresh_cache")


def _transformer():
    return CACHE.entries("qwen_image_transformer")[0].value


@pytest.mark.parametrize("weight", ["fp8_e4m3fn", "fp8_e5m2"])
@pytest.mark.parametrize("compute", ["fp32", "bf16", "fp16"])
def test_fp8_storage_within_tolerance(qwen_fp32_reference, weight, compute):
    result = t2i(memory=MemoryOptions(weight_dtype=weight, compute_dtype=compute))
    dtypes = stored_dtypes(_transformer())
    fp8 = getattr(torch, f"float8_{weight[4:]}")
    assert dtypes.get(fp8, 0) > 0.5 * sum(dtypes.values()), f"most transformer bytes rest in {fp8}: {dtypes}"
    linears = [(n, m) for n, m in _transformer().transformer_blocks.named_modules()
               if isinstance(m, torch.nn.Linear) and "norm" not in n]
    assert linears and all(m.weight.dtype == fp8 for _, m in linears), "block Linears rest in FP8 between runs"
    assert torch.isfinite(result.image).all()
    assert rel_err(result.image, qwen_fp32_reference) < FP8_TOLERANCE[weight]


def test_fp8_halves_bytes_vs_bf16():
    t2i(memory=MemoryOptions(weight_dtype="bf16"))
    bf16 = sum(stored_dtypes(_transformer()).values())
    CACHE.unload()
    t2i(memory=MemoryOptions(weight_dtype="fp8_e4m3fn", compute_dtype="bf16"))
    fp8 = sum(stored_dtypes(_transformer()).values())
    # Norms and embeddings stay in bf16; on a tiny model they weigh more than on a 20B one.
    assert 0.5 <= fp8 / bf16 < 0.65


def test_block_offload_hooks_fire_around_each_block(qwen_fp32_reference, monkeypatch):
    from diffusers.hooks import group_offloading

    onloads: list[int] = []
    original = group_offloading.ModuleGroup.onload_

    def spy(self, *args, **kwargs):
        onloads.append(id(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(group_offloading.ModuleGroup, "onload_", spy)
    result = t2i(memory=MemoryOptions(weight_dtype="fp32", offload="block"))
    blocks = _transformer().transformer_blocks
    assert all(b._diffusers_hook.get_hook("group_offloading") is not None for b in blocks)
    # 2 steps x 2 CFG passes x (2 blocks + the rest of the model) at least, plus the text encoder.
    assert len(onloads) >= 2 * 2 * len(blocks)
    assert len(set(onloads)) >= len(blocks)
    assert torch.equal(result.image, qwen_fp32_reference), "CPU->CPU block offload must not change the output"


def test_offload_on_cpu_is_reported():
    plan = resolve(MemoryOptions(offload="model"), torch.device("cpu"))
    assert any("no effect on a CPU" in n for n in plan.notes)
    text = t2i(memory=MemoryOptions(offload="model")).text
    assert "no effect on a CPU" in text


def test_auto_dtypes_per_device():
    cpu = resolve(MemoryOptions(), torch.device("cpu"))
    assert cpu.precision == Precision(torch.float32, torch.float32)
    fp8 = resolve(MemoryOptions(weight_dtype="fp8_e5m2"), torch.device("cpu"))
    assert fp8.precision == Precision(torch.float8_e5m2, torch.float32)


def test_precision_rules():
    fp32, bf16, fp16 = (Precision(d, d) for d in (torch.float32, torch.bfloat16, torch.float16))
    e4 = Precision(torch.float8_e4m3fn, torch.bfloat16)
    assert is_wider(fp32, bf16) and is_wider(bf16, e4) and is_wider(fp32, e4)
    assert not is_wider(bf16, fp32) and not is_wider(bf16, fp16), "no sideways or upward derivation"
    assert not is_wider(e4, bf16) and not is_wider(e4, Precision(torch.float8_e5m2, torch.bfloat16))
    assert is_wider(Precision(torch.float8_e4m3fn, torch.float32), e4), "FP8 copies narrow their skipped layers"
    assert not is_wider(fp32, fp32)


def test_bf16_on_a_gpu_without_bf16_falls_back_to_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    plan = resolve(MemoryOptions(weight_dtype="bf16"), torch.device("cuda"))
    assert plan.precision == Precision(torch.float16, torch.float16)
    assert any("cannot compute in bf16: using fp16" in n for n in plan.notes)


@pytest.mark.parametrize("field,value", [("weight_dtype", "int4"), ("offload", "disk"), ("compute_dtype", "fp8")])
def test_bad_options_name_the_input(field, value):
    with pytest.raises(InputError, match=rf"Gentor Memory Options {field}: unknown value"):
        MemoryOptions(**{field: value})


def test_vram_budget_switches_to_block_offload():
    t2i(memory=MemoryOptions(weight_dtype="fp32"))
    total = sum(e["bytes"] for e in CACHE.inspect())
    budget_gb = (total - 1) / 1024**3  # one byte short of holding every weight resident
    result = t2i(memory=MemoryOptions(weight_dtype="fp32", vram_budget_gb=budget_gb))
    assert "using block offload" in result.text
    assert _transformer().transformer_blocks[0]._diffusers_hook.get_hook("group_offloading") is not None


def test_vram_budget_below_the_largest_block_is_refused():
    from gentor.errors import MemoryEstimateError

    with pytest.raises(MemoryEstimateError, match=r"vram_budget_gb: the budget is smaller than the largest block .*"
                                                  r"got 0\.00 GB, expected at least"):
        t2i(memory=MemoryOptions(weight_dtype="fp32", vram_budget_gb=0.000001))


def test_layerwise_storage_restores_the_stored_tensors_instead_of_recasting():
    """Our FP8 hooks compute exactly what diffusers' layerwise casting computes, and after each forward the layer
    holds the very FP8 tensors it held before (no down-cast pass); a forward that raised is mended by the next."""
    from diffusers.hooks import apply_layerwise_casting

    from gentor.loaders.memory import apply_layerwise_storage

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8),
                                   torch.nn.LayerNorm(8)).to(torch.bfloat16)

    ours, theirs = model(), model()
    fp8, skip = torch.float8_e4m3fn, ("3",)  # the LayerNorm (index 3) stays in bf16
    apply_layerwise_storage(ours, Precision(fp8, torch.bfloat16), skip)
    apply_layerwise_casting(theirs, storage_dtype=fp8, compute_dtype=torch.bfloat16, skip_modules_pattern=skip)
    assert {n: p.dtype for n, p in ours.named_parameters()} == {n: p.dtype for n, p in theirs.named_parameters()}
    assert ours[0].weight.dtype == fp8 and ours[3].weight.dtype == torch.bfloat16
    before = {n: p.data.data_ptr() for n, p in ours.named_parameters()}
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    for _ in range(2):
        assert torch.equal(ours(x), theirs(x))
        assert {n: p.data.data_ptr() for n, p in ours.named_parameters()} == before
        assert ours[2].weight.dtype == fp8
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a.float(), b.float())

    with pytest.raises(RuntimeError):
        ours[0](torch.randn(4, 15, dtype=torch.bfloat16))  # raises inside the forward: post_forward never runs
    assert ours[0].weight.dtype == torch.bfloat16  # left up-cast ...
    assert torch.equal(ours(x), theirs(x))
    assert ours[0].weight.dtype == fp8 and ours[0].weight.data.data_ptr() == before["0.weight"]  # ... and mended
