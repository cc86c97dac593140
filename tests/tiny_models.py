"""Tiny random-weight model kit (DESIGN.md §8).

Writes tiny models in the REAL on-disk layouts of every backend, built with the real library classes, so
that tests can go through the real loaders and samplers on a CPU in seconds:

    python -m tests.tiny_models --out DIR [--backend qwen_image ...] [--force]

writes ``DIR/<folder key>/tiny-<variant>/``. For Qwen-Image (folder key ``qwen_image``):

- ``tiny-qwen-image``            QwenImagePipeline (T2I)
- ``tiny-qwen-image-edit``       QwenImageEditPipeline (single-image Edit)
- ``tiny-qwen-image-edit-2511``  QwenImageEditPlusPipeline, transformer ``zero_cond_t: true``
- ``tiny-qwen-image-sharded``    T2I whose transformer and text encoder are 2-shard safetensors + index
- ``tiny-qwen-image-2512``       T2I with the Qwen-Image-2512 model card (README.md), as the hub repository has
- ``tiny-qwen-image-2.1``        QwenImage21Pipeline with a tiny Qwen3-VL encoder (tests/tiny_qwen21.py)
- ``DIR/loras/tiny-qwen-image-lora-<format>.safetensors``  one LoRA in every key layout (tests/tiny_qwen_lora.py)
- opt-in ``--backend qwen_image_comfy``: real-config folders + the Comfy-format files (tests/tiny_comfy.py)
- opt-in ``--backend qwen_image_comfy21``: the same for Qwen-Image 2.1 (tests/tiny_comfy21.py)

Each folder is what ``DiffusionPipeline.save_pretrained`` writes (``model_index.json``, ``scheduler/``,
``text_encoder/``, ``tokenizer/``, ``transformer/``, ``vae/`` and for edit models ``processor/``). The
tokenizer folder also carries the classic ``vocab.json`` + ``merges.txt`` next to ``tokenizer.json`` as the
real repositories do. Weights are random but deterministic (fixed seeds): repeated runs write identical
files. A variant folder is written into a temporary sibling and renamed into place once complete (it then
holds a ``.complete`` marker); complete folders are skipped unless ``force``.

Python API: ``write_qwen_image(out_dir, variants=None)``, ``write_all(out_dir, backends=None)``; both return
``{variant folder name: path}``. Nothing here touches the network (``HF_HUB_OFFLINE=1`` is set).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from tests.tiny_common import COMPLETE_MARKER, atomic_folder  # noqa: E402 - after the offline environment

# --------------------------------------------------------------------------------------------------------------
# Qwen-Image
# --------------------------------------------------------------------------------------------------------------

QWEN_IMAGE_FOLDER = "qwen_image"
QWEN_IMAGE_T2I = "tiny-qwen-image"
QWEN_IMAGE_EDIT = "tiny-qwen-image-edit"
QWEN_IMAGE_EDIT_2511 = "tiny-qwen-image-edit-2511"
QWEN_IMAGE_SHARDED = "tiny-qwen-image-sharded"
QWEN_IMAGE_2512 = "tiny-qwen-image-2512"
QWEN_IMAGE_21 = "tiny-qwen-image-2.1"  # written by tests/tiny_qwen21.py (another architecture)
QWEN_IMAGE_VARIANTS = (QWEN_IMAGE_T2I, QWEN_IMAGE_EDIT, QWEN_IMAGE_EDIT_2511, QWEN_IMAGE_SHARDED, QWEN_IMAGE_2512,
                       QWEN_IMAGE_21)
# Model cards of releases that share an architecture with an earlier one (read by the loader's detection).
QWEN_IMAGE_MODEL_CARDS = {QWEN_IMAGE_2512: "---\nlicense: apache-2.0\npipeline_tag: text-to-image\n---\n# Qwen-Image-2512\n"}

# variant -> (pipeline class name, edit model?, zero_cond_t, sharded)
_QWEN_IMAGE_SPECS = {
    QWEN_IMAGE_T2I: ("QwenImagePipeline", False, False, False),
    QWEN_IMAGE_EDIT: ("QwenImageEditPipeline", True, False, False),
    QWEN_IMAGE_EDIT_2511: ("QwenImageEditPlusPipeline", True, True, False),
    QWEN_IMAGE_SHARDED: ("QwenImagePipeline", False, False, True),
    QWEN_IMAGE_2512: ("QwenImagePipeline", False, False, False),
}

# Special tokens of the real Qwen2 / Qwen2.5-VL tokenizer, in their real order. In the real tokenizer they
# follow the 151,643 BPE tokens (<|endoftext|> = 151643 ... <|file_sep|> = 151664); here they follow the tiny
# BPE vocabulary in the same order (ids: qwen_token_ids()).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
QWEN_NON_SPECIAL_ADDED_TOKENS = (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip

# The tiny tokenizer is byte-level (one token per UTF-8 byte) except for the words of the Qwen-Image prompt
# templates below, which get BPE merges so that each is ONE token, as in the real tokenizer. That makes the
# system prefix exactly as long as with the real tokenizer (34 tokens for T2I, 64 for Edit / Edit-Plus, the
# pipelines' prompt_template_encode_start_idx), so the drop removes exactly the system part and keeps every
# token of the user turn, while user prompts stay ~1 token per character. Texts as in diffusers 0.42.1.
QWEN_IMAGE_T2I_SYSTEM = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of "
    "the objects and background:"
)
QWEN_IMAGE_EDIT_SYSTEM = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), then "
    "explain how the user's text instruction should alter or modify the image. Generate a new image that meets "
    "the user's requirements while maintaining consistency with the original input where appropriate."
)
QWEN_TEMPLATE_TEXTS = (
    QWEN_IMAGE_T2I_SYSTEM, QWEN_IMAGE_EDIT_SYSTEM, "system\n", "user\n", "assistant\n", "Picture 1: "
)  # fmt: skip
QWEN_IMAGE_DROP_IDX = {"t2i": 34, "edit": 64}  # real prompt_template_encode_start_idx

# Real Qwen-Image scheduler config (backend_specs §4.2); save_pretrained adds the remaining defaults.
QWEN_IMAGE_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

# Real patch sizes (DiT patch 2, in_channels 64 = 16 latent channels x 2x2), tiny widths (§4.8).
QWEN_IMAGE_TRANSFORMER_CONFIG = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,  # = text encoder hidden size
    "guidance_embeds": False,
    "axes_dims_rope": (8, 12, 12),  # sums to attention_head_dim
}

# Real z_dim 16 and 8x spatial compression (3 downsamples), tiny channels; default latents_mean/std (real ones).
QWEN_IMAGE_VAE_CONFIG = {
    "base_dim": 8,  # real 96; 8 still works and halves the 1 MP VAE encode of the edit pipelines
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 1,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
}

QWEN_TEXT_CONFIG = {  # + vocab_size, bos/eos ids from the tiny tokenizer (qwen_token_ids())
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
    "tie_word_embeddings": False,
}
QWEN_VISION_CONFIG = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": 64,  # = text hidden size
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [1],
    "tokens_per_second": 2,
}

# Real Qwen2.5-VL min_pixels; a small max_pixels (at most 256 patches = 64 merged tokens per image) keeps the
# tiny vision tower cheap.
QWEN_VL_MIN_PIXELS = 3136
QWEN_VL_MAX_PIXELS = 28 * 28 * 64

_SHARDS = 2


def _import_libs():
    import torch
    import transformers
    import diffusers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    return torch


def _pre_tokenize(text: str) -> list[str]:
    """Split like the Qwen2 tokenizer (its split regex, then byte-level symbols), special tokens kept whole."""
    from tokenizers import Regex, pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return [piece for piece, _ in pre.pre_tokenize_str(text)]


@functools.cache
def qwen_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of the tiny BPE: the 256 byte symbols in real Qwen2 order ("!" = 0 ...), then one merge
    chain per template word (QWEN_TEMPLATE_TEXTS). Words that start with a space come first: their merges begin
    with the space symbol, which only occurs at a word start, so they cannot fire inside another word."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    space = bytes_to_unicode()[ord(" ")]
    words = list(dict.fromkeys(w for text in QWEN_TEMPLATE_TEXTS for w in _pre_tokenize(text)))
    words.sort(key=lambda w: not w.startswith(space))  # stable
    merges: list[tuple[str, str]] = []
    for word in words:
        cur = word[0]
        for ch in word[1:]:
            if cur + ch not in vocab:
                merges.append((cur, ch))
                vocab[cur + ch] = len(vocab)
            cur += ch
    return vocab, merges


def qwen_token_ids() -> dict[str, int]:
    """Ids of the special and added tokens in the tiny tokenizer (they follow the BPE vocab, real order)."""
    base = len(qwen_bpe()[0])
    return {tok: base + i for i, tok in enumerate(QWEN_SPECIAL_TOKENS + QWEN_NON_SPECIAL_ADDED_TOKENS)}


def qwen_text_vocab_size() -> int:
    """Embedding rows of the tiny text encoder: tokenizer size rounded up to 64 (real: 152064 > 151665)."""
    n = len(qwen_bpe()[0]) + len(QWEN_SPECIAL_TOKENS) + len(QWEN_NON_SPECIAL_ADDED_TOKENS)
    return -(-n // 64) * 64


def build_qwen_tokenizer():
    """Tiny byte-level Qwen2Tokenizer with the real special tokens (real order) and one-token template words."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = qwen_bpe()
    tok = Qwen2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=None,
        eos_token=None,
        pad_token=None,
        errors="replace",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS], special_tokens=True)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_NON_SPECIAL_ADDED_TOKENS])
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    _check_qwen_tokenizer(tok)
    return tok


def _check_qwen_tokenizer(tok) -> None:
    token_ids = qwen_token_ids()
    ids = tok.convert_tokens_to_ids(list(token_ids))
    if ids != list(token_ids.values()):
        raise RuntimeError(f"tiny Qwen tokenizer: special token ids {ids} != {list(token_ids.values())}")
    t2i = f"<|im_start|>system\n{QWEN_IMAGE_T2I_SYSTEM}<|im_end|>\n<|im_start|>user\n"
    edit = f"<|im_start|>system\n{QWEN_IMAGE_EDIT_SYSTEM}<|im_end|>\n<|im_start|>user\n"
    got = {"t2i": len(tok(t2i).input_ids), "edit": len(tok(edit).input_ids)}
    if got != QWEN_IMAGE_DROP_IDX:
        raise RuntimeError(f"tiny Qwen tokenizer: system prefix lengths {got} != {QWEN_IMAGE_DROP_IDX}")


def _write_legacy_tokenizer_files(folder: Path) -> None:
    """vocab.json + merges.txt as in the real repos (transformers 5 only writes tokenizer.json)."""
    vocab, merges = qwen_bpe()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_qwen_text_encoder(torch):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = qwen_token_ids()
    text_config = dict(
        QWEN_TEXT_CONFIG,
        vocab_size=qwen_text_vocab_size(),
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
    )
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=dict(QWEN_VISION_CONFIG),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    return model


def build_qwen_processor(tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    kw = dict(min_pixels=QWEN_VL_MIN_PIXELS, max_pixels=QWEN_VL_MAX_PIXELS, patch_size=14, temporal_patch_size=2,
              merge_size=2)  # fmt: skip
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**kw),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**kw),
    )


def build_qwen_transformer(torch, zero_cond_t: bool = False):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(2)
    cfg = dict(QWEN_IMAGE_TRANSFORMER_CONFIG)
    if zero_cond_t:
        cfg["zero_cond_t"] = True
    return QwenImageTransformer2DModel(**cfg).eval()


def build_qwen_vae(torch):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(3)
    return AutoencoderKLQwenImage(**QWEN_IMAGE_VAE_CONFIG).eval()


def build_qwen_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG)


def _state_bytes(model) -> tuple[int, int]:
    sizes = [t.numel() * t.element_size() for t in model.state_dict().values()]
    return sum(sizes), max(sizes)


def _two_shard_size(model) -> int:
    # Greedy splitting with max = total/2 + largest tensor gives exactly 2 shards (first shard > total/2).
    total, largest = _state_bytes(model)
    if 2 * largest >= total:
        raise RuntimeError("cannot split into 2 shards: one tensor holds half of the weights")
    return total // 2 + largest


def _count_shards(folder: Path, index_name: str) -> int:
    index = json.loads((folder / index_name).read_text())
    return len(set(index["weight_map"].values()))


def _reshard(folder: Path, pipe) -> None:
    """Re-save transformer/ and text_encoder/ as exactly 2 safetensors shards + index (the real layouts)."""
    for sub, model, index_name in (
        ("transformer", pipe.transformer, "diffusion_pytorch_model.safetensors.index.json"),
        ("text_encoder", pipe.text_encoder, "model.safetensors.index.json"),
    ):
        for f in (folder / sub).glob("*.safetensors"):
            f.unlink()
        model.save_pretrained(folder / sub, safe_serialization=True, max_shard_size=_two_shard_size(model))
        n = _count_shards(folder / sub, index_name)
        if n != _SHARDS:
            raise RuntimeError(f"{folder.name}/{sub}: expected {_SHARDS} shards, got {n}")


def _is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file() and (path / "model_index.json").is_file()


def write_qwen_image(
    out_dir: Path | str, variants: Iterable[str] | None = None, force: bool = False
) -> dict[str, Path]:
    """Write tiny Qwen-Image pipelines into ``out_dir/qwen_image/<variant>``; return {variant: path}."""
    out_dir = Path(out_dir)
    variants = list(QWEN_IMAGE_VARIANTS if variants is None else dict.fromkeys(variants))
    unknown = [v for v in variants if v not in _QWEN_IMAGE_SPECS and v != QWEN_IMAGE_21]
    if unknown:
        raise ValueError(f"unknown Qwen-Image variant(s) {unknown}; known: {', '.join(QWEN_IMAGE_VARIANTS)}")
    root = out_dir / QWEN_IMAGE_FOLDER
    result = {v: root / v for v in variants}
    todo = [v for v in variants if force or not _is_complete(root / v)]
    if QWEN_IMAGE_21 in variants:
        from tests import tiny_qwen21

        result.update(tiny_qwen21.write(out_dir, force=force))
        todo = [v for v in todo if v != QWEN_IMAGE_21]
    if variants == list(QWEN_IMAGE_VARIANTS):  # the whole backend: its LoRAs too
        from tests import tiny_qwen_lora

        result.update(tiny_qwen_lora.write(out_dir, force=force))
    if not todo:
        return result

    torch = _import_libs()
    import diffusers

    root.mkdir(parents=True, exist_ok=True)
    shared = {
        "tokenizer": build_qwen_tokenizer(),
        "text_encoder": build_qwen_text_encoder(torch),
        "vae": build_qwen_vae(torch),
        "scheduler": build_qwen_scheduler(),
    }
    processor = None
    transformers_by_zero_cond: dict[bool, object] = {}

    for variant in todo:
        class_name, edit, zero_cond_t, sharded = _QWEN_IMAGE_SPECS[variant]
        if zero_cond_t not in transformers_by_zero_cond:
            transformers_by_zero_cond[zero_cond_t] = build_qwen_transformer(torch, zero_cond_t)
        components = dict(shared, transformer=transformers_by_zero_cond[zero_cond_t])
        if edit:
            if processor is None:
                # its own tokenizer object: saving a processor stamps "processor_class" into its tokenizer's
                # config, which must not leak into the pipeline's tokenizer/ folder
                processor = build_qwen_processor(build_qwen_tokenizer())
            components["processor"] = processor
        pipe = getattr(diffusers, class_name)(**components)

        def fill(tmp: Path, pipe=pipe, edit=edit, sharded=sharded, variant=variant) -> None:
            pipe.save_pretrained(tmp, safe_serialization=True)
            _write_legacy_tokenizer_files(tmp / "tokenizer")
            if edit:
                _write_legacy_tokenizer_files(tmp / "processor")
            if sharded:
                _reshard(tmp, pipe)
            if variant in QWEN_IMAGE_MODEL_CARDS:
                (tmp / "README.md").write_text(QWEN_IMAGE_MODEL_CARDS[variant], encoding="utf-8")

        atomic_folder(root / variant, fill, force=True)  # ``todo`` already holds only what must be (re)written
    return result


# --------------------------------------------------------------------------------------------------------------
# All backends
# --------------------------------------------------------------------------------------------------------------

def _kit(module: str) -> Callable[..., dict[str, Path]]:
    """A backend's own kit module (tests/tiny_<id>.py), imported when it is written."""
    def write(out_dir: Path | str, force: bool = False) -> dict[str, Path]:
        import importlib
        import inspect

        writer = importlib.import_module(f"tests.{module}").write
        kwargs = {"force": force} if "force" in inspect.signature(writer).parameters else {}
        return writer(Path(out_dir), **kwargs)
    return write


BACKENDS: dict[str, Callable[..., dict[str, Path]]] = {
    "qwen_image": write_qwen_image,
    "deepgen": _kit("tiny_deepgen"),
    "bagel": _kit("tiny_bagel"),
    "emu35": _kit("tiny_emu35"),
    "vlm": _kit("tiny_vlm"),
}
# Written only when named (--backend ID): larger files. qwen_image_comfy = Comfy-format Qwen-Image (tests/tiny_comfy.py).
OPT_IN_BACKENDS: dict[str, Callable[..., dict[str, Path]]] = {"qwen_image_comfy": _kit("tiny_comfy"),
                                                           "qwen_image_comfy21": _kit("tiny_comfy21")}


def write_all(out_dir: Path | str, backends: Iterable[str] | None = None, force: bool = False) -> dict[str, Path]:
    """Write every variant of the given backends (default: all known); return {variant folder name: path}."""
    backends = list(BACKENDS if backends is None else dict.fromkeys(backends))
    known = {**BACKENDS, **OPT_IN_BACKENDS}
    unknown = [b for b in backends if b not in known]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; known backends: {', '.join(known)}")
    result: dict[str, Path] = {}
    for backend in backends:
        result.update(known[backend](out_dir, force=force))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.tiny_models",
        description="Write tiny random-weight models in the real on-disk layouts into OUT/<folder key>/tiny-*/.",
    )
    parser.add_argument("--out", required=True, type=Path, help="models root to write into")
    parser.add_argument(
        "--backend",
        action="append",
        metavar="ID",
        help=f"backend to write (repeatable; default all: {', '.join(BACKENDS)})",
    )
    parser.add_argument("--force", action="store_true", help="rewrite variant folders that are already complete")
    args = parser.parse_args(argv)
    unknown = [b for b in (args.backend or []) if b not in {**BACKENDS, **OPT_IN_BACKENDS}]
    if unknown:
        parser.error(f"unknown backend(s): {', '.join(unknown)}; known backends: {', '.join([*BACKENDS, *OPT_IN_BACKENDS])}")
    t0 = time.perf_counter()
    written = write_all(args.out, args.backend, force=args.force)
    for name, path in written.items():
        print(f"{name}\t{path}")
    print(f"{len(written)} tiny model folder(s) ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
