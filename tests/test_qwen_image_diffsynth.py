"""Qwen-Image's optional DiffSynth engine on the tiny models, against the diffusers engine and DiffSynth's own
model classes (skipped with the reason when the diffsynth package is not installed)."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import re

import pytest
import torch

from gentor.errors import InputError, MissingDependencyError
from gentor.loaders import lora
from gentor.loaders import qwen_image as loader
from gentor.loaders import qwen_image_diffsynth as views
from gentor.loaders.cache import CACHE
from gentor.loaders.memory import MemoryOptions
from gentor.samplers import qwen_image as sampler
from gentor.samplers.common import Request
from tests.qwen_helpers import EDIT, EDIT_PLUS, SIZE, STEPS, T2I, picture, rel_err

try:
    DIFFSYNTH = importlib.metadata.version("diffsynth")
except importlib.metadata.PackageNotFoundError:
    DIFFSYNTH = None
needs_diffsynth = pytest.mark.skipif(DIFFSYNTH is None, reason="diffsynth is not installed (pip install diffsynth)")

# DiffSynth's DiT uses sigmoid-GELU where diffusers uses tanh-GELU, and its CFG does not rescale to the
# conditional norm; noise, prompt encoding, scheduler and VAE agree. Measured on the tiny models (fp32, relative
# L2 of the images): cfg 1 2.5e-5 (T2I) / 2.8e-5 (Edit, Edit-2511); cfg 4 6.3e-4; FP8 storage vs fp32 1.2e-3.
TOL_NO_CFG = 2e-4
TOL_CFG = 5e-3
TOL_FP8 = 1e-2


@pytest.fixture(autouse=True)
def roots(qwen_roots):
    yield qwen_roots


def run(name: str, task: str, engine: str, memory: MemoryOptions | None = None, images=(), **kw):
    kw = {"prompt": "a red fox sitting in fresh snow", "seed": 7, "steps": STEPS, "width": SIZE,
          "height": SIZE, **kw}
    return sampler.run(loader.load_handle(name, memory, engine), task, Request(images=list(images), **kw))


# ----------------------------------------------------------------------------- choice and bad input
def test_unknown_engine_is_refused_naming_the_choices():
    with pytest.raises(InputError, match=r"engine: unknown engine \(got 'comfy'.*diffusers, diffsynth"):
        loader.load_handle(T2I, None, "comfy")


def test_missing_package_gives_the_pip_command(monkeypatch):
    monkeypatch.setattr(views, "installed_version", lambda: None)
    with pytest.raises(MissingDependencyError, match=r"pip install \"diffsynth>=2\.1\.12,<2\.2\""):
        run(T2I, "t2i", "diffsynth")
    # allowed to fall back: runs on diffusers and says why
    out = run(T2I, "t2i", "diffsynth-or-diffusers")
    assert "engine=diffusers" in out.text, out.text
    # one sentence: the reason reads as a clause (never "does not support diffsynth is not installed")
    assert "fell back to diffusers because diffsynth is not installed (pip install " in out.text, out.text
    assert "does not support diffsynth" not in out.text, out.text


def test_version_outside_tested_range_warns(monkeypatch, caplog):
    monkeypatch.setattr(views, "installed_version", lambda: "3.0.0")
    with caplog.at_level(logging.WARNING):
        notes = views.require()
    assert notes and "3.0.0" in notes[0] and views.TESTED_RANGE in notes[0]
    assert any("outside the tested range" in r.message for r in caplog.records)
    monkeypatch.setattr(views, "installed_version", lambda: "2.1.12")
    assert views.require() == []


def test_transformers_renamed_classes_are_mapped():
    pytest.importorskip("diffsynth")
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as qvl

    resolved = views.module_map(views.TEXT_ENCODER_MAP)
    for old, new in views.TRANSFORMERS_RENAMES.items():
        cls = getattr(qvl, old, None) or getattr(qvl, new, None)
        assert cls is not None and cls in resolved, f"{old}/{new} not in the resolved VRAM map"


# ----------------------------------------------------------------------------- views share the cached weights
@needs_diffsynth
def test_dit_view_has_diffsynths_structure_and_the_cached_parameters():
    from accelerate import init_empty_weights
    from diffsynth.models.qwen_image_dit import QwenImageDiT
    from diffusers import QwenImageTransformer2DModel

    # Assembled from a config with the released sizes, the view is exactly DiffSynth's own model.
    with init_empty_weights():
        ref = QwenImageDiT(num_layers=2)
    config = QwenImageTransformer2DModel.load_config(str(loader.resolve_model_folder(
        "Qwen-Image", "model_name", T2I, loader.FOLDER_KEYS) / "transformer"))
    released = dict(config, num_layers=2, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
                     axes_dims_rope=(16, 56, 56))
    with init_empty_weights():
        diff = QwenImageTransformer2DModel.from_config(released)
    ours = {k: tuple(v.shape) for k, v in views.empty_dit(diff.config).state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in diff.state_dict().items()}

    run(T2I, "t2i", "diffsynth")
    entry = CACHE.entries("qwen_image_transformer")[0]
    dit = views.build_dit(entry.value)
    # the base weights, also when an earlier test injected LoRA layers into the cached transformer
    cached = lora.base_view(entry.value).state_dict(keep_vars=True)
    for name, param in dit.named_parameters():
        assert param is cached[name], f"{name} is a copy, not the cached Parameter"


@needs_diffsynth
def test_text_encoder_view_matches_transformers_hidden_states():
    run(T2I, "t2i", "diffsynth")
    te = CACHE.entries("qwen2_5_vl")[0].value
    view = views.build_text_encoder(te)
    ids = torch.tensor([[5, 9, 17, 33, 2, 11]])
    with torch.inference_mode():
        ours = view(input_ids=ids, attention_mask=torch.ones_like(ids))[-1]
        ref = te(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states[-1]
    assert torch.equal(ours, ref)


# ----------------------------------------------------------------------------- generation
@needs_diffsynth
def test_t2i_runs_is_deterministic_and_close_to_diffusers_without_cfg():
    a = run(T2I, "t2i", "diffsynth", cfg=1.0)
    assert a.image.shape == (1, SIZE, SIZE, 3) and torch.isfinite(a.image).all()
    assert "engine=diffsynth" in a.text and "DiffSynth VRAM management" in a.text
    assert torch.equal(a.image, run(T2I, "t2i", "diffsynth", cfg=1.0).image)
    ref = run(T2I, "t2i", "diffusers", cfg=1.0)
    err = rel_err(a.image, ref.image)
    assert 0 < err < TOL_NO_CFG, f"DiffSynth vs diffusers, cfg 1: rel {err:.2e} (0 would mean diffusers ran)"
    assert not torch.equal(a.image, run(T2I, "t2i", "diffsynth", cfg=1.0, seed=8).image)


@needs_diffsynth
def test_cfg_changes_the_image_and_stays_near_diffusers():
    on, off = run(T2I, "t2i", "diffsynth"), run(T2I, "t2i", "diffsynth", cfg=1.0)
    assert not torch.equal(on.image, off.image)
    err = rel_err(on.image, run(T2I, "t2i", "diffusers").image)
    assert err < TOL_CFG, f"DiffSynth vs diffusers, cfg 4: rel {err:.2e}"


@needs_diffsynth
def test_batch_draws_the_diffusers_engines_noise_per_image():
    batch = run(T2I, "t2i", "diffsynth", cfg=1.0, batch_size=2)
    ref = run(T2I, "t2i", "diffusers", cfg=1.0, batch_size=2)
    assert batch.image.shape[0] == 2 and not torch.equal(batch.image[0], batch.image[1])
    for i in range(2):
        assert rel_err(batch.image[i], ref.image[i]) < TOL_NO_CFG


@needs_diffsynth
@pytest.mark.parametrize("name,count", [(EDIT, 1), (EDIT_PLUS, 2)])
def test_edit_and_edit_plus_run_close_to_diffusers(name, count):
    images = [picture(40, 32, seed=k) for k in range(count)]
    a = run(name, "edit", "diffsynth", images=images, cfg=1.0, prompt="make it snow")
    assert a.image.shape == (1, SIZE, SIZE, 3) and torch.isfinite(a.image).all()
    ref = run(name, "edit", "diffusers", images=images, cfg=1.0, prompt="make it snow")
    assert rel_err(a.image, ref.image) < TOL_NO_CFG


@needs_diffsynth
@pytest.mark.parametrize("offload", ["none", "model", "block"])
def test_fp8_storage_and_offload_modes_run_and_leave_the_cache_in_fp8(offload):
    memory = MemoryOptions(weight_dtype="fp8_e4m3fn", compute_dtype="fp32", offload=offload)
    fp8 = run(T2I, "t2i", "diffsynth", memory, cfg=1.0)
    ref = run(T2I, "t2i", "diffsynth", cfg=1.0)
    err = rel_err(fp8.image, ref.image)
    assert 0 < err < TOL_FP8, f"FP8 vs fp32 on DiffSynth: rel {err:.2e}"
    entry = next(e for e in CACHE.entries("qwen_image_transformer") if e.precision.storage == torch.float8_e4m3fn)
    dtypes = {p.dtype for p in entry.value.transformer_blocks.parameters()}
    assert torch.float8_e4m3fn in dtypes, "the shared cached copy must stay in FP8 after a DiffSynth run"
    assert all(p.device.type == "cpu" for p in entry.value.parameters())


@needs_diffsynth
def test_both_engines_share_one_copy_of_the_weights():
    run(T2I, "t2i", "diffusers", cfg=1.0)
    before = {e.key for e in CACHE.entries()}
    run(T2I, "t2i", "diffsynth", cfg=1.0)
    assert {e.key for e in CACHE.entries()} == before, "the DiffSynth engine must not cache a second copy"


@needs_diffsynth
def test_progress_counts_every_step_of_every_image_and_previews_arrive():
    seen = []
    handle = loader.load_handle(T2I, None, "diffsynth")
    sampler.run(handle, "t2i", Request(prompt="a fox", seed=1, steps=3, width=SIZE, height=SIZE, batch_size=2,
                                       settings=sampler.make_settings(preview_every=1)),
                listener=lambda done, total, preview: seen.append((done, total, preview is not None)))
    assert [d for d, _, _ in seen] == list(range(1, 7)) and {t for _, t, _ in seen} == {6}
    assert any(p for _, _, p in seen)


@needs_diffsynth
def test_cancel_stops_between_steps():
    from gentor.errors import GentorInterrupted

    def cancel(done, total, preview):
        if done == 1:
            raise GentorInterrupted("cancelled")
    handle = loader.load_handle(T2I, None, "diffsynth")
    with pytest.raises(GentorInterrupted):
        sampler.run(handle, "t2i", Request(prompt="a fox", seed=1, steps=4, width=SIZE, height=SIZE), listener=cancel)
    assert "engine=diffsynth" in run(T2I, "t2i", "diffsynth").text  # the next run works


@needs_diffsynth
def test_lora_runs_through_diffsynths_hot_load_and_matches_the_diffusers_engine(model_roots):
    from gentor.loaders import lora
    from tests import tiny_qwen_lora as kit

    def with_lora(engine: str):
        return lora.with_lora(loader.load_handle(T2I, None, engine), kit.file_name("diffusers"), 0.8)
    request = Request(prompt="a red fox sitting in fresh snow", seed=7, steps=STEPS, width=SIZE, height=SIZE, cfg=1.0)
    ours = sampler.run(with_lora("diffsynth"), "t2i", request)
    ref = sampler.run(with_lora("diffusers"), "t2i", request)
    base = run(T2I, "t2i", "diffsynth", cfg=1.0)
    assert "hot-loaded" in ours.text
    assert rel_err(ours.image, base.image) > 10 * TOL_NO_CFG, "the LoRA must change the image"
    assert rel_err(ours.image, ref.image) < TOL_NO_CFG
    # switched off again for the next run: the base image comes back exactly
    assert torch.equal(run(T2I, "t2i", "diffsynth", cfg=1.0).image, base.image)


@needs_diffsynth
def test_every_weight_is_under_a_diffsynth_wrapper():
    """On a GPU a weight outside DiffSynth's wrappers would stay on the CPU: every one must be managed, which
    needs the transformers class renames resolved (DiffSynth's maps name the old classes)."""
    run(T2I, "t2i", "diffsynth", cfg=1.0)
    assert_every_weight_wrapped([("qwen_image_transformer", views.build_dit, views.DIT_MAP),
                                 ("autoencoder_kl_qwen_image", views.build_vae, views.VAE_MAP),
                                 ("qwen2_5_vl", views.build_text_encoder, views.TEXT_ENCODER_MAP)])


def assert_every_weight_wrapped(views_of: list) -> None:
    """Each (cache kind, view builder, DiffSynth VRAM map) view has every parameter under a DiffSynth wrapper."""
    from diffsynth.core.vram.layers import AutoTorchModule

    from gentor.loaders.memory import Plan, Precision

    setup = views.vram_config(Plan(Precision(torch.float32, torch.float32), "model", torch.device("cpu"), 0))
    for kind, build, key in views_of:
        view = views.enable_vram(build(CACHE.entries(kind)[0].value), key, setup)
        managed = {id(p) for m in view.modules() if isinstance(m, AutoTorchModule) for p in m.parameters()}
        left = [n for n, p in view.named_parameters() if id(p) not in managed]
        assert not left, f"{kind}: weights outside DiffSynth's VRAM management: {left[:5]}"


@pytest.mark.parametrize("offload,budget,expect", [
    ("none", 0, ("cuda", "cuda", "cuda", None)),
    ("model", 0, ("cpu", "cuda", "cuda", None)),
    ("block", 0, ("cpu", "cpu", "cuda", 0.0)),
    ("block", 6 * 2**30, ("cpu", "cpu", "cuda", 6.0)),
])
def test_memory_plan_maps_onto_diffsynths_states(offload, budget, expect):
    from gentor.loaders.memory import Plan, Precision

    plan = Plan(Precision(torch.float8_e4m3fn, torch.bfloat16), offload, torch.device("cuda"), budget)
    setup = views.vram_config(plan)
    c = setup.config
    got = (c["offload_device"].type, c["onload_device"].type, c["preparing_device"].type, setup.limit_gb)
    assert got == expect
    assert c["computation_device"].type == "cuda" and c["computation_dtype"] == torch.bfloat16
    cpu = views.vram_config(dataclasses.replace(plan, device=torch.device("cpu")))
    assert {v.type for k, v in cpu.config.items() if k.endswith("device")} == {"cpu"} and cpu.limit_gb is None


@needs_diffsynth
def test_max_sequence_length_cuts_the_prompt_like_the_diffusers_engine():
    long = "a red fox sitting in fresh snow under tall pines, " * 6
    cut = sampler.make_settings(max_sequence_length=8)
    ours = run(T2I, "t2i", "diffsynth", cfg=1.0, prompt=long, settings=cut)
    assert not torch.equal(ours.image, run(T2I, "t2i", "diffsynth", cfg=1.0, prompt=long).image)
    theirs = run(T2I, "t2i", "diffusers", cfg=1.0, prompt=long, settings=cut)
    assert rel_err(ours.image, theirs.image) < TOL_NO_CFG
    # Both engines say so, with the same count.
    note = re.search(r"prompt: \d+ tokens, only the first 8 were used", theirs.text)
    assert note and note.group() in ours.text
