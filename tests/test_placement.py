"""The backend-neutral placement layer: nested block offload, model offload without a pipeline, errors."""
from __future__ import annotations

import pytest
import torch

from gentor import registry
from gentor.errors import MemoryEstimateError, ModelFolderError
from gentor.loaders.cache import CACHE, Entry
from gentor.loaders.memory import MemoryOptions, Precision, Plan
from gentor.loaders.placement import Placement, has_block_offload
from tests.qwen_helpers import t2i


pytestmark = pytest.mark.usefixtures("fresh_cache")


def _spy_onloads(monkeypatch) -> list:
    from diffusers.hooks import group_offloading

    groups: list = []
    original = group_offloading.ModuleGroup.onload_

    def spy(self, *args, **kwargs):
        groups.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(group_offloading.ModuleGroup, "onload_", spy)
    return groups


def test_block_offload_streams_every_nested_layer_of_text_encoder_and_transformer(qwen_fp32_reference, monkeypatch):
    onloaded = _spy_onloads(monkeypatch)
    result = t2i(memory=MemoryOptions(weight_dtype="fp32", offload="block"))
    encoder = CACHE.entries("qwen2_5_vl")[0].value
    transformer = CACHE.entries("qwen_image_transformer")[0].value
    layers = list(encoder.model.language_model.layers) + list(transformer.transformer_blocks)
    assert len(encoder.model.language_model.layers) >= 2
    for layer in layers:
        assert layer._diffusers_hook.get_hook("group_offloading") is not None, "hook on every decoder layer"
    streamed = [m for g in onloaded for m in g.modules]
    for layer in layers:
        assert sum(m is layer for m in streamed) >= 1, "each layer is moved in on its own, during the run"
    # The transformer's blocks run per step and per CFG branch: each is onloaded that often.
    per_block = [sum(m is b for m in streamed) for b in transformer.transformer_blocks]
    assert min(per_block) >= 2 * 2
    assert torch.equal(result.image, qwen_fp32_reference), "CPU->CPU block offload must not change the output"


def test_model_offload_switches_components_without_a_pipeline(qwen_fp32_reference, monkeypatch):
    from gentor.loaders import placement

    switched: list[str] = []
    original = placement.activate

    def spy(entry, device):
        if not switched or switched[-1] != entry.kind:
            switched.append(entry.kind)
        return original(entry, device)

    monkeypatch.setattr(placement, "activate", spy)
    result = t2i(memory=MemoryOptions(weight_dtype="fp32", offload="model"))
    # Text encoder, then the transformer (per step), then the VAE's decode (a method, not forward).
    assert switched[0] == "qwen2_5_vl" and "qwen_image_transformer" in switched
    assert switched[-1] == "autoencoder_kl_qwen_image"
    for kind in ("qwen2_5_vl", "qwen_image_transformer", "autoencoder_kl_qwen_image"):
        assert hasattr(CACHE.entries(kind)[0].value, "_hf_hook")
    assert torch.equal(result.image, qwen_fp32_reference)
    # Re-planning to none removes the hooks (no disk read).
    reads = CACHE.disk_reads
    t2i(memory=MemoryOptions(weight_dtype="fp32"))
    assert CACHE.disk_reads == reads
    assert not hasattr(CACHE.entries("qwen_image_transformer")[0].value, "_hf_hook")


class _Nested(torch.nn.Module):
    """An LLM-shaped module: the layers sit two levels down, as in transformers' VLMs."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.decoder = torch.nn.Module()
        self.model.decoder.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.model.decoder.layers:
            x = torch.relu(layer(x))
        return self.head(x)


def _entry(module: torch.nn.Module) -> Entry:
    return Entry(("test_nested", ("/nowhere", ()), ()), module.eval(), Precision(torch.float32, torch.float32),
                 sum(p.numel() * 4 for p in module.parameters()), "/nowhere", kind="test_nested")


def _plan(offload: str, budget: int = 0) -> Plan:
    return Plan(Precision(torch.float32, torch.float32), offload, torch.device("cpu"), budget)


def test_any_module_streams_its_declared_nested_blocks(monkeypatch):
    torch.manual_seed(0)
    module = _Nested()
    x = torch.randn(4, 8)
    expected = module(x)
    onloaded = _spy_onloads(monkeypatch)
    Placement({"llm": _entry(module)}, {"llm": ("model.decoder.layers",)}, _plan("block"), "Test").apply()
    assert has_block_offload(module)
    assert torch.equal(module(x), expected)
    streamed = [m for g in onloaded for m in g.modules]
    assert all(sum(m is layer for m in streamed) == 1 for layer in module.model.decoder.layers)


def test_missing_block_container_names_component_and_path():
    with pytest.raises(ModelFolderError, match=r"Test llm: block container 'model.language_model.layers' does not "
                                               r"exist in the loaded _Nested \(got top-level children model, head"):
        Placement({"llm": _entry(_Nested())}, {"llm": ("model.language_model.layers",)}, _plan("block"),
                  "Test").apply()
    with pytest.raises(ModelFolderError, match="is not a list of blocks"):
        Placement({"llm": _entry(_Nested())}, {"llm": ("model.decoder",)}, _plan("block"), "Test").apply()


def test_budget_below_largest_block_is_refused_with_numbers():
    module = _Nested()
    layer = 8 * 8 * 4 + 8 * 4
    with pytest.raises(MemoryEstimateError, match=rf"got 0\.00 GB, expected at least {layer / 1e9:.2f} GB"):
        Placement({"llm": _entry(module)}, {"llm": ("model.decoder.layers",)}, _plan("block", layer - 1),
                  "Test").apply()
    plan = Placement({"llm": _entry(module)}, {"llm": ("model.decoder.layers",)}, _plan("none", layer * 2),
                     "Test")
    assert plan.apply().offload == "block" and "using block offload" in plan.notes[0]


def test_release_after_error_leaves_nothing_active(monkeypatch):
    from gentor.loaders import placement

    module = _Nested()
    entry = _entry(module)
    p = Placement({"llm": entry}, {}, _plan("model"), "Test")
    with pytest.raises(RuntimeError, match="boom"):
        with p.running():
            module(torch.randn(1, 8))
            assert placement._active.get("cpu") is entry
            raise RuntimeError("boom")
    assert "cpu" not in placement._active


def test_every_backend_declares_containers_for_its_roles():
    for spec in registry.BACKENDS:
        for role, paths in spec.blocks:
            assert paths and all(isinstance(p, str) and p for p in paths), (spec.id, role)
