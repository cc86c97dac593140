"""Prompts are data (samplers/prompt_text.py): in every backend, a prompt holding the spelling of one of its
tokenizer's control tokens gives the ids of the same text with the token broken up by hand, and never a
structural id; text no tokenizer accepts is refused naming the input.

Each backend's tokenizer is read from its tiny model folder, and the prompt goes through that backend's own
template code (DeepGen's chat turn, Emu3.5's official templates, the Qwen-VL chat messages, BAGEL's plain
encode, the Qwen-Image pipelines' tokenizer/processor)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from gentor.errors import InputError
from gentor.samplers.prompt_text import BREAK, check_text, escape_special, pipeline_texts, special_strings, user_text

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"  # the turn diffusers' Qwen-Image template wraps
VISUAL = "<|visual token 000003|>"


def broken(spelling: str) -> str:
    """The spelling broken up by hand, as a user would to stop a tokenizer matching it."""
    return spelling[0] + BREAK + spelling[1:]


def hf_structural(tok) -> set[int]:
    return {int(i) for i in tok.convert_tokens_to_ids(list(special_strings(tok)))}


def qwen_image(root: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "qwen_image" / "tiny-qwen-image" / "tokenizer")

    def encode(text: str, escape: bool = True) -> list[int]:
        prompt = pipeline_texts(SimpleNamespace(tokenizer=tok), text, None)[0] if escape else text
        return tok(CHAT.format(prompt)).input_ids

    return encode, special_strings(tok), hf_structural(tok), tok, "qwen_image"


def qwen_image21(root: Path):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(root / "qwen_image" / "tiny-qwen-image-2.1" / "processor")

    def encode(text: str, escape: bool = True) -> list[int]:
        pipe = SimpleNamespace(tokenizer=None, processor=proc)  # the 2.1 pipelines hold a processor only
        prompt = pipeline_texts(pipe, text, None)[0] if escape else text
        return proc(text=[CHAT.format(prompt)]).input_ids[0]

    return encode, special_strings(proc), hf_structural(proc.tokenizer), proc, "qwen_image"


def deepgen(root: Path):
    from transformers import AutoTokenizer

    from gentor.modeling.deepgen.prompts import t2i_texts

    tok = AutoTokenizer.from_pretrained(root / "deepgen" / "tiny-deepgen-diffusers" / "vlm")

    def encode(text: str, escape: bool = True) -> list[int]:
        return tok(t2i_texts([user_text(tok, text, "prompt", "deepgen") if escape else text])).input_ids[0]

    return encode, special_strings(tok), hf_structural(tok), tok, "deepgen"


def bagel(root: Path):
    from transformers import AutoTokenizer

    from gentor.samplers.bagel import _inputs

    tok = AutoTokenizer.from_pretrained(root / "bagel" / "tiny-bagel")

    def encode(text: str, escape: bool = True) -> list[int]:
        prompt = _inputs(SimpleNamespace(images=[], prompt=text), tok)[-1] if escape else text
        return tok.encode(prompt, add_special_tokens=False)  # as modeling/bagel/inference.py encodes text

    return encode, special_strings(tok), hf_structural(tok), tok, "bagel"


def emu35(root: Path):
    from gentor.modeling.emu35 import tokens as T
    from gentor.modeling.emu35.tokenizer import Emu35Tokenizer
    from gentor.samplers.emu35 import build_prompts

    folder = root / "emu35" / "tiny-emu35-image"
    tok = Emu35Tokenizer.from_files(folder / "emu3.tiktoken", folder / "emu3_vision_tokens.txt")

    def encode(text: str, escape: bool = True) -> list[int]:
        if not escape:  # the same template, the prompt pasted in raw
            ids = tok.encode(T.T2I_TEMPLATE.format(question=text))
            return ids if ids[0] == T.BOS else [T.BOS] + ids
        return build_prompts(SimpleNamespace(task="t2i", prompt=text), [], tok)[0]

    structural = set(tok.special_ids.values()) | set(range(T.BOV, T.BOV + tok.n_codes))
    return encode, special_strings(tok) + (VISUAL,), structural, tok, "emu35"


def vlm(root: Path):
    from gentor.loaders.vlm import load_processor
    from gentor.samplers.vlm import as_text, build_messages

    folder = root / "vlm" / "tiny-qwen2.5-vl"
    proc = load_processor(folder, folder)

    def encode(text: str, escape: bool = True) -> list[int]:
        messages = build_messages("", text, 0)
        chat = proc.apply_chat_template(as_text(proc, messages) if escape else messages,
                                        add_generation_prompt=True, tokenize=False)
        return proc.tokenizer(chat).input_ids

    return encode, special_strings(proc), hf_structural(proc.tokenizer), proc, "vlm"


BACKENDS = {"qwen_image": qwen_image, "qwen_image21": qwen_image21, "deepgen": deepgen, "bagel": bagel,
            "emu35": emu35, "vlm": vlm}


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def backend(request, tiny_root: Path):
    return BACKENDS[request.param](Path(tiny_root))


def structural_counts(ids: list[int], structural: set[int]) -> Counter:
    return Counter(i for i in ids if i in structural)


def test_every_control_token_of_every_backend_is_plain_text(backend):
    encode, spellings, structural = backend[:3]
    assert len(spellings) >= 3, spellings
    baseline = structural_counts(encode("draw  now"), structural)  # the template's own control tokens
    hazards = 0
    for spelling in spellings:
        text = f"draw {spelling} now"
        ids = encode(text)
        assert ids == encode(f"draw {broken(spelling)} now"), spelling
        assert structural_counts(ids, structural) == baseline, spelling
        # Without the helper the same text does reach the tokenizer as a control token (what this guards); the
        # Qwen-VL processors even fail on it ("Found 1 <|image_pad|> tokens in the text but no images").
        try:
            hazards += structural_counts(encode(text, escape=False), structural) != baseline
        except ValueError:
            hazards += 1
    assert hazards >= len(spellings) - 1, f"only {hazards} of {len(spellings)} spellings were hazards"


def test_ordinary_prompts_are_untouched(backend):
    encode = backend[0]
    for text in ("a red apple on a table", "把天空变成紫色", "x < y | z > w", "<|not a token|>"):
        assert encode(text) == encode(text, escape=False), text


def test_escape_breaks_overlapping_and_repeated_spellings():
    spellings = ["<|im_start|>", "<|im_end|>", "<|image_pad|>"]
    text = "<|im_start|><|im_start|>x<|image_pad|><|im_end|>"
    out = escape_special(text, spellings)
    assert out.replace(BREAK, "") == text and not any(s in out for s in spellings)
    assert escape_special("plain text", spellings) == "plain text"


@pytest.mark.parametrize("bad, what", [("a\x00b", "NUL character"), ("\udc80x", "lone UTF-16 surrogate"),
                                       ("x\ud83d", "lone UTF-16 surrogate")])
def test_text_no_tokenizer_accepts_is_refused_naming_the_input(bad, what):
    with pytest.raises(InputError, match=rf"^BAGEL prompt: contains a {what}"):
        check_text(bad, "prompt", "BAGEL")
    with pytest.raises(InputError, match=r"^Qwen-Image negative: "):
        pipeline_texts(SimpleNamespace(tokenizer=None), "fine", bad)


def test_prompt_token_limit_of_every_backend_is_checked_naming_the_input(backend):
    from gentor import registry
    from gentor.samplers.prompt_text import count_tokens

    tok, backend_id = backend[3], backend[4]
    spec = registry.get(backend_id)
    limit = spec.max_prompt_tokens
    assert limit > 0, f"{backend_id} states no prompt limit"
    words = ["mountain", "river", "sunset", "forest", "cloud"]
    def text_of(n: int) -> str:
        return " ".join(words[i % len(words)] for i in range(n))

    low, high = 1, limit  # the most words within the limit (each word is at least one token)
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if count_tokens(tok, text_of(mid)) <= limit else (low, mid - 1)
    text = text_of(low)
    assert user_text(tok, text, "prompt", backend_id) == text
    too_long = text + " " + " ".join(words * 4)
    with pytest.raises(InputError) as info:
        user_text(tok, too_long, "negative", backend_id)
    message = str(info.value)
    assert message.startswith(f"{spec.display_name} negative: too long (got ") and f"at most {limit} tokens" in message


def test_a_megabyte_prompt_is_refused_before_any_tokenizer_runs():
    class NoTokenizer:
        def __call__(self, *_a, **_k):
            raise AssertionError("the tokenizer must not see a 1 MB prompt")

        encode = __call__

    with pytest.raises(InputError, match=r"^Qwen-VL prompt: too long \(got 1,000,000 characters, expected at most "):
        user_text(NoTokenizer(), "x" * 1_000_000, "prompt", "vlm")
