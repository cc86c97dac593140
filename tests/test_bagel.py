"""BAGEL end to end through the real loader and sampler on the tiny model (tests/tiny_bagel.py):
T2I, edit, 2-image edit, think, understanding, determinism, progress/Cancel, FP8 and block offload,
and the bad inputs of the issue."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gentor import glue, registry
from gentor.errors import GentorError, InputError, MemoryEstimateError, ModelFolderError
from gentor.loaders import bagel as loader
from gentor.loaders.cache import CACHE
from gentor.loaders.memory import MemoryOptions, stored_dtypes
from gentor.modeling.bagel import BagelEngine
from gentor.samplers import bagel as sampler
from gentor.samplers.common import Request, Settings
from tests import tiny_bagel

MODEL = tiny_bagel.FOLDER


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny_bagel.session_folder(tmp_path_factory)


@pytest.fixture(autouse=True)
def roots(folder):
    glue.set_fallback_roots("bagel", [folder.parent])
    yield folder.parent


def handle(memory=None):
    return loader.load_handle(MODEL, memory)


def settings(**kw) -> Settings:
    return sampler.make_settings(**{"image_max_side": tiny_bagel.TEST_MAX_SIDE,
                                    "image_min_side": tiny_bagel.TEST_MIN_SIDE, **kw})


def picture(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")
    return img.convert(mode)


def t2i(memory=None, listener=None, **kw):
    req = dict(prompt="a red fox", seed=3, steps=3, width=48, height=32, settings=settings())
    req.update(kw)
    return sampler.run(handle(memory), "t2i", Request(**req), listener=listener)


def edit(images, memory=None, **kw):
    req = dict(prompt="make it blue", seed=3, steps=3, images=images, settings=settings())
    req.update(kw)
    return sampler.run(handle(memory), "edit", Request(**req))


# ----------------------------------------------------------------------------- detection and tasks
def test_detected_from_files_and_registered():
    h = handle()
    assert h.backend == "bagel" and h.variant == "bagel-mot-2x64"
    assert h.info_dict["layers"] == "2" and h.info_dict["vit_layers"] == "2"
    spec = registry.get("bagel")
    assert registry.TASK_UNDERSTAND in spec.tasks and spec.max_references >= 2
    assert spec.defaults.steps == sampler.DEFAULT_STEPS and spec.defaults.cfg == sampler.DEFAULT_CFG_TEXT


def test_t2i_shape_determinism_and_sensitivity():
    a, b = t2i(), t2i()
    assert a.image.shape == (1, 32, 48, 3) and torch.isfinite(a.image).all()
    assert torch.equal(a.image, b.image)
    assert not torch.equal(a.image, t2i(seed=4).image)
    assert not torch.equal(a.image, t2i(prompt="a blue whale").image)
    assert "cfg_text=4.0" in a.text and "cfg_img=1.0" in a.text and "renorm=global" in a.text
    assert "cfg_interval=[0.4, 1]" in a.text and "steps=3" in a.text


def test_t2i_batch_items_differ_and_first_matches_single():
    out = t2i(batch_size=2)
    assert out.image.shape == (2, 32, 48, 3)
    assert not torch.equal(out.image[0], out.image[1])
    assert torch.equal(out.image[:1], t2i().image)  # item 0 draws first from the seeded generator


def test_edit_follows_the_reference_and_uses_edit_defaults():
    ref = picture(80, 48, 1)
    out = edit([ref])
    # tiny rule (long <= 64, short >= 32, multiples of 16): 80x48 -> 64x32
    assert out.image.shape == (1, 32, 64, 3) and torch.isfinite(out.image).all()
    assert "cfg_img=2.0" in out.text and "renorm=text_channel" in out.text and "cfg_interval=[0, 1]" in out.text
    assert torch.equal(out.image, edit([ref]).image)
    assert not torch.equal(out.image, edit([picture(80, 48, 2)]).image)
    assert not torch.equal(out.image, edit([ref], prompt="make it red").image)


def test_two_image_edit_takes_the_size_of_the_last_and_depends_on_both():
    first, last = picture(80, 48, 1), picture(40, 56, 2)
    out = edit([first, last])
    assert out.image.shape == (1, 64, 32, 3)  # 40x56 -> 32x64 (w x h) by the tiny VAE rule
    assert "references=2" in out.text
    assert not torch.equal(out.image, edit([picture(80, 48, 3), last]).image)
    assert edit([first, last], width=48, height=32).image.shape == (1, 32, 48, 3)  # explicit sizes are used


def test_rgba_and_grayscale_references():
    rgba = picture(48, 48, 5, "RGBA")
    rgba.putalpha(Image.new("L", (48, 48), 0))  # fully transparent: composited on white
    white = Image.new("RGB", (48, 48), (255, 255, 255))
    assert torch.equal(edit([rgba]).image, edit([white]).image)
    gray = picture(48, 48, 6, "L")
    assert torch.equal(edit([gray]).image, edit([gray.convert("RGB")]).image)


def test_think_returns_the_plan_and_says_when_it_was_cut():
    out = t2i(settings=settings(think=True, think_max_tokens=4), width=32, height=32)
    assert out.image.shape == (1, 32, 32, 3)
    plan, _, notes = out.text.partition("\n\nmodel=")
    assert plan  # the reasoning text comes first
    assert "think text cut at think_max_tokens=4" in notes
    assert not torch.equal(out.image, t2i(width=32, height=32).image)  # the plan conditions the image


def test_understanding_answers_greedily_and_reports_a_cut():
    img = picture(64, 48, 7)
    req = dict(prompt="what is this?", seed=1, steps=6, images=[img], settings=settings())
    a = sampler.run(handle(), registry.TASK_UNDERSTAND, Request(**req))
    b = sampler.run(handle(), registry.TASK_UNDERSTAND, Request(**{**req, "seed": 9}))
    assert a.image is None and a.text == b.text  # greedy: the seed does not matter
    assert "answer cut at 6 tokens" in a.text
    assert a.text.split("\n\n")[0].strip()  # some answer text before the notes


def test_progress_previews_and_cancel():
    calls = []
    sampler.run(handle(), "t2i", Request(prompt="p", seed=1, steps=7, width=32, height=32,
                                          settings=settings(preview_every=2)),
                listener=lambda v, total, preview: calls.append((v, total, preview)))
    assert [(v, t) for v, t, _ in calls] == [(i, 6) for i in range(1, 7)]
    previews = [v for v, _, p in calls if p is not None]
    assert previews == [2, 4] and calls[1][2].size == (4, 4)  # one preview pixel per latent pixel (8 px)

    def cancel(value, total, preview):
        glue.request_interrupt()

    with pytest.raises(GentorError) as info:
        sampler.run(handle(), "t2i", Request(prompt="p", seed=1, steps=5, width=32, height=32, settings=settings()),
                    listener=cancel)
    assert glue.is_interrupt(info.value)
    assert t2i().image.shape == (1, 32, 48, 3)  # the next run works


# ----------------------------------------------------------------------------- memory options
def _fp8_rounded_engine(folder: Path) -> BagelEngine:
    """fp32 model whose FP8-stored layers (those diffusers' layerwise casting hooks, minus the registry's skip
    patterns) hold FP8-rounded weights: what FP8 storage + fp32 compute must compute."""
    model, ae, tok = tiny_bagel.load_plain(folder)
    skip = registry.get("bagel").fp8_skip
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and not any(re.search(p, name) for p in skip):
                for p in module.parameters(recurse=False):
                    p.copy_(p.to(torch.float8_e4m3fn).float())
    rules = sampler.resize_rules(settings())
    return BagelEngine(model, ae, tok, *rules)


def test_fp8_storage_equals_fp8_rounded_weights_and_is_really_fp8(folder):
    out = t2i(memory=MemoryOptions(weight_dtype="fp8_e4m3fn", compute_dtype="fp32"))
    entry = [e for e in CACHE.entries(loader.KIND_MODEL) if e.precision and e.precision.cast][0]
    model = entry.value
    assert stored_dtypes(model).get(torch.float8_e4m3fn, 0) > 0
    assert model.language_model.model.layers[0].mlp_moe_gen.up_proj.weight.dtype == torch.float8_e4m3fn
    assert model.language_model.model.embed_tokens.weight.dtype == torch.float32
    assert model.llm2vae.weight.dtype == torch.float32  # velocity head kept out of FP8
    ae = [e for e in CACHE.entries(loader.KIND_AE)][0].value
    assert all(p.dtype == torch.float32 for p in ae.parameters())  # fp8_exclude
    # independent: the same run on an fp32 model with FP8-rounded weights
    engine = _fp8_rounded_engine(folder)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        ctx = engine.build_contexts(["a red fox"], gen, (32, 48))
        flow = sampler.plan_job("t2i", Request("a red fox", seed=3, steps=3, width=48, height=32,
                                               settings=settings()), 1024)[0].flow
        x = engine.generate_image(ctx, torch.randn((6, 64), generator=gen), flow)
        ref = engine.decode(x, 32, 48).permute(1, 2, 0)
    assert float((out.image[0] - ref).abs().max()) < 1e-4
    assert not torch.equal(out.image, t2i().image)  # FP8 really changed the weights


def test_block_and_model_offload_give_the_same_image_and_hook_the_declared_blocks():
    plain = t2i()
    assert torch.equal(plain.image, t2i(memory=MemoryOptions(offload="model")).image)
    assert torch.equal(edit([picture(48, 48, 1)]).image,
                       edit([picture(48, 48, 1)], memory=MemoryOptions(offload="model")).image)
    blocked = t2i(memory=MemoryOptions(offload="block"))
    assert torch.equal(plain.image, blocked.image)
    model = [e for e in CACHE.entries(loader.KIND_MODEL) if e.placement.startswith("block")][0].value
    layer = model.language_model.model.layers[0]
    vit_layer = model.vit_model.vision_model.encoder.layers[0]
    for m in (layer, vit_layer):
        assert m._diffusers_hook.get_hook("group_offloading") is not None
    assert "no effect on a CPU" in blocked.text


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("missing", ["ema.safetensors", "ae.safetensors", "llm_config.json", "vit_config.json"])
def test_folder_missing_a_file_says_which(folder, tmp_path, missing):
    broken = tmp_path / "bagel" / "broken"
    shutil.copytree(folder, broken)
    (broken / missing).unlink()
    glue.set_fallback_roots("bagel", [broken.parent])
    with pytest.raises(ModelFolderError, match=re.escape(missing)):
        loader.load_handle("broken", None)
    # the dropdown's cheap filter (ema + both configs) already hides folders without them
    assert ("broken" in loader.list_models()) == (missing == "ae.safetensors")


def test_plain_qwen2_folders_are_refused(folder, tmp_path):
    from safetensors.torch import save_file

    root = tmp_path / "bagel"
    plain = root / "qwen2"
    plain.mkdir(parents=True)
    (plain / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64}))
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4)}, str(plain / "model.safetensors"))
    glue.set_fallback_roots("bagel", [root])
    with pytest.raises(ModelFolderError, match="plain qwen2 model, not BAGEL"):
        loader.load_handle("qwen2", None)
    # BAGEL's file names but Qwen2 weights inside
    fake = root / "fake"
    shutil.copytree(folder, fake)
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4), "model.layers.0.mlp.gate_proj.weight": torch.zeros(4, 4)},
              str(fake / "ema.safetensors"))
    with pytest.raises(ModelFolderError, match="plain Qwen2 weights"):
        loader.load_handle("fake", None)


def test_config_that_does_not_match_the_weights(folder, tmp_path):
    bad = tmp_path / "bagel" / "bad"
    shutil.copytree(folder, bad)
    cfg = json.loads((bad / "llm_config.json").read_text())
    (bad / "llm_config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    glue.set_fallback_roots("bagel", [bad.parent])
    with pytest.raises(ModelFolderError, match="num_hidden_layers does not match"):
        loader.load_handle("bad", None)


def _with_extra_tensors(folder: Path, tmp_path: Path, name: str, extra: dict) -> str:
    """A copy of the tiny folder whose ema.safetensors also holds ``extra``; returns its dropdown name."""
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "bagel" / name
    shutil.copytree(folder, copy)
    state = load_file(str(folder / "ema.safetensors"))
    save_file({**state, **extra}, str(copy / "ema.safetensors"))
    glue.set_fallback_roots("bagel", [copy.parent])
    return name


def test_tensors_the_reference_skips_are_named_and_skipped(folder, tmp_path, caplog):
    """The ViT's last layer (the reference builds num_hidden_layers - 1), SigLIP's pooling head, a training
    counter and a rotary inv_freq buffer: loaded as the reference loads them (skipped), named in the log, and the
    image is the clean folder's."""
    from safetensors.torch import load_file

    clean = t2i().image
    state = load_file(str(folder / "ema.safetensors"))
    vit = json.loads((folder / "vit_config.json").read_text())
    last = vit["num_hidden_layers"] - 1  # the file index of the layer the reference drops
    layer0 = "vit_model.vision_model.encoder.layers.0."
    extra = {k.replace(layer0, f"vit_model.vision_model.encoder.layers.{last}."): v.clone()
             for k, v in state.items() if k.startswith(layer0)}
    extra.update({"vit_model.vision_model.head.probe": torch.zeros(1, 1, 32),
                  "vit_model.vision_model.head.mlp.fc1.weight": torch.zeros(8, 32), "training_step": torch.zeros(1)})
    rotary = [k for k, m in loader._modeling().Bagel(loader.build_config(folder)).named_modules()
              if "inv_freq" in m._buffers]
    if rotary:
        extra[f"{rotary[0]}.inv_freq"] = torch.zeros(4)
    name = _with_extra_tensors(folder, tmp_path, "extra", extra)
    with caplog.at_level("WARNING"):
        h = loader.load_handle(name, None)
    assert h.info_dict["skipped_tensors"] == str(len(extra))
    assert f"{len(extra)} tensors are not used by the model and are skipped" in caplog.text
    n_layer = sum(1 for k in extra if ".encoder.layers." in k)
    assert f"vit_model.vision_model.encoder.layers.{last} ({n_layer} tensors)" in caplog.text
    assert "vit_model.vision_model.head (2 tensors)" in caplog.text and "training_step (1 tensor)" in caplog.text
    req = dict(prompt="a red fox", seed=3, steps=3, width=48, height=32, settings=settings())
    assert torch.equal(sampler.run(h, "t2i", Request(**req)).image, clean)


@pytest.mark.parametrize("key,shape", [("language_model.model.layers.0.self_attn.o_proj.bias", (64,)),
                                       ("language_model.model.layers.1.mlp.router.weight", (4, 64)),
                                       ("connector.fc3.weight", (64, 64))])
def test_unknown_tensors_a_computation_would_need_are_refused(folder, tmp_path, key, shape):
    name = _with_extra_tensors(folder, tmp_path, "needs", {key: torch.zeros(shape)})
    with pytest.raises(ModelFolderError, match=r"BAGEL ema.safetensors: 1 tensors belong to layers this model runs "
                                               rf"but have no place in it \(got {re.escape(key)}, "):
        loader.load_handle(name, None)


def test_sizes_over_1024_are_refused_and_off_grid_sizes_rounded():
    with pytest.raises(InputError, match="width: larger than BAGEL can generate"):
        t2i(width=1040, height=32)
    out = t2i(width=40, height=33)
    assert out.image.shape == (1, 32, 48, 3)
    assert "width 40 is off the 16-pixel grid: rounded to 48" in out.text


def test_too_many_references_for_the_memory_estimate(monkeypatch):
    refs = [picture(64, 64, i) for i in range(4)]
    cfg = loader.build_config(Path(handle().path("model")))
    one, _ = sampler.plan_job("edit", Request("x", images=refs[:1], settings=settings()), 1024)
    four, _ = sampler.plan_job("edit", Request("x", images=refs, settings=settings()), 1024)
    need_one, need_four = sampler.estimate_bytes(one, cfg, 4), sampler.estimate_bytes(four, cfg, 4)
    assert need_four > need_one
    edit(refs[:1])  # weights cached: the check counts activations and caches only
    monkeypatch.setattr(glue, "free_memory_bytes", lambda device: (need_one + need_four) // 2)
    assert edit(refs[:1]).image is not None
    with pytest.raises(MemoryEstimateError, match="with 4 reference image"):
        edit(refs)


def test_bad_requests():
    with pytest.raises(InputError, match="prompt: empty instruction"):
        edit([picture(32, 32, 1)], prompt="  ")
    with pytest.raises(InputError, match="image_1: no image to edit"):
        edit([])
    with pytest.raises(InputError, match="image_1: no image to look at"):
        sampler.run(handle(), registry.TASK_UNDERSTAND, Request("what?"))
    with pytest.raises(InputError, match="settings of another backend"):
        t2i(settings=Settings("qwen_image", ()))
    with pytest.raises(InputError, match="steps: too few steps"):
        t2i(steps=1)
    with pytest.raises(InputError, match="cfg_renorm_type"):
        sampler.make_settings(cfg_renorm_type="bogus")
    with pytest.raises(InputError, match="cfg_interval"):
        sampler.make_settings(cfg_interval_start=0.9, cfg_interval_end=0.5)
    with pytest.raises(InputError, match="not a folder inside"):
        loader.load_handle("no-such-model", None)
    assert "negative ignored" in t2i(negative="blurry").text.replace("'", "")


def test_bf16_and_fp8_with_bf16_compute_stay_close_to_fp32():
    ref = edit([picture(48, 32, 4)]).image
    for memory in (MemoryOptions(weight_dtype="bf16", compute_dtype="bf16"),
                   MemoryOptions(weight_dtype="fp8_e4m3fn", compute_dtype="bf16")):
        out = edit([picture(48, 32, 4)], memory=memory).image
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert float((out - ref).abs().mean()) < 0.02, memory  # measured ~0.004 on the tiny model


def test_cancel_takes_effect_before_the_next_forward_pass():
    """Cancel lands inside a step: the text-CFG / image-CFG passes after it do not run."""
    t2i()
    model = [e for e in CACHE.entries(loader.KIND_MODEL) if not (e.precision and e.precision.cast)][0].value
    events = []

    def listener(value, total, preview):
        events.append("cancel")
        glue.request_interrupt()

    hook = model.register_forward_pre_hook(lambda *_: events.append("forward"))
    try:
        with pytest.raises(GentorError) as info:
            t2i(steps=5, listener=listener)
    finally:
        hook.remove()
    assert glue.is_interrupt(info.value)
    assert events.count("cancel") == 1 and events[-1] == "cancel" and "forward" in events
