"""Qwen-VL prompt enhancer / image understanding through the real loader and sampler on tiny models.

Reference for every decoding check: transformers' own ``from_pretrained`` + ``generate`` on the same
folder and the same chat, built here independently of the sampler.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gentor import glue
from gentor.errors import GentorInterrupted, InputError, ModelFolderError
from gentor.loaders import vlm as loader
from gentor.loaders.cache import CACHE
from gentor.loaders.memory import MemoryOptions, stored_dtypes
from gentor.samplers import vlm as sampler
from gentor.samplers import vlm_prompts as prompts
from gentor.samplers.common import Request
from tests import tiny_vlm
from tests import workflow_files as wf
from tests.workflow_runs import input_image, only

NAMES = tiny_vlm.NAMES
TOKENS = 12


@pytest.fixture(scope="module")
def vlm_root(tiny_root: Path) -> Path:
    tiny_vlm.write(tiny_root)
    return tiny_root / tiny_vlm.FOLDER


@pytest.fixture(autouse=True)
def roots(vlm_root: Path, tiny_root: Path):
    glue.set_fallback_roots("vlm", [vlm_root])
    glue.set_fallback_roots("qwen_image", [tiny_root / "qwen_image"])
    glue.set_fallback_roots("diffusers", [])
    glue.set_fallback_roots("deepgen", [tiny_root / "deepgen"])
    yield vlm_root


@pytest.fixture(scope="module")
def reference():
    """transformers' own model + processor per folder (loaded once)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cache: dict[Path, tuple] = {}

    def get(folder: Path):
        if folder not in cache:
            cache[folder] = (AutoModelForImageTextToText.from_pretrained(folder).eval(),
                             AutoProcessor.from_pretrained(folder))
        return cache[folder]

    return get


def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


def ref_tokens(reference, folder: Path, system: str, text: str, images: list[Image.Image], n: int,
               **gen) -> list[int]:
    model, processor = reference(folder)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    chat = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[chat], images=images or None, return_tensors="pt")
    torch.manual_seed(gen.pop("seed", 0))
    out = model.generate(**inputs, max_new_tokens=n, **gen)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


# ----------------------------------------------------------------------------- detection
def test_dropdown_lists_vlms_and_pipeline_text_encoders():
    names = loader.list_models()
    assert set(NAMES) <= set(names)
    assert "tiny-qwen-image-edit/text_encoder" in names and "tiny-qwen-image/text_encoder" in names
    # DeepGen-1.0-diffusers ships its own Qwen2.5-VL-3B in vlm/: offered, so both can share one copy
    assert "tiny-deepgen-diffusers/vlm" in names
    assert loader.resolve("tiny-deepgen-diffusers/vlm").parent.name == "tiny-deepgen-diffusers"


@pytest.mark.parametrize("name,arch", [(tiny_vlm.QWEN2_VL, "qwen2_vl"), (tiny_vlm.QWEN2_5_VL, "qwen2_5_vl"),
                                       (tiny_vlm.QWEN3_VL, "qwen3_vl")])
def test_architecture_detected_from_files(name, arch, vlm_root, tmp_path):
    handle = loader.load_handle(name, None)
    expected = sum(p.numel() for p in tiny_vlm.build_model(name).parameters())
    assert handle.info_dict["architecture"] == arch and handle.backend == "vlm"
    assert handle.variant.startswith(loader.ARCHITECTURES[arch].family + " (")
    assert handle.info_dict["params"] == loader.human_count(expected)
    # a misleading folder name changes nothing
    fake = vlm_root / "Qwen2.5-VL-7B-Instruct-looking"
    shutil.copytree(vlm_root / name, fake, dirs_exist_ok=True)
    try:
        assert loader.load_handle(fake.name, None).info_dict["architecture"] == arch
    finally:
        shutil.rmtree(fake)


def test_released_sizes_named_from_config_values():
    arch = loader.ARCHITECTURES["qwen2_5_vl"]
    assert loader._variant("qwen2_5_vl", arch, 2048, 36, 3_754_622_976) == "Qwen2.5-VL-3B"
    assert loader._variant("qwen2_5_vl", arch, 3584, 28, 8_292_166_656) == "Qwen2.5-VL-7B"


# ----------------------------------------------------------------------------- decoding = transformers
@pytest.mark.parametrize("name", NAMES)
def test_greedy_equals_transformers_generate(name, vlm_root, reference):
    handle = loader.load_handle(name, None)
    patch = tiny_vlm.PATCH[name] * 2
    image = picture(2 * patch, 3 * patch)  # on the grid and within the budget: the processor keeps it as is
    reply = sampler.enhance(handle, Request(prompt="a cat on a sofa", images=[image], steps=TOKENS))
    system = prompts.T2I_SYSTEM_EN
    assert reply.tokens == ref_tokens(reference, vlm_root / name, system, "a cat on a sofa", [image], TOKENS,
                                      do_sample=False)
    assert not any("resized" in n for n in reply.notes)
    text_only = sampler.describe(handle, Request(prompt="what is a cat?", steps=TOKENS))
    assert text_only.tokens == ref_tokens(reference, vlm_root / name, "", "what is a cat?", [], TOKENS,
                                          do_sample=False)


def test_sampling_seeded_like_transformers(vlm_root, reference):
    handle = loader.load_handle(tiny_vlm.QWEN2_5_VL, None)
    settings = sampler.make_settings(sampling=True, temperature=1.5, top_p=0.95, top_k=50)
    a = sampler.enhance(handle, Request(prompt="a red boat", seed=5, steps=TOKENS, settings=settings))
    b = sampler.enhance(handle, Request(prompt="a red boat", seed=5, steps=TOKENS, settings=settings))
    c = sampler.enhance(handle, Request(prompt="a red boat", seed=6, steps=TOKENS, settings=settings))
    assert a.tokens == b.tokens and a.tokens != c.tokens
    expected = ref_tokens(reference, vlm_root / tiny_vlm.QWEN2_5_VL, prompts.T2I_SYSTEM_EN, "a red boat", [], TOKENS,
                          do_sample=True, temperature=1.5, top_p=0.95, top_k=50, seed=5)
    assert a.tokens == expected


# ----------------------------------------------------------------------------- limits, progress, cancel
def test_cut_at_max_tokens_is_returned_and_said(vlm_root):
    handle = loader.load_handle(tiny_vlm.QWEN2_VL, None)
    reply = sampler.enhance(handle, Request(prompt="a dog", steps=5))
    assert reply.cut and len(reply.tokens) == 5 and reply.text
    assert any("cut at max_new_tokens=5" in n for n in reply.notes)
    assert "cut at max_new_tokens=5" in sampler.run(handle, "enhance", Request(prompt="a dog", steps=5)).text


def test_natural_stop_is_not_a_cut(vlm_root):
    handle = loader.load_handle(tiny_vlm.QWEN2_VL, None)
    greedy = sampler.enhance(handle, Request(prompt="a dog", steps=8)).tokens
    stopper = greedy[2]
    folder = vlm_root / "stops-early"
    shutil.copytree(vlm_root / tiny_vlm.QWEN2_VL, folder, dirs_exist_ok=True)
    try:
        cfg = json.loads((folder / "generation_config.json").read_text())
        cfg["eos_token_id"] = [stopper]
        (folder / "generation_config.json").write_text(json.dumps(cfg))
        reply = sampler.enhance(loader.load_handle(folder.name, None), Request(prompt="a dog", steps=8))
        assert reply.tokens == greedy[:greedy.index(stopper) + 1] and not reply.cut
        assert not any("cut" in n for n in reply.notes)
    finally:
        shutil.rmtree(folder)


def test_progress_every_token_and_cancel_between_tokens():
    handle = loader.load_handle(tiny_vlm.QWEN3_VL, None)
    seen: list[tuple[int, int]] = []
    sampler.enhance(handle, Request(prompt="a tree", steps=6), listener=lambda v, t, _p: seen.append((v, t)))
    assert seen == [(i, 6) for i in range(1, 7)]

    ticks: list[int] = []

    def cancel_at_3(value, _total, _preview):
        ticks.append(value)
        if value == 3:
            glue.request_interrupt()

    with pytest.raises(GentorInterrupted):
        sampler.enhance(handle, Request(prompt="a tree", steps=50), listener=cancel_at_3)
    assert ticks == [1, 2, 3]  # the 4th token's check raised: nothing more was decoded


# ----------------------------------------------------------------------------- inputs
def test_large_image_resized_by_rule_and_said():
    handle = loader.load_handle(tiny_vlm.QWEN2_5_VL, None)
    reply = sampler.describe(handle, Request(prompt="", images=[picture(512, 512)], steps=3))
    # Tiny processor budget 50176 px, factor 28: 512x512 -> sqrt(50176) = 224 per side (a multiple of 28).
    assert any("image_1 512x512 resized to 224x224" in n for n in reply.notes)
    budget = sampler.make_settings(max_image_pixels=28 * 28 * 16)  # 112x112 at most
    reply = sampler.describe(handle, Request(prompt="", images=[picture(300, 150)], steps=3, settings=budget))
    # 300x150 at <= 12544 px: beta = sqrt(45000/12544) = 1.894 -> floor(150/1.894/28)*28 = 56, floor(300/...)=140
    assert any("image_1 300x150 resized to 140x56" in n for n in reply.notes)


def test_empty_prompt_allowed_with_images_refused_without():
    handle = loader.load_handle(tiny_vlm.QWEN2_VL, None)
    assert sampler.enhance(handle, Request(prompt="  ", images=[picture(56, 56)], steps=2)).tokens
    with pytest.raises(InputError, match="prompt: empty prompt and no image"):
        sampler.enhance(handle, Request(prompt="", steps=2))
    with pytest.raises(InputError, match="prompt: empty prompt and no image"):
        sampler.run(handle, "understand", Request(prompt="", steps=2))


def test_language_kept_or_forced():
    assert prompts.detect_language("一只在雪地里的红狐狸") == "zh" and prompts.detect_language("a red fox") == "en"
    assert prompts.system_prompt(prompts.PRESET_T2I, "auto", "一只猫") == prompts.T2I_SYSTEM_ZH
    assert prompts.system_prompt(prompts.PRESET_EDIT, "auto", "make it blue") == prompts.EDIT_SYSTEM_EN
    forced = prompts.system_prompt(prompts.PRESET_T2I, "en", "一只猫")
    assert forced.startswith(prompts.T2I_SYSTEM_EN) and forced.endswith("in English.")
    assert prompts.system_prompt(prompts.PRESET_FREE, "auto", "x", "Be brief.") == "Be brief."


def test_settings_validated():
    with pytest.raises(InputError, match="system_prompt: empty with the free preset"):
        sampler.make_settings(preset=prompts.PRESET_FREE)
    with pytest.raises(InputError, match="preset: unknown"):
        sampler.make_settings(preset="nope")
    handle = loader.load_handle(tiny_vlm.QWEN2_VL, None)
    with pytest.raises(InputError, match="max_new_tokens: out of range"):
        sampler.enhance(handle, Request(prompt="x", steps=sampler.MAX_NEW_TOKENS + 1))
    with pytest.raises(InputError, match="cannot t2i"):
        sampler.run(handle, "t2i", Request(prompt="x"))


def test_reasoning_blocks_removed():
    assert prompts.strip_reasoning("<think>hmm\nok</think>\nA red fox.") == ("A red fox.", True)
    assert prompts.strip_reasoning("A red fox.") == ("A red fox.", False)


# ----------------------------------------------------------------------------- memory options
def test_fp8_storage_and_block_offload():
    plain = sampler.enhance(loader.load_handle(tiny_vlm.QWEN2_5_VL, None), Request(prompt="a hat", steps=6))
    block = sampler.enhance(loader.load_handle(tiny_vlm.QWEN2_5_VL, MemoryOptions(offload="block")),
                            Request(prompt="a hat", steps=6))
    assert block.tokens == plain.tokens  # CPU->CPU block offload computes the same thing
    fp8 = MemoryOptions(weight_dtype="fp8_e4m3fn", compute_dtype="fp32")
    reply = sampler.enhance(loader.load_handle(tiny_vlm.QWEN2_5_VL, fp8), Request(prompt="a hat", steps=6))
    assert len(reply.tokens) == 6
    entry = next(e for e in CACHE.entries("qwen2_5_vl")
                 if e.precision is not None and e.precision.storage == torch.float8_e4m3fn)
    layers = entry.value.model.language_model.layers
    linears = [m for m in layers.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.float8_e4m3fn for m in linears)  # decoder linears rest in FP8
    assert entry.value.lm_head.weight.dtype == torch.float32  # the head is on the skip list
    skip = loader.spec().fp8_skip  # every Linear not named by a skip pattern rests in FP8, weight and bias
    expected = {f"{n}.{p}" for n, m in entry.value.named_modules() if isinstance(m, torch.nn.Linear)
                and not any(re.search(pat, n) for pat in skip) for p, _ in m.named_parameters()}
    assert {n for n, p in entry.value.named_parameters() if p.dtype == torch.float8_e4m3fn} == expected
    assert stored_dtypes(entry.value)[torch.float8_e4m3fn] > 0


def test_too_large_for_the_device_refused_before_loading(monkeypatch):
    from gentor.errors import MemoryEstimateError

    handle = loader.load_handle(tiny_vlm.QWEN3_VL, None)
    reads = CACHE.disk_reads
    monkeypatch.setattr(glue, "torch_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(glue, "free_memory_bytes", lambda device: 1000)
    with pytest.raises(MemoryEstimateError, match="Qwen-VL model: Qwen3-VL .* will not fit on cuda"):
        sampler.enhance(handle, Request(prompt="a cat", steps=2))
    assert CACHE.disk_reads == reads  # refused from the headers: nothing was read


# ----------------------------------------------------------------------------- sharing
def test_pipeline_text_encoder_is_one_copy_with_qwen_image(tiny_root):
    name = "tiny-qwen-image-edit/text_encoder"
    handle = loader.load_handle(name, None)
    assert handle.info_dict["architecture"] == "qwen2_5_vl" and handle.info_dict["images"] == "yes"
    reply = sampler.describe(handle, Request(prompt="what is shown?", images=[picture(56, 56)], steps=3))
    assert len(reply.tokens) == 3
    ours = [e for e in CACHE.entries("qwen2_5_vl") if e.source.endswith("tiny-qwen-image-edit/text_encoder")]
    assert len(ours) == 1
    from gentor.loaders import qwen_image as qwen_loader
    from gentor.loaders.memory import resolve

    qwen = qwen_loader.load_handle("tiny-qwen-image-edit", None)
    with CACHE.session() as session:
        comps = qwen_loader.load_components(Path(qwen.path()), qwen.info_dict["task"],
                                            resolve(qwen.memory, glue.torch_device()), session)
        assert comps["text_encoder"].value is ours[0].value  # the same module object: one copy in memory
    assert len([e for e in CACHE.entries("qwen2_5_vl")
                if e.source.endswith("tiny-qwen-image-edit/text_encoder")]) == 1


# ----------------------------------------------------------------------------- bad folders
def test_qwen_image_pipeline_is_named_not_loaded(vlm_root, tiny_root):
    link = vlm_root / "looks-like-a-vlm"
    shutil.copytree(tiny_root / "qwen_image" / "tiny-qwen-image", link, dirs_exist_ok=True)
    try:
        with pytest.raises(ModelFolderError, match="not a Qwen-VL model .*Qwen-Image"):
            loader.load_handle(link.name, None)
    finally:
        shutil.rmtree(link)


def _broken(vlm_root: Path, name: str, edit) -> Path:
    folder = vlm_root / name
    shutil.copytree(vlm_root / tiny_vlm.QWEN2_VL, folder, dirs_exist_ok=True)
    edit(folder)
    return folder


@pytest.mark.parametrize("case,edit,match", [
    ("other-arch", lambda f: _set_config(f, model_type="llama"), "model_type='llama'"),
    ("no-weights", lambda f: (f / "model.safetensors").unlink(), "no weights"),
    ("truncated", lambda f: _truncate(f / "model.safetensors"), "truncated or corrupt"),
    ("no-tokenizer", lambda f: [(f / n).unlink() for n in ("tokenizer.json", "vocab.json")], "tokenizer: missing"),
    ("wrong-width", lambda f: _set_config(f, hidden_size=96, text_config=None), "do not match config.json"),
])
def test_bad_folders(vlm_root, case, edit, match):
    folder = _broken(vlm_root, f"bad-{case}", edit)
    try:
        with pytest.raises(ModelFolderError, match=match):
            loader.load_handle(folder.name, None)
    finally:
        shutil.rmtree(folder)


def test_name_outside_roots_refused():
    with pytest.raises(InputError, match="paths outside the model folders are refused"):
        loader.load_handle("../../etc", None)


def _set_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    if "text_config" not in cfg and "hidden_size" in changes:
        cfg.update({"num_hidden_layers": 2})
    (folder / "config.json").write_text(json.dumps(cfg))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ----------------------------------------------------------------------------- example workflows
def _api(name: str) -> dict:
    return wf.load_pair(name)[1]


def _node(api: dict, class_type: str) -> dict:
    return only(api, class_type)[1]["inputs"]


def _enhance_from(api: dict) -> tuple[str, list[Image.Image]]:
    e = _node(api, "GentorEnhancePrompt")
    images = [input_image(api, e[f"image_{i}"]) for i in range(1, 5) if f"image_{i}" in e]
    settings = sampler.make_settings(e["preset"], e["language"], e["system_prompt"], e["sampling"], e["temperature"],
                                     e["top_p"], max_image_pixels=e["max_image_pixels"])
    handle = loader.load_handle(_node(api, "GentorLoadPromptEnhancer")["model_name"], None)
    reply = sampler.enhance(handle, Request(prompt=e["prompt"], seed=e["seed"], steps=e["max_new_tokens"],
                                            images=images, settings=settings))
    assert reply.text and len(reply.tokens) == e["max_new_tokens"]
    return reply.text, images


def test_enhance_t2i_workflow_runs_on_the_tiny_models():
    from gentor.loaders import qwen_image as qwen_loader
    from gentor.samplers import qwen_image as qwen_sampler

    api = _api("vlm_enhance_t2i")
    node = _node(api, "GentorTextToImage")
    enhancer_id = next(k for k, n in api.items() if n["class_type"] == "GentorEnhancePrompt")
    assert node["prompt"] == [enhancer_id, 0]  # the enhanced prompt drives the image node
    prompt, _ = _enhance_from(api)
    handle = qwen_loader.load_handle(_node(api, "GentorLoadQwenImage")["model_name"], None)
    out = qwen_sampler.run(handle, "t2i", Request(prompt=prompt, negative=node["negative"], seed=node["seed"],
                                                  steps=node["steps"], cfg=node["cfg"], width=node["width"],
                                                  height=node["height"]))
    assert out.image.shape == (1, node["height"], node["width"], 3)


def test_enhance_edit_workflow_looks_at_the_image_it_edits():
    """The enhancer sees the very image the edit node edits; running the edit itself is Qwen-Image's test."""
    api = _api("vlm_enhance_edit")
    edit, enhance = _node(api, "GentorEditImage"), _node(api, "GentorEnhancePrompt")
    enhancer_id = next(k for k, n in api.items() if n["class_type"] == "GentorEnhancePrompt")
    assert edit["prompt"] == [enhancer_id, 0] and edit["image_1"] == enhance["image_1"]
    assert enhance["preset"] == prompts.PRESET_EDIT
    _, images = _enhance_from(api)
    assert len(images) == 1


def test_describe_workflow_runs_on_the_tiny_model():
    api = _api("vlm_describe")
    d = _node(api, "GentorDescribeImage")
    handle = loader.load_handle(_node(api, "GentorLoadPromptEnhancer")["model_name"], None)
    result = sampler.run(handle, "understand", Request(prompt=d["question"], seed=d["seed"], steps=d["max_new_tokens"],
                                                      images=[input_image(api, d["image_1"])]))
    assert result.text and f"cut at max_new_tokens={d['max_new_tokens']}" in result.text
