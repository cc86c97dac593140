"""Qwen-Image LoRAs (every key layout), switching per run, FP8 / block offload, bad LoRA files; VAE tiling;
2512 / Edit-2511 detection."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from gentor.errors import InputError, ModelFolderError
from gentor.loaders import lora
from gentor.loaders import qwen_image as loader
from gentor.loaders.cache import CACHE, ModelCache
from gentor.loaders.memory import MemoryOptions, Precision, resolve
from gentor.samplers import qwen_image as sampler
from gentor.samplers import qwen_image_vae
from gentor.samplers.common import Request
from tests import tiny_qwen_lora as kit

T2I = "tiny-qwen-image"
SIZE, STEPS = 32, 2
FP32 = Precision(torch.float32, torch.float32)
EXACT = 1e-5  # fp32, same weights: LoRA through PEFT vs a hand-merged weight
# FP8 (e4m3) storage of the base with fp32 compute: ~2e-3 relative on the tiny transformer (DESIGN.md §6); the
# LoRA delta itself stays fp32, so the LoRA adds no FP8 error of its own.
FP8_TOLERANCE = 3e-2
# Tiled vs whole VAE decode (random tiny VAE, 64 px blended seams): diffusers' own pipeline tests accept 0.2.
TILING_TOLERANCE = 0.1


@pytest.fixture(autouse=True)
def roots(model_roots):
    yield model_roots


def handle_with(*loras: tuple[str, float], memory: MemoryOptions | None = None):
    h = loader.load_handle(T2I, memory)
    for name, strength in loras:
        h = lora.with_lora(h, name, strength)
    return h


def run(handle, **kw) -> sampler.Result:
    kw = {"prompt": "a red fox sitting in fresh snow", "seed": 7, "steps": STEPS, "width": SIZE, "height": SIZE, **kw}
    return sampler.run(handle, "t2i", Request(**kw))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- formats vs a hand-merged weight
def _transformer_fp32():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_pretrained(loader.resolve_model_folder(
        "Qwen-Image", "model_name", T2I, loader.FOLDER_KEYS) / "transformer").eval()


def _inputs(cfg):
    gen = torch.Generator().manual_seed(0)
    tokens, text = 16, 5
    return dict(hidden_states=torch.randn(1, tokens, cfg.in_channels, generator=gen),
                encoder_hidden_states=torch.randn(1, text, cfg.joint_attention_dim, generator=gen),
                encoder_hidden_states_mask=torch.ones(1, text, dtype=torch.long),
                timestep=torch.tensor([0.5]), img_shapes=[[(1, 4, 4)]], return_dict=False)


@pytest.mark.parametrize("fmt", kit.FORMATS)
def test_each_format_equals_hand_merged_weights(fmt):
    base = _transformer_fp32()
    strength = 0.7
    merged = copy.deepcopy(base)
    with torch.no_grad():  # independent reference: W + strength * alpha / r * up @ down, by module name
        for module, (down, up, alpha) in kit.factors().items():
            merged.get_submodule(module).weight += strength * alpha / kit.RANK * up @ down
    cache = ModelCache(budget_bytes=10**10)
    path = str(lora.resolve_lora("test", kit.file_name(fmt)))
    x = _inputs(base.config)
    with cache.session() as s:
        entry = s.get("t", path, lambda _p, _s: base, FP32)
        h = dataclasses.replace(loader.load_handle(T2I, None), adapters=(lora.LoraRef(fmt, path, strength),))
        s.use_adapters(entry, lora.adapters_for(h, "Qwen-Image", torch.float32))
        with torch.no_grad():
            got = entry.value(**x)[0]
    with torch.no_grad():
        want = merged(**x)[0]
        plain = base(**x)[0]
    assert rel(got, want) < EXACT, f"{fmt}: LoRA output differs from the hand-merged weights"
    assert rel(plain, want) > 1e-2, "the LoRA must change the output (else the test is blind)"
    assert lora.detect_format(lora.header_keys(lora.resolve_lora("t", kit.file_name(fmt)), "t"), "t", fmt) == \
        {"diffusers": "diffusers", "peft": "diffusers", "comfyui": "comfyui", "kohya": "kohya"}[fmt]


# ----------------------------------------------------------------------------- sampler: switching, sharing
def test_lora_switches_per_run_without_rereading_the_base():
    CACHE.unload()
    base = run(handle_with())
    reads = CACHE.disk_reads
    styled = run(handle_with((kit.file_name("kohya"), 1.0)))
    assert CACHE.disk_reads == reads, "the LoRA run reuses the cached base (no component read again)"
    assert not torch.equal(styled.image, base.image) and "LoRA tiny-qwen-image-lora-kohya.safetensors@1" in styled.text
    again = run(handle_with())
    assert torch.equal(again.image, base.image), "after a LoRA run the base model is exactly the base again"
    assert CACHE.disk_reads == reads
    half = run(handle_with((kit.file_name("kohya"), 0.5)))
    assert not torch.equal(half.image, styled.image) and not torch.equal(half.image, base.image)
    two = run(handle_with((kit.file_name("kohya"), 1.0), (kit.LIGHTNING, 1.0)))
    assert not torch.equal(two.image, styled.image), "two chained LoRAs act together"
    assert CACHE.disk_reads == reads


def test_a_second_lora_on_one_model_raises_no_peft_warning():
    import warnings

    CACHE.unload()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(handle_with((kit.file_name("kohya"), 1.0), (kit.LIGHTNING, 1.0)))
    assert any(len(e.adapters) >= 2 for e in CACHE.entries()), "both LoRAs were injected into one module"
    assert not [w for w in caught if "peft_config" in str(w.message)], [str(w.message) for w in caught]


def test_strength_zero_is_a_no_op_without_reading(monkeypatch):
    h = loader.load_handle(T2I, None)
    monkeypatch.setattr(lora, "header_keys", lambda *a: pytest.fail("strength 0 must not read the file"))
    assert lora.with_lora(h, kit.file_name("diffusers"), 0.0) is h


def test_same_lora_chained_twice_adds_strengths():
    a = handle_with((kit.file_name("comfyui"), 0.25), (kit.file_name("comfyui"), 0.75))
    wanted = lora.adapters_for(a, "Qwen-Image", torch.float32)
    assert len(wanted) == 1 and wanted[0].weight == pytest.approx(1.0)


def test_fp8_storage_lora_factors_stay_in_compute_dtype():
    fp32 = run(handle_with((kit.file_name("diffusers"), 1.0), memory=MemoryOptions(compute_dtype="fp32")))
    fp8 = run(handle_with((kit.file_name("diffusers"), 1.0),
                          memory=MemoryOptions(weight_dtype="fp8_e4m3fn", compute_dtype="fp32")))
    err = rel(fp8.image, fp32.image)
    assert 0 < err < FP8_TOLERANCE, f"FP8 base + fp32 LoRA vs fp32: relative error {err:.2e}"
    entry = next(e for e in CACHE.entries("qwen_image_transformer") if e.precision and e.precision.cast)
    lora_params = [p for n, p in entry.value.named_parameters() if "lora_" in n]
    assert lora_params and all(p.dtype == torch.float32 for p in lora_params), "LoRA factors never FP8"
    assert any(p.dtype == torch.float8_e4m3fn for p in entry.value.parameters()), "the base is FP8"


def test_block_offload_with_lora_matches_resident():
    resident = run(handle_with((kit.file_name("peft"), 1.0)))
    offloaded = run(handle_with((kit.file_name("peft"), 1.0), memory=MemoryOptions(offload="block")))
    assert torch.allclose(offloaded.image, resident.image, atol=1e-6)


def test_lightning_recipe_note():
    h = handle_with((kit.LIGHTNING, 1.0))
    text = run(h, steps=STEPS, cfg=4.0).text
    assert "Lightning" in text and "8 steps" in text and "cfg 1" in text
    settings = sampler.make_settings(schedule="lightning")
    quiet = run(h, steps=STEPS, cfg=1.0, settings=settings).text
    assert "published recipe" not in quiet and "schedule=lightning" in quiet


def test_lightning_schedule_is_shift_three():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from tests.tiny_models import QWEN_IMAGE_SCHEDULER_CONFIG

    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER_CONFIG, **sampler.LIGHTNING_SCHEDULER)
    c = sched.config
    for seq_len in (64, 4096, 6889):  # mu as the pipeline computes it: the same at every size
        mu = calculate_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        sched.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=mu)
    s = torch.tensor([1.0, 0.75, 0.5, 0.25])
    want = 3 * s / (1 + 2 * s)  # shift 3: sigma' = 3 s / (1 + (3 - 1) s), no terminal stretch
    assert torch.allclose(sched.sigmas[:-1], want, atol=1e-6)


# ----------------------------------------------------------------------------- bad LoRA files
def _write(tmp_path, name: str, tensors: dict) -> str:
    from safetensors.torch import save_file

    folder = tmp_path / "loras"
    folder.mkdir(exist_ok=True)
    save_file(tensors, str(folder / name))
    return name


@pytest.fixture()
def lora_dir(tmp_path, model_roots):
    from gentor import glue

    glue.set_fallback_roots("loras", [tmp_path / "loras", model_roots["loras"]])
    (tmp_path / "loras").mkdir(exist_ok=True)
    yield tmp_path
    glue.set_fallback_roots("loras", [model_roots["loras"]])


def test_lora_of_another_architecture_says_which(lora_dir):
    t = torch.zeros(4, 8)
    name = _write(lora_dir, "flux.safetensors", {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": t,
                                                 "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": t.T.contiguous()})
    with pytest.raises(ModelFolderError, match="this is a FLUX LoRA"):
        lora.with_lora(loader.load_handle(T2I, None), name, 1.0)
    sdxl = _write(lora_dir, "sdxl.safetensors", {"lora_unet_down_blocks_0_attn1_to_q.lora_down.weight": t})
    with pytest.raises(ModelFolderError, match="SDXL"):
        lora.with_lora(loader.load_handle(T2I, None), sdxl, 1.0)


def test_corrupt_lora_file(lora_dir):
    good = lora.resolve_lora("t", kit.file_name("diffusers")).read_bytes()
    (lora_dir / "loras" / "cut.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelFolderError, match="truncated or corrupt"):
        lora.with_lora(loader.load_handle(T2I, None), "cut.safetensors", 1.0)


def test_unmatched_keys_listed(lora_dir):
    sd = kit.state_dict("diffusers")
    sd["transformer.transformer_blocks.0.attn.to_nowhere.lora_A.weight"] = torch.zeros(kit.RANK, 64)
    sd["transformer.transformer_blocks.0.attn.to_nowhere.lora_B.weight"] = torch.zeros(64, kit.RANK)
    name = _write(lora_dir, "extra.safetensors", sd)
    with pytest.raises(ModelFolderError, match=r"match no layer.*to_nowhere"):
        run(handle_with((name, 1.0)))
    assert run(handle_with()).image.shape == (1, SIZE, SIZE, 3), "a refused LoRA leaves the model usable"


def test_name_outside_the_folder_and_other_backend(lora_dir):
    with pytest.raises(InputError, match="lora_name"):
        lora.with_lora(loader.load_handle(T2I, None), "../evil.safetensors", 1.0)
    other = dataclasses.replace(loader.load_handle(T2I, None), backend="bagel")
    with pytest.raises(InputError, match="not supported"):
        lora.with_lora(other, kit.file_name("diffusers"), 1.0)


def test_lora_dropdown_lists_every_layout():
    assert set(lora.list_loras()) >= {kit.file_name(f) for f in kit.FORMATS} | {kit.LIGHTNING}


# ----------------------------------------------------------------------------- VAE tiling
def test_tiled_and_whole_vae_decode_agree_at_two_tiles():
    from diffusers import AutoencoderKLQwenImage

    folder = loader.resolve_model_folder("Qwen-Image", "model_name", T2I, loader.FOLDER_KEYS) / "vae"
    vae = AutoencoderKLQwenImage.from_pretrained(folder).eval()
    # 384 px wide: more than one 256 px tile (stride 192) -> two tiles blended over a 64 px seam.
    z = torch.randn(1, 16, 1, 256 // 8, 384 // 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        qwen_image_vae.apply(vae, tiled=False)
        whole = vae.decode(z).sample
        qwen_image_vae.apply(vae, tiled=True)
        tiled = vae.decode(z).sample
    assert vae.use_tiling and whole.shape == tiled.shape == (1, 3, 1, 256, 384)
    diff = (whole - tiled).abs()
    assert diff.max() > 0, "tiling really ran (else the comparison is blind)"
    assert float(diff.mean()) < TILING_TOLERANCE, f"mean |tiled - whole| = {float(diff.mean()):.3f}"


def test_vae_tiling_auto_from_the_estimate_and_forced(monkeypatch):
    from gentor import glue

    whole = run(handle_with())
    assert "VAE decode tiled" not in whole.text
    forced = run(handle_with(), settings=sampler.make_settings(vae_tiling_mode="on"))
    assert "VAE decode tiled + sliced (vae_tiling = on)" in forced.text
    # Free memory between the tiled and the whole estimate: auto tiles and says so.
    job, _ = sampler.plan_job("t2i", "t2i", Request(prompt="x", steps=STEPS, width=1024, height=1024))
    path = loader.resolve_model_folder("Qwen-Image", "model_name", T2I, loader.FOLDER_KEYS)
    tcfg = {"num_attention_heads": 2, "attention_head_dim": 32}
    vcfg = {"base_dim": 8}
    tiled = sampler.estimate_bytes(job, tcfg, vcfg, torch.float32, tiled_vae=True)
    untiled = sampler.estimate_bytes(job, tcfg, vcfg, torch.float32, tiled_vae=False)
    assert tiled < untiled
    monkeypatch.setattr(glue, "free_memory_bytes", lambda _d: (tiled + untiled) // 2)
    monkeypatch.setattr(sampler, "weight_bytes_to_load", lambda *a: 0)
    notes = sampler.check_memory(job, path, resolve(MemoryOptions(compute_dtype="fp32"), torch.device("cpu")))
    assert job.tiled_vae and "tiled + sliced automatically" in notes[0]


# ----------------------------------------------------------------------------- 2512 / Edit-2511 detection
def test_2512_and_2511_detected_from_files():
    assert loader.load_handle("tiny-qwen-image-2512", None).variant == "qwen-image-2512"
    assert loader.load_handle("tiny-qwen-image-edit-2511", None).variant == "qwen-image-edit-2511"
    assert {"tiny-qwen-image-2512", "tiny-qwen-image-2.1"} <= set(loader.list_models())
    assert "model=qwen-image-2512" in run(loader.load_handle("tiny-qwen-image-2512", None)).text
