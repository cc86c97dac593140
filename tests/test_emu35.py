"""Emu3.5 through the real loader and sampler on the tiny models: T2I, X2I, progress, Cancel, bad input."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("tiktoken", reason="the Emu3.5 tokenizer needs tiktoken (pip install tiktoken)")

from gentor import glue  # noqa: E402
from gentor.errors import GenerationError, GentorError, InputError, MemoryEstimateError, ModelFolderError  # noqa: E402
from gentor.loaders import emu35 as loader  # noqa: E402
from gentor.loaders.cache import CACHE  # noqa: E402
from gentor.loaders.memory import MemoryOptions, stored_dtypes  # noqa: E402
from gentor.modeling.emu35.placement import plan_devices  # noqa: E402
from gentor.samplers import emu35 as sampler  # noqa: E402
from gentor.samplers.common import Request, Settings  # noqa: E402
from tests import tiny_emu35  # noqa: E402

MODEL, IBQ = tiny_emu35.MODEL, tiny_emu35.IBQ
SMALL_AREA = 32 * 48  # references become 2x2 or 2x3 tokens


@pytest.fixture(scope="module")
def emu_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("emu_models")
    tiny_emu35.write(root)
    return root / tiny_emu35.FOLDER


@pytest.fixture(autouse=True)
def roots(emu_root):
    glue.set_fallback_roots("emu35", [emu_root])
    yield emu_root


def handle(memory=None, **kw):
    return loader.load_handle(MODEL, IBQ, memory=memory, **kw)


def picture(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")


def settings(**kw) -> Settings:
    return sampler.make_settings(**{"image_area": SMALL_AREA, **kw})


def t2i(**kw):
    req = dict(prompt="a red fox in the snow", seed=3, width=48, height=32)
    req.update(kw)
    return sampler.run(handle(), "t2i", Request(**req))


# ----------------------------------------------------------------------------- detection
def test_detected_from_files():
    h = handle()
    assert h.backend == "emu35" and h.variant == "emu3.5-image"
    assert h.info_dict["variant_source"] == "model card pipeline_tag text-to-image"
    assert h.info_dict["codes"] == "64" and h.info_dict["layers"] == "2"
    assert MODEL in loader.list_models() and IBQ not in loader.list_models()
    assert IBQ in loader.list_vision_tokenizers() and MODEL not in loader.list_vision_tokenizers()


def _variant_folder(emu_root: Path, name: str, card: str | None, image_area: int) -> Path:
    """The tiny model's files with another model card / config image_area (weights linked, not copied)."""
    src, folder = emu_root / MODEL, emu_root / name
    folder.mkdir(exist_ok=True)
    for f in ("model.safetensors", "emu3.tiktoken", "emu3_vision_tokens.txt"):
        if not (folder / f).exists():
            (folder / f).symlink_to(src / f)
    (folder / "config.json").write_text(json.dumps(dict(tiny_emu35.emu3_config(), image_area=image_area)))
    (folder / "README.md").unlink(missing_ok=True)
    if card is not None:
        (folder / "README.md").write_text(card, encoding="utf-8")
    return folder


@pytest.mark.parametrize("card,area,variant,source", [
    (tiny_emu35.model_card("text-to-image"), 518400, "emu3.5-image", "model card pipeline_tag text-to-image"),
    (tiny_emu35.model_card("any-to-any"), 518400, "emu3.5", "model card pipeline_tag any-to-any"),
    (tiny_emu35.model_card("any-to-any"), 1048576, "emu3.5", "model card pipeline_tag any-to-any"),  # card wins
    (None, 1048576, "emu3.5-image", "config.json image_area 1048576"),
    (None, 518400, "emu3.5-image", "assumed"),  # both releases' config.json: nothing tells them apart
    ("# Emu3.5-Image\nno front matter\n", 518400, "emu3.5-image", "assumed"),
    ("---\npipeline_tag: [unclosed\n---\n", 518400, "emu3.5-image", "assumed"),  # broken metadata
])
def test_variant_from_model_card_then_config(emu_root, card, area, variant, source):
    folder = _variant_folder(emu_root, "variant-probe", card, area)
    info = loader.inspect_model(folder)
    assert (info.variant, info.variant_source) == (variant, source)


def test_variant_override_and_assumed_note(emu_root):
    _variant_folder(emu_root, "no-card", None, 518400)
    h = loader.load_handle("no-card", IBQ, MODEL)  # the tiny model's tokenizer files: one cached tokenizer
    assert (h.variant, h.info_dict["variant_source"]) == ("emu3.5-image", "assumed")
    forced = loader.load_handle("no-card", IBQ, MODEL, variant="Emu3.5")
    assert (forced.variant, forced.info_dict["variant_source"]) == ("emu3.5", "loader input")
    assert loader.load_handle(MODEL, IBQ, variant="Emu3.5").variant == "emu3.5"  # over the card too
    with pytest.raises(InputError, match=r"variant: unknown value \(got 'Emu3\.6'"):
        loader.load_handle(MODEL, IBQ, variant="Emu3.6")
    req = dict(prompt="a red fox", seed=3, width=32, height=32)
    assumed = sampler.run(h, "t2i", Request(**req))
    assert "Emu3.5-Image assumed" in assumed.text and assumed.text.startswith("model=emu3.5-image,")
    assert "cfg=5.0" in assumed.text
    general = sampler.run(forced, "t2i", Request(**req))
    assert "assumed" not in general.text and "cfg=2.0" in general.text and general.text.startswith("model=emu3.5,")


# ----------------------------------------------------------------------------- generation
def test_t2i_shape_determinism_and_notes():
    a = t2i(steps=7)
    assert a.image.shape == (1, 32, 48, 3) and a.image.dtype == torch.float32
    assert torch.isfinite(a.image).all() and 0 <= a.image.min() and a.image.max() <= 1
    assert torch.equal(a.image, t2i().image), "same seed + inputs -> same image"
    assert not torch.equal(a.image, t2i(seed=4).image)
    assert "grid=2x3" in a.text and "cfg=5.0" in a.text and "steps=7 does not apply" in a.text


def test_aspect_preset_and_cfg_default_for_edit():
    job, _ = sampler.plan_job("t2i", "emu3.5-image", Request(prompt="x", settings=settings(aspect="1:1")))
    assert job.grid == (2, 2)  # 1:1 at 1536 px: rows=int(sqrt(1536))=39 px -> 2 tokens
    job, _ = sampler.plan_job("t2i", "emu3.5-image", Request(prompt="x"))
    assert job.grid == (55, 73) and job.cfg == 5.0 and job.params.image_top_k == 5120
    job, _ = sampler.plan_job("edit", "emu3.5-image", Request(prompt="x", images=[picture(64, 64, 0)]))
    assert job.cfg == 3.0 and job.grid == (64, 64)
    job, _ = sampler.plan_job("t2i", "emu3.5", Request(prompt="x"))
    assert job.cfg == 2.0 and job.grid is None and job.params.image_top_k == 10240


def test_edit_one_and_three_references_follow_the_last():
    one = sampler.run(handle(), "edit", Request(prompt="make it blue", seed=1, images=[picture(64, 64, 1)],
                                                settings=settings()))
    assert one.image.shape == (1, 32, 32, 3) and "references=1" in one.text
    refs = [picture(64, 64, 1), picture(40, 70, 2), picture(96, 48, 3)]
    three = sampler.run(handle(), "edit", Request(prompt="combine them", seed=1, images=refs, settings=settings()))
    assert three.image.shape == (1, 32, 48, 3) and torch.isfinite(three.image).all()
    other = sampler.run(handle(), "edit", Request(prompt="combine them", seed=1, images=[refs[2], refs[1], refs[0]],
                                                  settings=settings()))
    assert other.image.shape == (1, 32, 32, 3)  # now the 64x64 picture is last


def test_progress_per_row_previews_and_cancel():
    calls = []
    sampler.run(handle(), "t2i", Request(prompt="rows", seed=2, width=48, height=48),
                listener=lambda v, total, preview: calls.append((v, total, preview)))
    assert [(v, t) for v, t, _ in calls] == [(1, 3), (2, 3), (3, 3)]
    assert isinstance(calls[0][2], Image.Image) and calls[0][2].size == (48, 16)  # one finished row

    def cancel(value, total, preview):
        glue.request_interrupt()

    with pytest.raises(GentorError) as info:
        sampler.run(handle(), "t2i", Request(prompt="rows", seed=2, width=48, height=48), listener=cancel)
    assert glue.is_interrupt(info.value)


def test_fp8_storage_runs():
    h = handle(memory=MemoryOptions(weight_dtype="fp8_e4m3fn", compute_dtype="fp32"))
    out = sampler.run(h, "t2i", Request(prompt="a red fox", seed=3, width=32, height=32))
    assert out.image.shape == (1, 32, 32, 3) and torch.isfinite(out.image).all()
    llm = [e for e in CACHE.entries("emu35_llm") if e.precision and e.precision.cast][0]
    dtypes = stored_dtypes(llm.value)
    assert dtypes.get(torch.float8_e4m3fn, 0) > 0
    assert isinstance(llm.value.model.layers[0].mlp.up_proj.weight.dtype, torch.dtype)
    assert llm.value.model.layers[0].mlp.up_proj.weight.dtype == torch.float8_e4m3fn
    assert llm.value.model.embed_tokens.weight.dtype == torch.float32  # embeddings stay out of FP8


# ----------------------------------------------------------------------------- bad input
def test_missing_vision_tokenizer_says_where(emu_root):
    with pytest.raises(ModelFolderError, match=str(emu_root)):
        loader.load_handle(MODEL, "")
    with pytest.raises(InputError, match="not a folder inside"):
        loader.load_handle(MODEL, "no-such-tokenizer")


def test_codebook_must_match_vocab(emu_root):
    bad = emu_root / "ibq-32"
    if not bad.exists():
        bad.mkdir()
        tiny_emu35.write_ibq(bad, n_codes=32)
    with pytest.raises(ModelFolderError, match=r"codebook does not match.*got n_embed 32, expected 64"):
        loader.load_handle(MODEL, "ibq-32")


def test_remote_code_form_of_the_vision_tokenizer_loads(emu_root):
    """The hub repo's transformers form (config.json, model_type Emu3p5VisionVQ, flat fields, codebook_size,
    model.safetensors with the same keys) loads as the config.yaml + model.ckpt form does; its code never runs."""
    import yaml
    from safetensors.torch import save_file

    hf = emu_root / "ibq-hf-form"
    hf.mkdir(exist_ok=True)
    raw = yaml.safe_load((emu_root / IBQ / "config.yaml").read_text())
    flat = dict(raw["ddconfig"], model_type="Emu3p5VisionVQ", architectures=["Emu3p5VisionVQModel"],
                codebook_size=raw["n_embed"], embed_dim=raw["embed_dim"],
                auto_map={"AutoModel": "modeling_emu3p5visionvq.Emu3p5VisionVQModel"})
    (hf / "config.json").write_text(json.dumps(flat), encoding="utf-8")
    state = torch.load(emu_root / IBQ / "model.ckpt", weights_only=True)["state_dict"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(hf / "model.safetensors"))
    (hf / "modeling_emu3p5visionvq.py").write_text("raise SystemExit('remote code must never run')\n")
    assert "ibq-hf-form" in loader.list_vision_tokenizers()
    assert "ibq-hf-form" not in loader.list_models()  # its config.json is no Emu3 LLM
    ours, theirs = loader.load_ibq(hf, 64), loader.load_ibq(emu_root / IBQ, 64)
    assert ours.config == theirs.config
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), name
    assert loader.load_handle(MODEL, "ibq-hf-form").path("vision_tokenizer") == str(hf)

    other = emu_root / "other-json"
    other.mkdir(exist_ok=True)
    (other / "config.json").write_text(json.dumps({"model_type": "Emu3VisionVQ"}), encoding="utf-8")
    save_file({"x": torch.zeros(1)}, str(other / "model.safetensors"))
    assert "other-json" not in loader.list_vision_tokenizers()
    with pytest.raises(ModelFolderError,
                       match=r"not a vision tokenizer folder.*config.json \(model_type Emu3p5VisionVQ"):
        loader.load_handle(MODEL, "other-json")
    flat.pop("ch_mult")
    (hf / "config.json").write_text(json.dumps(flat), encoding="utf-8")
    with pytest.raises(ModelFolderError, match=r"config.json is not an IBQ config \(missing or bad 'ch_mult'"):
        loader.load_handle(MODEL, "ibq-hf-form")


def test_pickle_beyond_weights_is_refused_with_a_conversion_command(emu_root):
    bad = emu_root / "ibq-pickle"
    shutil.copytree(emu_root / IBQ, bad, dirs_exist_ok=True)
    state = torch.load(bad / "model.ckpt", weights_only=True)
    state["args"] = argparse.Namespace(lr=1)  # not a plain tensor container: weights_only refuses it
    torch.save(state, bad / "model.ckpt")
    with pytest.raises(ModelFolderError, match=r"vision_tokenizer: model.ckpt cannot be read safely \(got a torch "
                                               r"checkpoint that pickles argparse.Namespace besides tensors.*"
                                               r"weights_only=True.*save_file"):
        loader.load_ibq(bad, 64)


def test_bad_requests():
    h = handle()
    refs = [picture(32, 32, i) for i in range(4)]
    with pytest.raises(InputError, match="too many references.*got 4, expected at most 3"):
        sampler.run(h, "edit", Request(prompt="x", images=refs, settings=settings()))
    with pytest.raises(InputError, match="max_new_tokens.*got 10, expected at least 13"):
        sampler.run(h, "t2i", Request(prompt="x", width=48, height=32, settings=settings(max_new_tokens=10)))
    with pytest.raises(InputError, match="image_area: out of range"):
        sampler.make_settings(image_area=10)
    with pytest.raises(InputError, match="dcae"):
        sampler.make_settings(vq_type="dcae")
    with pytest.raises(InputError, match="settings of another backend"):
        sampler.run(h, "t2i", Request(prompt="x", settings=Settings("qwen_image", ())))


def test_run_without_complete_image_fails_with_text_and_limit():
    with pytest.raises(GenerationError, match=r"max_new_tokens: no complete image.*got text.*Raise max_new_tokens"):
        sampler.run(handle(), "t2i", Request(prompt="x", seed=1, settings=settings(aspect="auto", max_new_tokens=9)))


def test_budgets_that_cannot_hold_the_model_are_refused():
    from gentor.modeling.emu35.decoder import build_decoder, qwen3_config  # noqa: PLC0415

    cfg = tiny_emu35.emu3_config()
    model = build_decoder(qwen3_config(cfg))
    job, _ = sampler.plan_job("t2i", "emu3.5-image", Request(prompt="x", width=32, height=32))
    sizes = sampler.model_sizes(model, job)
    assert sizes.layers == 2 and sizes.embed == 151918 * 32 * 4
    with pytest.raises(MemoryEstimateError, match=r"does not fit.*expected at least"):
        plan_devices(sizes, {"cuda:0": sizes.embed + sizes.reserve, "cuda:1": sizes.reserve + 1})
    ok = plan_devices(sizes, {"cuda:0": 10**10})
    assert ok.layers_per_device == {"cuda:0": 2}


def test_kv_cache_estimate_refuses_up_front(monkeypatch):
    from gentor.modeling.emu35.decoder import build_decoder, qwen3_config  # noqa: PLC0415

    model = build_decoder(qwen3_config(tiny_emu35.emu3_config()))
    job, _ = sampler.plan_job("edit", "emu3.5-image", Request(prompt="x", images=[picture(64, 64, 0)]))
    tokens = sampler.run_tokens(job)
    assert tokens >= 5120 + 4096  # max_new_tokens + one 64x64-token reference
    # 2 (k, v) x 2 layers x 1 KV head x 16 dims x 4 bytes x 2 branches per token
    assert sampler.kv_bytes(model, tokens, 4) == 2 * 2 * 1 * 16 * 4 * 2 * tokens
    monkeypatch.setattr(glue, "free_memory_bytes", lambda device: 1000)
    with pytest.raises(MemoryEstimateError, match=r"KV cache of this run needs.*got 0\.0 GB free"):
        sampler.check_memory(job, model, torch.device("cpu"))


def test_wrong_model_folder_and_missing_tokenizer_files(emu_root):
    other = emu_root / "not-emu"
    other.mkdir(exist_ok=True)
    (other / "config.json").write_text('{"model_type": "qwen2"}')
    with pytest.raises(ModelFolderError, match=r"holds another model \(got model_type 'qwen2', expected 'Emu3'\)"):
        loader.inspect_model(other)
    bare = emu_root / "bare-model"
    if not bare.exists():
        shutil.copytree(emu_root / MODEL, bare)
        (bare / "emu3.tiktoken").unlink()
    with pytest.raises(ModelFolderError, match=rf"tokenizer: data files missing.*{bare}.*{bare / 'tokenizer'}"):
        loader.load_handle("bare-model", IBQ)
    # a separate tokenizer folder works
    assert loader.load_handle("bare-model", IBQ, tokenizer=MODEL).path("tokenizer").endswith(MODEL)


def test_block_offload_runs_the_same_image():
    """One device with block offload (the degenerate placement): hooks on model.layers, same output."""
    from gentor.loaders.placement import has_block_offload  # noqa: PLC0415

    plain = t2i(seed=9)
    blocked = sampler.run(handle(memory=MemoryOptions(offload="block")), "t2i",
                          Request(prompt="a red fox in the snow", seed=9, width=48, height=32))
    llm = [e for e in CACHE.entries("emu35_llm") if e.placement.startswith("block")][0]
    assert has_block_offload(llm.value)
    assert torch.equal(plain.image, blocked.image)


# ----------------------------------------------------------------------------- the smallest grids
# The tiny IBQ runs its narrowest GroupNorms with ch * ch_mult[-1] = 32 channels in 32 groups: one value per
# group at a 1x1 grid, which torch refuses. So it handles 2 code positions at least (1 row of 2, 2 rows of 1).
TINY_MIN_TOKENS = 2


def test_smallest_grid_follows_the_tokenizers_config():
    from gentor.modeling.emu35.ibq import IBQConfig

    tiny = IBQConfig.from_yaml_dict({"ddconfig": tiny_emu35.IBQ_DDCONFIG, "n_embed": 64, "embed_dim": 256})
    assert tiny.min_code_positions == TINY_MIN_TOKENS
    wide = IBQConfig.from_yaml_dict({"ddconfig": {**tiny_emu35.IBQ_DDCONFIG, "ch": 64}, "n_embed": 64,
                                     "embed_dim": 256})
    assert wide.min_code_positions == 1


@pytest.mark.parametrize("width, height", [(16, 48), (48, 16), (16, 32)])
def test_one_token_wide_or_tall_images_run(width, height):
    calls = []
    out = sampler.run(handle(), "t2i", Request(prompt="thin", seed=2, width=width, height=height),
                      listener=lambda v, total, preview: calls.append((v, total, preview)))
    assert out.image.shape == (1, height, width, 3) and torch.isfinite(out.image).all()
    rows = height // 16
    assert [v for v, _, _ in calls][:rows] == list(range(1, rows + 1))


def test_a_grid_smaller_than_the_tokenizer_handles_is_refused_naming_the_input():
    with pytest.raises(InputError, match=r"Emu3\.5 width/height: a 16x16 image is 1 token\(s\).*got 1x1 tokens, "
                                         r"expected at least 2 tokens, e\.g\. 32x16 or 16x32 pixels"):
        t2i(width=16, height=16)


def test_last_preview_is_the_finished_image():
    """No partial preview stays on the node after a run: the last preview is the decoded image."""
    calls = []
    out = sampler.run(handle(), "t2i", Request(prompt="rows", seed=2, width=48, height=48),
                      listener=lambda v, total, preview: calls.append((v, total, preview)))
    value, total, last = calls[-1]
    assert (value, total) == (3, 3) and isinstance(last, Image.Image) and last.size == (48, 48)
    shown = np.asarray(last, dtype=np.float32) / 255.0
    assert np.abs(shown - out.image[0].numpy()).max() <= 1 / 255 + 1e-6
