"""Qwen-Image 2.1 on the optional DiffSynth engine (DiffSynth's ``QwenImage21Pipeline`` over the cached weights),
against the diffusers engine; skipped with the reason when the diffsynth package is not installed."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from gentor.errors import GentorInterrupted, InputError
from gentor.loaders import qwen_image as loader
from gentor.loaders import qwen_image_diffsynth as views
from gentor.loaders.cache import CACHE
from gentor.loaders.memory import MemoryOptions
from gentor.samplers import qwen_image as sampler
from gentor.samplers import qwen_image_diffsynth as ds_sampler
from gentor.samplers.common import Request
from tests import tiny_qwen21
from tests.qwen_helpers import picture, rel_err
from tests.test_qwen_image_diffsynth import assert_every_weight_wrapped, needs_diffsynth

NAME = tiny_qwen21.VARIANT
SAME_SCHEDULE = "tiny-qwen-image-2.1-diffsynth-schedule"
SIZE, STEPS = 96, 3  # 64x64 happens to give bit-identical images on both engines
# Measured on the tiny 2.1 model (fp32, relative L2 of the images). With the folder's scheduler set to the
# schedule DiffSynth samples on, the engines agree to 3e-7 (T2I, CFG 4, two references); the kit's own
# scheduler config (the pipeline's shift defaults) gives another schedule: 6e-3.
TOL_SAME_SCHEDULE = 1e-5
EDIT_SIZE = 128
TOL_OTHER_SCHEDULE = 3e-2
TOL_FP8 = 2e-2
LORA_RANK = 4


@pytest.fixture(autouse=True)
def roots(model_roots):
    """The kit's 2.1 folder plus a copy whose scheduler config is DiffSynth's own Qwen-Image schedule."""
    folder = model_roots["qwen_image"]
    same = folder / SAME_SCHEDULE
    if not same.exists():
        shutil.copytree(folder / NAME, same)
        config = json.loads((same / "scheduler" / "scheduler_config.json").read_text())
        config.update(ds_sampler.DIFFSYNTH_SCHEDULE)
        (same / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    yield model_roots
    CACHE.unload()
    shutil.rmtree(same)


def run(engine: str, name: str = SAME_SCHEDULE, task: str = "t2i", memory: MemoryOptions | None = None,
        images=(), listener=None, **kw):
    kw = {"prompt": "a red fox sitting in fresh snow", "seed": 5, "steps": STEPS, "width": SIZE, "height": SIZE,
          "cfg": 1.0, **kw}
    return sampler.run(loader.load_handle(name, memory, engine), task, Request(images=list(images), **kw),
                       listener=listener)


def test_a_variant_diffsynth_lacks_is_named_and_falls_back_only_when_allowed(monkeypatch):
    monkeypatch.setattr(views, "SUPPORTED_TASKS", ("t2i", "edit", "edit_plus"))
    with pytest.raises(InputError, match=r"DiffSynth engine does not support qwen-image-2\.1.*diffsynth-or-diffusers"):
        run("diffsynth")
    out = run("diffsynth-or-diffusers")
    assert "engine=diffusers" in out.text and "fell back to diffusers" in out.text and "qwen-image-2.1" in out.text


@needs_diffsynth
def test_t2i_matches_the_diffusers_engine_on_the_same_schedule():
    ours = run("diffsynth")
    assert "engine=diffsynth" in ours.text and "DiffSynth VRAM management" in ours.text
    assert "schedule:" not in ours.text, "the folder's schedule is DiffSynth's: no note"
    ref = run("diffusers")
    assert ours.image.shape == ref.image.shape == (1, SIZE, SIZE, 3) and ours.mask.shape == (1, SIZE, SIZE)
    err = rel_err(ours.image, ref.image)
    assert 0 < err < TOL_SAME_SCHEDULE, f"DiffSynth vs diffusers: rel {err:.2e} (0 would mean diffusers ran)"
    assert rel_err(ours.mask, ref.mask) < TOL_SAME_SCHEDULE
    assert torch.equal(ours.image, run("diffsynth").image)
    assert not torch.equal(ours.image, run("diffsynth", seed=6).image)


@needs_diffsynth
def test_cfg_and_references_match_the_diffusers_engine():
    cfg = run("diffsynth", cfg=4.0)
    assert not torch.equal(cfg.image, run("diffsynth").image)
    assert rel_err(cfg.image, run("diffusers", cfg=4.0).image) < TOL_SAME_SCHEDULE
    # an RGBA reference (its VAE reads the alpha, its text encoder the white-composited copy) and an RGB one
    # References are resized to the output's area by both engines once that is at least twice the vision
    # processor's minimum side (here 128); below it the diffusers engine raises the area to that (fit_resolution),
    # DiffSynth only to the processor's minimum.
    images = [picture(64, 64, seed=1, mode="RGBA"), picture(64, 64, seed=2)]
    edit = run("diffsynth", task="edit", images=images, prompt="make it snow", width=EDIT_SIZE, height=EDIT_SIZE)
    assert "references=2" in edit.text and not torch.equal(edit.image, run("diffsynth").image)
    ref = run("diffusers", task="edit", images=images, prompt="make it snow", width=EDIT_SIZE, height=EDIT_SIZE)
    assert rel_err(edit.image, ref.image) < TOL_SAME_SCHEDULE


@needs_diffsynth
def test_the_kits_own_schedule_is_noted_and_stays_near_the_diffusers_engine():
    ours = run("diffsynth", name=NAME)
    assert "schedule: DiffSynth samples on its own Qwen-Image schedule" in ours.text
    assert "max_shift 1.15" in ours.text
    err = rel_err(ours.image, run("diffusers", name=NAME).image)
    assert TOL_SAME_SCHEDULE < err < TOL_OTHER_SCHEDULE, f"rel {err:.2e}"


@needs_diffsynth
def test_a_folders_sample_sigmas_are_its_grid_when_steps_is_0(model_roots):
    grid = [1.0, 0.8, 0.45, 0.15]  # not the plain grid an explicit step count makes
    folder = model_roots["qwen_image"] / "tiny-qwen-image-2.1-grid"
    shutil.copytree(model_roots["qwen_image"] / SAME_SCHEDULE, folder)
    try:
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps(dict(index, sample_sigmas=grid)))
        seen = []
        on_grid = run("diffsynth", name=folder.name, steps=0, listener=lambda d, t, _p: seen.append(t))
        assert "steps=4" in on_grid.text and set(seen) == {len(grid)}
        # an explicit step count samples on DiffSynth's own schedule: the folder without a grid, same image
        assert torch.equal(run("diffsynth", name=folder.name, steps=4).image, run("diffsynth", steps=4).image)
        assert not torch.equal(on_grid.image, run("diffsynth", steps=4).image)
    finally:
        CACHE.unload()
        shutil.rmtree(folder)


@needs_diffsynth
def test_batch_progress_and_the_noise_of_each_image():
    seen = []
    batch = run("diffsynth", batch_size=2, listener=lambda done, total, _p: seen.append((done, total)))
    assert [d for d, _ in seen] == list(range(1, 2 * STEPS + 1)) and {t for _, t in seen} == {2 * STEPS}
    ref = run("diffusers", batch_size=2)
    assert not torch.equal(batch.image[0], batch.image[1])
    for i in range(2):
        assert rel_err(batch.image[i], ref.image[i]) < TOL_SAME_SCHEDULE


@needs_diffsynth
def test_cancel_stops_between_steps_and_the_next_run_works():
    def cancel(done, _total, _preview):
        if done == 1:
            raise GentorInterrupted("cancelled")
    with pytest.raises(GentorInterrupted):
        run("diffsynth", listener=cancel)
    assert "engine=diffsynth" in run("diffsynth").text


@needs_diffsynth
@pytest.mark.parametrize("offload", ["none", "model", "block"])
def test_fp8_storage_and_offload_run_and_leave_the_shared_cache_in_fp8(offload):
    ref = run("diffsynth")
    fp8 = run("diffsynth", memory=MemoryOptions(weight_dtype="fp8_e4m3fn", compute_dtype="fp32", offload=offload))
    err = rel_err(fp8.image, ref.image)
    assert 0 < err < TOL_FP8, f"FP8 vs fp32 on DiffSynth: rel {err:.2e}"
    entry = next(e for e in CACHE.entries("qwen_image21_transformer") if e.precision.storage == torch.float8_e4m3fn)
    assert torch.float8_e4m3fn in {p.dtype for p in entry.value.transformer_blocks.parameters()}
    assert all(p.device.type == "cpu" for p in entry.value.parameters())


@needs_diffsynth
def test_both_engines_share_one_copy_of_the_weights():
    run("diffusers")
    before = {e.key for e in CACHE.entries()}
    run("diffsynth")
    assert {e.key for e in CACHE.entries()} == before, "the DiffSynth engine must not cache a second copy"


@needs_diffsynth
def test_a_lora_runs_through_diffsynths_hot_load_and_matches_the_diffusers_engine(model_roots):
    from safetensors.torch import save_file

    from gentor.loaders import lora
    from gentor.loaders.files import tensor_shapes, weight_files

    # A rank-4 LoRA (diffusers key layout) on every attention projection of the 2.1 transformer.
    shapes = tensor_shapes(weight_files(model_roots["qwen_image"] / NAME / "transformer", "test", "transformer"))
    gen = torch.Generator().manual_seed(3)
    factors = {}
    targets = sorted(k for k in shapes if re.fullmatch(r"transformer_blocks\.\d+\.attn\.to_[qkv]\.weight", k))
    for key in targets:
        (fan_out, fan_in), module = shapes[key], key.removesuffix(".weight")
        factors[f"transformer.{module}.lora_A.weight"] = torch.randn(LORA_RANK, fan_in, generator=gen) * 0.3
        factors[f"transformer.{module}.lora_B.weight"] = torch.randn(fan_out, LORA_RANK, generator=gen) * 0.3
    path = model_roots["loras"] / "tiny-qwen-image-2.1-lora.safetensors"
    save_file(factors, str(path))
    try:
        def with_lora(engine: str):
            return lora.with_lora(loader.load_handle(SAME_SCHEDULE, None, engine), path.name, 0.8)
        request = Request(prompt="a red fox sitting in fresh snow", seed=5, steps=STEPS, width=SIZE, height=SIZE,
                          cfg=1.0)
        ours = sampler.run(with_lora("diffsynth"), "t2i", request)
        base = run("diffsynth")
        assert "hot-loaded" in ours.text and "engine=diffsynth" in ours.text
        assert rel_err(ours.image, base.image) > 100 * TOL_SAME_SCHEDULE, "the LoRA must change the image"
        assert rel_err(ours.image, sampler.run(with_lora("diffusers"), "t2i", request).image) < TOL_SAME_SCHEDULE
        assert torch.equal(run("diffsynth").image, base.image), "switched off again for the next run"
    finally:
        CACHE.unload()
        path.unlink()


@needs_diffsynth
def test_every_weight_is_under_a_diffsynth_wrapper():
    run("diffsynth")
    assert_every_weight_wrapped([("qwen_image21_transformer", views.build_dit21, views.DIT21_MAP),
                                 ("autoencoder_kl_qwen_image21", views.build_vae21, views.VAE21_MAP),
                                 ("qwen3_vl", views.build_text_encoder21, views.TEXT_ENCODER21_MAP)])


def test_the_schedule_note_names_what_differs():
    assert ds_sampler.schedule_note(dict(ds_sampler.DIFFSYNTH_SCHEDULE, shift=1.0)) is None
    note = ds_sampler.schedule_note(dict(ds_sampler.DIFFSYNTH_SCHEDULE, max_shift=1.15))
    assert note and "max_shift 1.15" in note and "base_shift" not in note.split("(")[-1]

