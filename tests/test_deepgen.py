"""DeepGen 1.0 end to end on the tiny models, through the real loader, cache, placement and sampler."""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from gentor import glue
from gentor.errors import GentorInterrupted, InputError, MemoryEstimateError, ModelFolderError
from gentor.loaders import deepgen as loader
from gentor.loaders.cache import CACHE
from gentor.loaders.memory import MemoryOptions
from gentor.samplers import deepgen as sampler
from gentor.samplers.common import Request, Settings
from tests import tiny_deepgen as tiny
from tests.deepgen_helpers import deepgen_models, rel_err

CKPT = f"{tiny.CHECKPOINT_FOLDER}/{tiny.CHECKPOINT_FILE}"
LORA = f"{tiny.CHECKPOINT_FOLDER}/{tiny.LORA_CHECKPOINT_FILE}"
OWN_VLM = f"{tiny.DIFFUSERS_FOLDER}/vlm"
SIZE = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return deepgen_models(tmp_path_factory)


@pytest.fixture(autouse=True)
def roots(models):
    glue.set_fallback_roots("deepgen", [models / tiny.DEEPGEN_FOLDER])
    glue.set_fallback_roots("vlm", [models / tiny.VLM_FOLDER])
    yield models


def handle(checkpoint: str = CKPT, memory: MemoryOptions | None = None, vlm: str = tiny.VLM_NAME,
           diffusion: str = loader.SAME_FOLDER):
    return loader.load_handle(checkpoint, diffusion, vlm, memory)


def picture(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def t2i(h=None, **kw):
    kw = {"prompt": "a red fox sitting in fresh snow", "seed": 7, "steps": 2, "width": SIZE, "height": SIZE, **kw}
    return sampler.run(h or handle(), "t2i", Request(**kw))


def edit(images, h=None, **kw):
    kw = {"prompt": "make the sky stormy", "seed": 3, "steps": 2, **kw}
    return sampler.run(h or handle(), "edit", Request(images=images, **kw))


# ----------------------------------------------------------------------------- detection
def test_dropdowns_and_detection_from_weights():
    assert loader.list_checkpoints() == [tiny.DIFFUSERS_FOLDER, LORA, CKPT]  # a diffusion folder is not one
    assert loader.list_diffusion_folders() == [loader.SAME_FOLDER, tiny.CHECKPOINT_FOLDER, tiny.DIFFUSERS_FOLDER]
    assert loader.list_vlms() == [tiny.VLM_NAME, OWN_VLM]
    info = handle().info_dict
    assert (info["form"], info["queries"], info["connector"], info["lora_rank"]) == ("checkpoint", "8", "128x2", "0")
    assert info["unused_tensors"] == "0" and info["vlm_source"] == "separate"
    assert handle(LORA).info_dict["lora_rank"] == str(tiny.LORA_RANK)
    own = handle(tiny.DIFFUSERS_FOLDER, vlm=OWN_VLM).info_dict
    assert (own["form"], own["vlm_source"], own["lora_rank"]) == ("diffusers", "own", "0")
    assert own["bridge_file"].endswith("connector/model.safetensors")


# ----------------------------------------------------------------------------- generation
def test_t2i_shape_deterministic_and_sensitive():
    a = t2i(batch_size=2)
    assert a.image.shape == (2, SIZE, SIZE, 3) and torch.isfinite(a.image).all()
    assert 0 <= a.image.min() and a.image.max() <= 1
    assert torch.equal(a.image, t2i(batch_size=2).image), "same seed + inputs -> identical output"
    assert not torch.equal(a.image[0], a.image[1]), "each batch item has its own noise"
    assert not torch.equal(a.image, t2i(batch_size=2, seed=8).image)
    assert not torch.equal(a.image, t2i(batch_size=2, prompt="a blue whale").image)
    assert "size=32x32" in a.text and "steps=2" in a.text and "cfg=4.0" in a.text


def test_cfg_on_and_off():
    on, off = t2i(), t2i(cfg=1.0)
    assert not torch.equal(on.image, off.image)
    assert "no classifier-free guidance" in off.text


def test_progress_previews_and_cancel():
    seen = []
    sampler.run(handle(), "t2i", Request(prompt="a fox", steps=3, width=SIZE, height=SIZE,
                                         settings=sampler.make_settings(preview_every=1)),
                listener=lambda v, total, p: seen.append((v, total, p)))
    assert [(v, t) for v, t, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    assert isinstance(seen[0][2], Image.Image) and seen[2][2] is None  # no preview after the last step

    def cancel(v, total, p):
        raise GentorInterrupted("cancelled")

    with pytest.raises(GentorInterrupted):
        sampler.run(handle(), "t2i", Request(prompt="a fox", steps=3, width=SIZE, height=SIZE), listener=cancel)


def test_edit_one_reference_follows_its_size_and_image():
    img = picture(96, 64, 1)
    a = edit([img])
    assert a.image.shape == (1, 64, 96, 3) and "references=1" in a.text
    assert torch.equal(a.image, edit([img]).image)
    assert not torch.equal(a.image, edit([picture(96, 64, 2)]).image)


def test_multi_reference_is_one_edit_and_order_matters():
    one, two = picture(64, 64, 1), picture(32, 64, 2)
    both = edit([one, two], width=SIZE, height=SIZE)
    assert both.image.shape == (1, SIZE, SIZE, 3) and "references=2" in both.text
    assert not torch.equal(both.image, edit([one], width=SIZE, height=SIZE).image)
    assert not torch.equal(both.image, edit([two, one], width=SIZE, height=SIZE).image)


def test_very_different_sizes_follow_the_documented_rule():
    res = edit([picture(1024, 128, 1), picture(40, 40, 2)], width=64, height=64, steps=1)
    assert "image_1 1024x128 resized to 64x32 (reference_resize dynamic: long side at most 64" in res.text
    assert "image_2 40x40 resized to 64x64" in res.text
    fixed = edit([picture(1024, 128, 1)], width=64, height=64, steps=1,
                 settings=sampler.make_settings(reference_resize="output_size"))
    assert "resized to 64x64 (reference_resize output_size: exactly 64x64)" in fixed.text


def test_rgba_on_white_and_grayscale():
    rgba = picture(64, 64, 4, "RGBA")
    arr = np.asarray(rgba).copy()
    arr[:32, :, 3] = 0  # top half transparent
    rgba = Image.fromarray(arr, "RGBA")
    white = Image.new("RGB", rgba.size, (255, 255, 255))
    white.paste(rgba, mask=rgba.split()[3])
    assert torch.equal(edit([rgba]).image, edit([white]).image)
    gray = edit([picture(64, 64, 5, "L")])
    assert gray.image.shape == (1, 64, 64, 3) and torch.isfinite(gray.image).all()


def test_both_forms_give_the_same_image():
    img = picture(64, 64, 6)
    assert torch.equal(edit([img]).image, edit([img], h=handle(tiny.DIFFUSERS_FOLDER)).image)


# ----------------------------------------------------------------------------- LoRA and sharing
def test_lora_present_absent_switchable_and_shared_vlm():
    img = picture(64, 64, 7)
    base = edit([img])
    with_lora = edit([img], h=handle(LORA))
    assert "lora=on" in with_lora.text and not torch.equal(base.image, with_lora.image)
    off = edit([img], h=handle(LORA), settings=sampler.make_settings(lora=False))
    assert "lora=off" in off.text and torch.equal(off.image, base.image)
    assert torch.equal(edit([img]).image, base.image), "the shared VLM is back to its base weights"
    assert len(CACHE.entries("qwen2_5_vl")) == 1, "one VLM copy for base and LoRA runs"


def test_prompt_enhancer_shares_the_vlm_copy():
    """The enhancer's loader names the same files: it gets DeepGen's cached Qwen2.5-VL, not a second copy."""
    from gentor.loaders import vlm as vlm_loader
    from gentor.loaders.memory import resolve

    t2i(steps=1)
    ours = CACHE.entries("qwen2_5_vl")
    enhancer = vlm_loader.load_handle(tiny.VLM_NAME, None)
    with CACHE.session() as session:
        entry = vlm_loader.load_components(enhancer, resolve(enhancer.memory, glue.torch_device()), session)["model"]
    assert CACHE.entries("qwen2_5_vl") == ours and entry is ours[0]


def test_lora_equals_the_diffusers_merged_vlm(caplog):
    """model.pt's LoRA as an adapter (alpha 128, r 64) on the base VLM == the diffusers form, whose vlm/ holds
    W + (alpha / r) * B @ A written by the kit with plain torch (no adapter, no pack code)."""
    img = picture(64, 64, 8)
    got = edit([img], h=handle(LORA))
    merged = edit([img], h=handle(tiny.DIFFUSERS_FOLDER, vlm=OWN_VLM))
    assert rel_err(got.image, merged.image) < 1e-4
    assert not torch.equal(merged.image, edit([img], h=handle(tiny.DIFFUSERS_FOLDER)).image), "vlm/ differs from base"
    assert "is used instead of tiny-deepgen-diffusers/vlm" in caplog.text


# ----------------------------------------------------------------------------- memory plan
def test_fp8_storage_and_block_offload_hooks():
    from gentor.loaders.placement import has_block_offload

    img = picture(64, 64, 9)
    ref = edit([img])
    block = edit([img], h=handle(memory=MemoryOptions(offload="block")))
    assert torch.equal(block.image, ref.image), "CPU->CPU block offload changes nothing"
    model = edit([img], h=handle(memory=MemoryOptions(offload="model")))
    assert torch.equal(model.image, ref.image), "model offload (one component at a time) changes nothing"
    fp8 = edit([img], h=handle(memory=MemoryOptions(weight_dtype="fp8_e4m3fn", compute_dtype="fp32", offload="block")))
    assert rel_err(fp8.image, ref.image) < 0.1 and torch.isfinite(fp8.image).all()
    entries = {e.kind: e for e in CACHE.entries() if e.precision is not None and e.precision.cast}
    vlm, dit = entries["qwen2_5_vl"].value, entries["sd3_transformer"].value
    assert vlm.model.language_model.layers[0].self_attn.q_proj.weight.dtype == torch.float8_e4m3fn
    assert dit.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert dit.pos_embed.proj.weight.dtype == torch.float32, "patch embedding kept out of FP8"
    assert has_block_offload(vlm.model.language_model.layers[0]) and has_block_offload(dit.transformer_blocks[0])


# ----------------------------------------------------------------------------- bad input
def _vlm_7b_like(models: Path, tmp_path: Path) -> None:
    tiny.write_vlm(tmp_path / "vlm" / "wide-vlm", hidden=48)
    glue.set_fallback_roots("vlm", [models / tiny.VLM_FOLDER, tmp_path / "vlm"])


def test_wrong_vlm_says_hidden_sizes(models, tmp_path):
    _vlm_7b_like(models, tmp_path)
    with pytest.raises(ModelFolderError, match=r"DeepGen vlm: .*wrong hidden size.*got hidden size 48, expected 32"):
        handle(vlm="wide-vlm")


def test_own_vlm_with_a_lora_checkpoint_is_refused():
    with pytest.raises(ModelFolderError, match=r"DeepGen vlm: .*already has DeepGen's LoRA merged in.*got rank-64"):
        handle(LORA, vlm=OWN_VLM)


@contextlib.contextmanager
def diffusers_copy(models: Path, name: str, src: str = tiny.DIFFUSERS_FOLDER) -> Iterator[Path]:
    """A copy of a tiny DeepGen folder (the diffusers one by default) in the models folder, removed afterwards."""
    copy = models / tiny.DEEPGEN_FOLDER / name
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(models / tiny.DEEPGEN_FOLDER / src, copy)
    try:
        yield copy
    finally:
        shutil.rmtree(copy)


def test_own_vlm_needs_only_weights_config_and_a_tokenizer(models):
    """The published layout: tokenizer/ at the top level, vlm/ without tokenizer or image-processor files."""
    with diffusers_copy(models, "vlm-weights-only") as copy:
        for f in (copy / "vlm").iterdir():
            if not f.name.startswith(("model", "config", "generation_config")):
                f.unlink()
        img = picture(64, 64, 6)
        h = handle("vlm-weights-only", vlm="vlm-weights-only/vlm")
        assert dict(h.paths)["tokenizer"] == str(copy / "tokenizer") and "processor" not in dict(h.paths)
        assert torch.equal(edit([img], h=h).image, edit([img], h=handle(tiny.DIFFUSERS_FOLDER, vlm=OWN_VLM)).image)


def test_separate_vlm_without_image_processor_files(models):
    vlm_root = models / tiny.VLM_FOLDER
    copy = vlm_root / "vlm-no-preprocessor"
    shutil.copytree(vlm_root / tiny.VLM_NAME, copy)
    for f in ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json"):
        (copy / f).unlink(missing_ok=True)
    try:
        assert torch.equal(t2i(h=handle(vlm="vlm-no-preprocessor")).image, t2i().image)
    finally:
        shutil.rmtree(copy)


def test_own_vlm_without_tokenizer_says_how_to_add_it(models):
    with diffusers_copy(models, "no-tokenizer") as copy:
        for f in ("tokenizer.json", "vocab.json"):
            (copy / "vlm" / f).unlink()
        shutil.rmtree(copy / "tokenizer")
        with pytest.raises(ModelFolderError, match=r"DeepGen vlm: no-tokenizer has no tokenizer for its vlm/ .*"
                                                   r"Download the tokenizer/ folder of deepgenteam/DeepGen-1.0-"
                                                   r"diffusers"):
            handle("no-tokenizer", vlm="no-tokenizer/vlm")


def test_own_vlm_choice_of_a_folder_without_vlm_says_so(models):
    with diffusers_copy(models, "no-vlm") as copy:
        shutil.rmtree(copy / "vlm")
        with pytest.raises(ModelFolderError, match=r"DeepGen vlm: no-vlm has no vlm/ folder \(got \['connector', "
                                                   r"'model_index.json', 'scheduler', 'tokenizer', 'transformer', "
                                                   r"'vae'\] in no-vlm/.*Pick Qwen2.5-VL-3B-Instruct from "
                                                   r"models/vlm/"):
            handle("no-vlm", vlm="no-vlm/vlm")


# ----------------------------------------------------------------------------- released layouts
def test_connector_heads_are_read_from_its_config(models):
    """4 heads of 32 (not the released head size 64): read from connector/config.json in both forms."""
    for name in (CKPT, tiny.DIFFUSERS_FOLDER):
        info = handle(name, vlm=tiny.VLM_NAME).info_dict
        assert (info["connector_heads"], info["heads_from"]) == ("4", "connector config")


def test_connector_without_config_is_refused_unless_released_sizes(models):
    with diffusers_copy(models, "no-connector-config") as copy:
        (copy / tiny.CONNECTOR_CONFIG_FILE).unlink()
        with pytest.raises(ModelFolderError, match=r"DeepGen checkpoint: no-connector-config: the connector's head "
                                                   r"count is not stored in its weights .*got width 128, MLP 96, 2 "
                                                   r"layers .*expected the released sizes 2048 / 11946 / 6 .*Add "
                                                   r".*no-connector-config/connector/config.json"):
            handle("no-connector-config")
        config = tiny.CONNECTOR_CONFIG
        (copy / tiny.CONNECTOR_CONFIG_FILE).write_text(json.dumps(dict(config, hidden_size=64)))
        with pytest.raises(ModelFolderError, match=r"connector config does not describe these weights \(got "
                                                   r"hidden_size 64, expected hidden_size 128\)"):
            handle("no-connector-config")
        (copy / tiny.CONNECTOR_CONFIG_FILE).write_text(json.dumps(dict(config, num_attention_heads=3)))
        with pytest.raises(ModelFolderError, match=r"does not divide the width \(got 3 heads for width 128"):
            handle("no-connector-config")


def test_kontext_class_name_is_accepted_by_its_tensors(models, caplog):
    """UniPic2-SD3.5M-Kontext-2B's config may name SD3Transformer2DKontextModel: same parameters, same image."""
    with diffusers_copy(models, "kontext-name", tiny.CHECKPOINT_FOLDER) as copy:
        cfg = json.loads((copy / "transformer" / "config.json").read_text())
        cfg["_class_name"] = "SD3Transformer2DKontextModel"
        (copy / "transformer" / "config.json").write_text(json.dumps(cfg))
        with caplog.at_level(logging.INFO, logger="gentor.loaders.deepgen"):
            h = handle("kontext-name/" + tiny.CHECKPOINT_FILE)
        assert "names SD3Transformer2DKontextModel; accepted as an SD3 DiT by its tensors" in caplog.text
        assert torch.equal(t2i(h=h).image, t2i().image)


def test_transformer_of_another_kind_is_refused_by_its_tensors(models):
    from safetensors.torch import save_file

    with diffusers_copy(models, "not-sd3") as copy:
        for f in (copy / "transformer").glob("*.safetensors"):
            f.unlink()
        save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(48, 16)},
                  str(copy / "transformer" / "diffusion_pytorch_model.safetensors"))
        with pytest.raises(ModelFolderError, match=r"DeepGen diffusion: the transformer weights in not-sd3/"
                                                   r"transformer are not an SD3 DiT's \(SD3Transformer2DModel\) "
                                                   r"\(got no pos_embed.proj.weight \(tensors under "
                                                   r"\['double_blocks'\]\)"):
            handle("not-sd3")


def test_random_bytes_model_pt_is_called_what_it_is(models):
    folder = models / tiny.DEEPGEN_FOLDER / "noise"
    folder.mkdir()
    (folder / "model.pt").write_bytes(bytes(range(7, 207)))
    try:
        with pytest.raises(ModelFolderError, match=r"model.pt could not be read as a state dict \(got model.pt is not "
                                                   r"a torch checkpoint: neither a zip archive nor a pickle \(its "
                                                   r"first bytes are 07 08 09 0a\)") as err:
            handle("noise/model.pt")
        assert "objects other than tensors" not in str(err.value)
    finally:
        shutil.rmtree(folder)


def test_diffusers_folder_without_connector(models):
    with diffusers_copy(models, "no-connector") as copy:
        shutil.rmtree(copy / "connector")
        assert "no-connector" not in loader.list_checkpoints() and "no-connector/vlm" not in loader.list_vlms()
        with pytest.raises(ModelFolderError, match=r"not a DeepGen diffusers folder \(got no connector/\*.safetensors"
                                                   r".*expected transformer/, vae/, scheduler/ and "
                                                   r"connector/model.safetensors"):
            handle("no-connector")


def test_checkpoint_of_another_model(models, tmp_path):
    from safetensors.torch import save_file

    other = models / tiny.DEEPGEN_FOLDER / "other.safetensors"
    save_file({"model.layers.0.weight": torch.zeros(2, 2)}, str(other))
    try:
        assert "other.safetensors" not in loader.list_checkpoints()
        with pytest.raises(ModelFolderError, match="not a DeepGen checkpoint.*tensors under \\['model'\\]"):
            handle("other.safetensors")
    finally:
        other.unlink()


def test_missing_diffusion_subfolder(models):
    broken = models / tiny.DEEPGEN_FOLDER / "broken-diffusion"
    shutil.copytree(models / tiny.DEEPGEN_FOLDER / tiny.CHECKPOINT_FOLDER, broken, dirs_exist_ok=True)
    shutil.rmtree(broken / "vae")
    try:
        with pytest.raises(ModelFolderError, match="DeepGen diffusion: sub-folder vae/ missing"):
            handle(diffusion="broken-diffusion")
    finally:
        shutil.rmtree(broken)


def test_unused_tensors_are_reported(models, caplog):
    state = torch.load(models / tiny.DEEPGEN_FOLDER / CKPT, weights_only=True)
    extra = models / tiny.DEEPGEN_FOLDER / tiny.CHECKPOINT_FOLDER / "extra.pt"
    torch.save({**state, "ema.meta_queries": state["meta_queries"], "step_embed.weight": torch.zeros(2)}, extra)
    try:
        assert handle(f"{tiny.CHECKPOINT_FOLDER}/extra.pt").info_dict["unused_tensors"] == "1"  # ema.* is dropped silently, as officially
        assert "1 tensors are not used (e.g. step_embed.weight)" in caplog.text
    finally:
        extra.unlink()


def test_pickle_needing_more_is_refused_with_the_command(models):
    bad = models / tiny.DEEPGEN_FOLDER / "custom.pt"
    torch.save({"state_dict": {"meta_queries": torch.zeros(2, 2)}, "meta": Exotic()}, bad)
    try:
        with pytest.raises(ModelFolderError, match=r"weights_only=True.*deepgen/cli.py.*--allow-global"):
            handle("custom.pt")
    finally:
        bad.unlink()


class Exotic:
    """Not a tensor container: torch.load(weights_only=True) refuses it."""


def test_edit_inputs_refused():
    with pytest.raises(InputError, match="instruction is empty"):
        edit([picture(32, 32, 1)], prompt="  ")
    with pytest.raises(InputError, match="no image to edit"):
        edit([])
    with pytest.raises(InputError, match="too many references .*got 5, expected at most 4"):
        edit([picture(32, 32, i) for i in range(5)])
    with pytest.raises(InputError, match="settings of another backend"):
        t2i(settings=Settings("qwen_image", ()))


def test_memory_estimate_refuses_references(monkeypatch):
    def need(n: int) -> int:
        job = sampler.plan_job("edit", Request("x", width=64, height=64, images=[picture(64, 64, i) for i in range(n)]))[0]
        return sampler.estimate_bytes(job, {"num_attention_heads": 2, "attention_head_dim": 8}, torch.device("cpu"), 4)

    one, three = need(1), need(3)
    assert three > one
    monkeypatch.setattr(glue, "free_memory_bytes", lambda device: (one + three) // 2)
    edit([picture(64, 64, 1)], steps=1, width=64, height=64)
    with pytest.raises(MemoryEstimateError, match=r"DeepGen images: 3 reference image\(s\).*GB for activations"):
        edit([picture(64, 64, i) for i in range(3)], steps=1, width=64, height=64)


def test_deleted_files_after_loading(models, tmp_path):
    copy = models / tiny.DEEPGEN_FOLDER / "gone"
    shutil.copytree(models / tiny.DEEPGEN_FOLDER / tiny.CHECKPOINT_FOLDER, copy)
    h = handle("gone/model.pt")
    shutil.rmtree(copy)
    with pytest.raises(ModelFolderError, match="the files are gone"):
        t2i(h)


def test_handle_records_inputs():
    info = json.dumps(handle().paths)
    assert tiny.CHECKPOINT_FILE in info and tiny.VLM_NAME in info
