"""Tiny random-weight Qwen-VL Instruct folders (prompt enhancer / image understanding) in the real layouts.

``write(out_dir)`` writes ``out_dir/vlm/<name>/`` for

- ``tiny-qwen2-vl``    Qwen2VLForConditionalGeneration, one ``model.safetensors`` in the hub's OLD key layout
                       (``model.layers.*``, ``visual.*``, ``lm_head.*``), as Qwen/Qwen2-VL-*-Instruct ship it
- ``tiny-qwen2.5-vl``  Qwen2_5_VLForConditionalGeneration, 2 shards + ``model.safetensors.index.json``, old key
                       layout (as Qwen/Qwen2.5-VL-*-Instruct)
- ``tiny-qwen3-vl``    Qwen3VLForConditionalGeneration, one file in transformers' current key layout
                       (``model.language_model.*``, ``model.visual.*``, as Qwen/Qwen3-VL-*-Instruct)

Each folder holds config.json, generation_config.json (the Instruct repos' greedy-ish defaults, with a
repetition penalty so generation-config handling is exercised), the tokenizer (tokenizer.json plus the classic
vocab.json / merges.txt), preprocessor_config.json, video_preprocessor_config.json and a chat template — all
written at test time with the real transformers classes; weights are random but deterministic.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FOLDER = "vlm"
QWEN2_VL = "tiny-qwen2-vl"
QWEN2_5_VL = "tiny-qwen2.5-vl"
QWEN3_VL = "tiny-qwen3-vl"
NAMES = (QWEN2_VL, QWEN2_5_VL, QWEN3_VL)

# Our own chat template producing the Qwen chat format (<|im_start|>role\n...<|im_end|>\n, images as
# <|vision_start|><|image_pad|><|vision_end|>, a default system turn when none is given). Real folders ship
# their own template; the loader always uses the folder's.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TEXT = {  # shared tiny text-model widths
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
}  # fmt: skip
MROPE_SECTION = [2, 3, 3]  # sums to head_dim / 2 = 8
QWEN2_VL_VISION = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2, "num_heads": 2,
                   "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
QWEN2_5_VL_VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                     "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                     "fullatt_block_indexes": [1], "tokens_per_second": 2}
QWEN3_VL_VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                   "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                   "num_position_embeddings": 64, "deepstack_visual_indexes": [0]}
# Real min_pixels (Qwen2/2.5-VL 3136 = 56*56; Qwen3-VL 65536); small max_pixels keep the tiny towers cheap.
PIXELS = {QWEN2_VL: (3136, 28 * 28 * 64), QWEN2_5_VL: (3136, 28 * 28 * 64), QWEN3_VL: (4096, 32 * 32 * 64)}
PATCH = {QWEN2_VL: 14, QWEN2_5_VL: 14, QWEN3_VL: 16}
SEEDS = {QWEN2_VL: 11, QWEN2_5_VL: 12, QWEN3_VL: 13}
# The Instruct repos' generation_config.json shape (values of Qwen2.5-VL-*-Instruct: repetition 1.05).
GENERATION = {"do_sample": False, "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1}


def _ids() -> dict[str, int]:
    from tests.tiny_models import qwen_token_ids

    return qwen_token_ids()


def _vocab() -> int:
    from tests.tiny_models import qwen_text_vocab_size

    return qwen_text_vocab_size()


def build_model(name: str):
    """The tiny model of ``name`` built with the real transformers class (random, seeded)."""
    import torch
    import transformers as tf

    ids = _ids()
    tokens = {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
              "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"]}
    text = dict(TEXT, vocab_size=_vocab(), bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": MROPE_SECTION}
    if name == QWEN2_VL:
        config = tf.Qwen2VLConfig(text_config=dict(text, rope_parameters=rope), vision_config=dict(QWEN2_VL_VISION),
                                  tie_word_embeddings=False, **tokens)
        cls = tf.Qwen2VLForConditionalGeneration
    elif name == QWEN2_5_VL:
        config = tf.Qwen2_5_VLConfig(text_config=dict(text, rope_parameters=rope),
                                     vision_config=dict(QWEN2_5_VL_VISION), tie_word_embeddings=False, **tokens)
        cls = tf.Qwen2_5_VLForConditionalGeneration
    elif name == QWEN3_VL:
        rope3 = dict(rope, rope_theta=5000000.0, mrope_interleaved=True)
        config = tf.Qwen3VLConfig(text_config=dict(text, head_dim=16, rope_parameters=rope3),
                                  vision_config=dict(QWEN3_VL_VISION), tie_word_embeddings=False, **tokens)
        cls = tf.Qwen3VLForConditionalGeneration
    else:
        raise ValueError(f"unknown tiny VLM {name!r}; known: {', '.join(NAMES)}")
    torch.manual_seed(SEEDS[name])
    model = cls(config).eval()
    with torch.no_grad():  # default init leaves tiny logits nearly flat; widen them so greedy paths differ
        model.lm_head.weight.normal_(0.0, 0.5)
        # Stop tokens get zero logits, so random weights never end a reply by chance: replies run to
        # max_new_tokens unless a test names another stop token (predictable lengths in tests).
        model.lm_head.weight[[ids["<|im_end|>"], ids["<|endoftext|>"]]] = 0.0
    return model


def build_processor(name: str):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen3VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from tests.tiny_models import build_qwen_tokenizer

    lo, hi = PIXELS[name]
    kw = dict(min_pixels=lo, max_pixels=hi, patch_size=PATCH[name], temporal_patch_size=2, merge_size=2)
    if name == QWEN3_VL:
        return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**kw), tokenizer=build_qwen_tokenizer(),
                                video_processor=Qwen3VLVideoProcessor(**kw), chat_template=CHAT_TEMPLATE)
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**kw), tokenizer=build_qwen_tokenizer(),
                            video_processor=Qwen2VLVideoProcessor(**kw), chat_template=CHAT_TEMPLATE)


def old_key(key: str) -> str:
    """transformers 5 key -> the hub's original Qwen2/2.5-VL key (model.layers.*, visual.*, lm_head.*)."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


def _save_weights(model, folder: Path, legacy: bool, shards: int) -> None:
    from safetensors.torch import save_file

    state = {(old_key(k) if legacy else k): v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    keys = list(state)
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    total = sum(t.numel() * t.element_size() for t in state.values())
    groups: list[list[str]] = [[]]
    size = 0
    for k in keys:  # contiguous split in key order, like save_pretrained's sharding
        if size > total / shards and len(groups) < shards:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += state[k].numel() * state[k].element_size()
    weight_map = {}
    for i, group in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: state[k] for k in group}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _hub_processor_layout(folder: Path) -> None:
    """Split transformers 5's processor_config.json into the files the hub repos ship:
    preprocessor_config.json, video_preprocessor_config.json and chat_template.json."""
    combined = json.loads((folder / "processor_config.json").read_text())
    cls = combined.get("processor_class")
    image = dict(combined["image_processor"], processor_class=cls)
    video = dict(combined["video_processor"], processor_class=cls)
    (folder / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    template = folder / "chat_template.jinja"
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template.read_text()}, indent=2))
    template.unlink()
    (folder / "processor_config.json").unlink()


def write_one(root: Path, name: str, force: bool = False) -> Path:
    """Write ``root/name`` atomically (temporary sibling, then rename); skip when already complete."""
    from tests.tiny_models import _write_legacy_tokenizer_files

    from tests.tiny_common import atomic_folder

    def fill(tmp: Path) -> None:
        model = build_model(name)
        model.config.save_pretrained(tmp)
        ids = _ids()
        generation = dict(GENERATION, bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
                          eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]])
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        _save_weights(model, tmp, legacy=name != QWEN3_VL, shards=2 if name == QWEN2_5_VL else 1)
        build_processor(name).save_pretrained(tmp)
        _hub_processor_layout(tmp)
        _write_legacy_tokenizer_files(tmp)

    return atomic_folder(root / name, fill, force)


def write(out_dir: Path, force: bool = False) -> dict[str, Path]:
    """Write every tiny Qwen-VL folder into ``out_dir/vlm/``; return {name: path}."""
    root = Path(out_dir) / FOLDER
    return {name: write_one(root, name, force) for name in NAMES}
