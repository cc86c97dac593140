"""User text is data: prompts reach every backend's template as text, never as control tokens.

A prompt may contain the spelling of a tokenizer's own control tokens (``<|image_pad|>``, ``<|im_start|>``,
Emu3.5's ``<|image start|>``, a visual token ``<|visual token 000042|>`` …). Tokenizers match those spellings
anywhere in the string, so without care a prompt could open a new chat turn, claim image slots the processor
then cannot fill, or steer a backend whose structure is token-driven. Chat front ends break such spellings
before they reach the template; so does :func:`user_text`, with a zero-width space after the first
character: the text reads the same, and the tokenizer sees ordinary characters (ids of plain text, never a
structural id). Text no tokenizer accepts (NUL, lone UTF-16 surrogates) is refused naming the input.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from .. import registry
from ..errors import InputError

BREAK = "\u200b"  # zero-width space: invisible, and not part of any control token's spelling
NUL = "\x00"
SURROGATES = re.compile("[\ud800-\udfff]")
MAX_ROUNDS = 8  # breaking one spelling cannot create another; a few rounds are a safety bound
# No backend takes more than 8,192 prompt tokens (registry max_prompt_tokens), and a token holds at most a few
# characters of real text in any language: longer text is refused before a tokenizer spends time on it.
MAX_TEXT_CHARS = 100_000


def check_text(text: Any, name: str, display: str) -> str:
    """Refuse text a tokenizer cannot take: not a string, a NUL character, a lone UTF-16 surrogate."""
    if not isinstance(text, str):
        raise InputError(f"{display} {name}: not text (got {type(text).__name__}, expected a string). "
                         "Connect a STRING or type the text in the widget.")
    if len(text) > MAX_TEXT_CHARS:
        raise InputError(f"{display} {name}: too long (got {len(text):,} characters, expected at most "
                         f"{MAX_TEXT_CHARS:,}). Shorten the text; each model's own token limit is lower still.")
    if NUL in text:
        raise InputError(f"{display} {name}: contains a NUL character (got one at character {text.index(NUL)}, "
                         "expected text without control character 0). Remove it from the text.")
    bad = SURROGATES.search(text)
    if bad:
        raise InputError(f"{display} {name}: contains a lone UTF-16 surrogate (got U+{ord(bad.group()):04X} at "
                         f"character {bad.start()}, expected valid Unicode text). The text was cut inside an emoji "
                         "or other character by the program that sent it: send it as UTF-8.")
    return text


def special_strings(tokenizer: Any) -> tuple[str, ...]:
    """Every control-token spelling a tokenizer (or a processor holding one) matches inside text.

    A tokenizer of our own may define ``special_strings()``; a transformers tokenizer lists its special and
    added tokens (added tokens are matched as one unit too, special or not)."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    own = getattr(tok, "special_strings", None)
    if callable(own):
        return tuple(own())
    names = {str(getattr(t, "content", t)) for t in (getattr(tok, "added_tokens_decoder", None) or {}).values()}
    names.update(str(t) for t in getattr(tok, "all_special_tokens", ()) or ())
    return tuple(sorted((n for n in names if n.strip()), key=len, reverse=True))


def special_patterns(tokenizer: Any) -> tuple[re.Pattern, ...]:
    """Families of control tokens matched by pattern rather than by a fixed list (Emu3.5's visual tokens)."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    own = getattr(tok, "special_patterns", None)
    return tuple(own()) if callable(own) else ()


def escape_special(text: str, spellings: Iterable[str], patterns: Iterable[re.Pattern] = ()) -> str:
    """``text`` with every occurrence of a control-token spelling broken by :data:`BREAK`."""
    alternatives = [re.escape(s) for s in sorted(set(spellings), key=len, reverse=True) if len(s) > 1]
    alternatives += [p.pattern for p in patterns]
    if not alternatives:
        return text
    matcher = re.compile("|".join(f"(?:{a})" for a in alternatives))
    for _ in range(MAX_ROUNDS):
        escaped = matcher.sub(lambda m: m.group()[0] + BREAK + m.group()[1:], text)
        if escaped == text:
            return text
        text = escaped
    return text


def user_text(tokenizer: Any, text: str, name: str, backend: str) -> str:
    """What ``backend`` puts in its template where the user's ``text`` goes: checked, control tokens broken,
    and within the backend's ``max_prompt_tokens`` (registry.py), counted before any model work."""
    spec = registry.get(backend)
    check_text(text, name, spec.display_name)
    escaped = escape_special(text, special_strings(tokenizer), special_patterns(tokenizer))
    limit = spec.max_prompt_tokens
    # Byte-level tokenizers (all of ours) give a token at least one UTF-8 byte: short texts need no count.
    if limit and len(escaped.encode("utf-8")) > limit:
        count = count_tokens(tokenizer, escaped)
        if count > limit:
            raise InputError(f"{spec.display_name} {name}: too long (got {count} tokens, expected at most {limit} "
                             f"tokens for {spec.display_name}). Shorten the text.")
    return escaped


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens of plain ``text`` (no BOS/EOS) by a transformers tokenizer, a processor, or one of our own."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if callable(getattr(tok, "special_strings", None)):
        return len(tok.encode(text))
    return len(tok(text, add_special_tokens=False)["input_ids"])


def pipeline_texts(pipe: Any, prompt: str, negative: str | None, backend: str = "qwen_image") -> tuple[str, str | None]:
    """``user_text`` for a diffusers / DiffSynth pipeline's prompt and negative (its tokenizer, else its processor)."""
    tokenizer = getattr(pipe, "tokenizer", None) or getattr(pipe, "processor", None)
    return (user_text(tokenizer, prompt, "prompt", backend),
            None if negative is None else user_text(tokenizer, negative, "negative", backend))
