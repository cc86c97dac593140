"""Adapters (LoRA) keyed on cache entries and switched per session without reloading the base."""
from __future__ import annotations

import pytest
import torch

from gentor.loaders import adapters
from gentor.loaders.cache import ModelCache
from gentor.loaders.memory import Precision

FP32 = Precision(torch.float32, torch.float32)


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q = torch.nn.Linear(8, 8)
        self.to_v = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_v(torch.tanh(self.to_q(x)))


def _lora(seed: int):
    """Inject a LoRA with non-zero B (PEFT starts B at zero, which would make the test blind)."""
    from peft import LoraConfig, inject_adapter_in_model

    def load(module: torch.nn.Module, name: str) -> None:
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"]), module, adapter_name=name)
        gen = torch.Generator().manual_seed(seed)
        for n, p in module.named_parameters():
            if f"lora_B.{name}" in n:
                p.data = torch.randn(p.shape, generator=gen)
    return load


@pytest.fixture()
def cache_and_file(tmp_path):
    weights = tmp_path / "tiny.bin"
    weights.write_bytes(b"x")
    loads = []

    def load(_precision, _source):
        loads.append(1)
        torch.manual_seed(0)
        return _Tiny()
    return ModelCache(budget_bytes=10**9), str(weights), load, loads


def test_adapter_switched_per_session_base_untouched(cache_and_file):
    cache, path, load, loads = cache_and_file
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    with cache.session() as s:
        base = s.get("tiny", path, load, FP32).value(x)
    style = adapters.Adapter("style", ("style.safetensors", 1, 1), _lora(2), weight=1.0)
    with cache.session() as s:
        entry = s.get("tiny", path, load, FP32)
        s.use_adapters(entry, [style])
        styled = entry.value(x)
        assert adapters.active(entry.value) == {"style"}
    assert not torch.allclose(styled, base), "the adapter changes the output"
    with cache.session() as s:
        entry = s.get("tiny", path, load, FP32)
        assert adapters.active(entry.value) == set(), "a session ends with every adapter off"
        assert torch.equal(entry.value(x), base), "the base weights are untouched"
    assert len(loads) == 1, "the base was read once for all three sessions"
    assert sorted(entry.adapters) == ["style"]


def test_strength_and_two_adapters(cache_and_file):
    cache, path, load, _ = cache_and_file
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    a = adapters.Adapter("a", ("a", 1), _lora(2), weight=1.0)
    b = adapters.Adapter("b", ("b", 1), _lora(3), weight=1.0)
    outs = {}
    for name, wanted in {"base": [], "a": [a], "a_half": [adapters.Adapter("a", ("a", 1), a.load, 0.5)],
                         "ab": [a, b]}.items():
        with cache.session() as s:
            entry = s.get("tiny", path, load, FP32)
            s.use_adapters(entry, wanted)
            outs[name] = entry.value(x)
    # Independent check of the strength: the LoRA delta of to_q is linear in the scale.
    delta_full = outs["a"] - outs["base"]
    delta_half = outs["a_half"] - outs["base"]
    assert not torch.allclose(delta_half, delta_full) and not torch.allclose(delta_half, torch.zeros_like(delta_half))
    assert not torch.allclose(outs["ab"], outs["a"]), "both adapters act together"


def test_changed_adapter_file_is_reinjected(cache_and_file):
    cache, path, load, _ = cache_and_file
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    results = []
    for identity, seed in ((("s", 1), 2), (("s", 2), 5)):
        with cache.session() as s:
            entry = s.get("tiny", path, load, FP32)
            s.use_adapters(entry, [adapters.Adapter("style", identity, _lora(seed))])
            results.append(entry.value(x))
    assert not torch.allclose(results[0], results[1]), "new files under the same name replace the old adapter"
