"""The Emu3.5 text tokenizer: tiktoken BPE + special tokens numbered from 151643.

Data files (from the official ``src/tokenizer_emu3_ibq``): ``emu3.tiktoken`` (base64 token + rank per
line, ranks exactly 0..151642) and ``emu3_vision_tokens.txt`` (the 3 image markers, then one
``<|visual token NNNNNN|>`` per codebook entry). Specials, in id order from 151643: ``<|endoftext|>``,
``<|im_start|>``, ``<|im_end|>``, ``<|extra_0|>`` … ``<|extra_204|>``, then the vision-token list.
Text is NFC-normalised and special tokens written in the text are encoded as specials, as the
reference tokenizer does. Only the 211 text specials and image markers go to tiktoken; the 131,072
visual tokens are matched here (a tiktoken special-token regex over all of them takes ~10 s to build),
which gives the same ids: ``<|visual token k|>`` -> 151854 + k for every k the list holds.
"""
from __future__ import annotations

import base64
import re
import unicodedata
from pathlib import Path
from typing import Sequence

from ...errors import MissingDependencyError, ModelFolderError
from . import tokens as T

TIKTOKEN_FILE = "emu3.tiktoken"
VISION_TOKENS_FILE = "emu3_vision_tokens.txt"
# The Qwen pre-tokenizer pattern of the reference (single digits: "55*73" is five tokens).
PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
           r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
DISPLAY = "Emu3.5"
VISUAL_RE = re.compile(r"<\|visual token (\d{6})\|>")


def read_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file (``base64 rank`` per line) and check the ranks are 0..151642."""
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != T.BPE_RANKS or set(ranks.values()) != set(range(T.BPE_RANKS)):
        raise ModelFolderError(
            f"{DISPLAY} tokenizer: {path.name} is not the Emu3.5 BPE table (got {len(ranks)} ranks, expected "
            f"{T.BPE_RANKS} ranks numbered 0..{T.BPE_RANKS - 1}). Use emu3.tiktoken from baaivision/Emu3.5 "
            "(src/tokenizer_emu3_ibq).")
    return ranks


def read_vision_tokens(path: Path) -> list[str]:
    """The marker + visual-token list; checks the markers and the numbering."""
    names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    n_markers = len(T.IMAGE_MARKERS)
    bad = tuple(names[:n_markers]) != T.IMAGE_MARKERS or any(
        name != visual_token(i) for i, name in enumerate(names[n_markers:]))
    if bad or len(names) <= n_markers:
        raise ModelFolderError(
            f"{DISPLAY} tokenizer: {path.name} is not an Emu3.5 vision-token list (got {len(names)} lines starting "
            f"{names[:2]}, expected {list(T.IMAGE_MARKERS)} then <|visual token 000000|>, … in order). "
            "Use emu3_vision_tokens.txt from baaivision/Emu3.5 (src/tokenizer_emu3_ibq).")
    return names


def visual_token(code: int) -> str:
    return f"<|visual token {code:06d}|>"


def find_files(folders: Sequence[Path]) -> tuple[Path, Path] | None:
    """The first folder holding both data files, or None."""
    for folder in folders:
        if (folder / TIKTOKEN_FILE).is_file() and (folder / VISION_TOKENS_FILE).is_file():
            return folder / TIKTOKEN_FILE, folder / VISION_TOKENS_FILE
    return None


class Emu35Tokenizer:
    """Encode/decode Emu3.5 text, special and visual tokens (tiktoken does the BPE)."""

    def __init__(self, ranks: dict[bytes, int], vision_tokens: list[str]) -> None:
        try:
            import tiktoken  # noqa: PLC0415 - optional dependency of this backend
        except ImportError as exc:
            raise MissingDependencyError(
                f"{DISPLAY} tokenizer: the tiktoken package is missing (got ImportError, expected tiktoken "
                "installed). Run: pip install tiktoken") from exc
        n_markers = len(T.IMAGE_MARKERS)
        specials = list(T.TEXT_SPECIALS) + [f"<|extra_{i}|>" for i in range(T.N_EXTRA)] + list(T.IMAGE_MARKERS)
        self.special_ids = {name: T.SPECIAL_START + i for i, name in enumerate(specials)}
        self.encoding = tiktoken.Encoding("Emu3", pat_str=PATTERN, mergeable_ranks=ranks,
                                          special_tokens=self.special_ids)
        self.n_codes = len(vision_tokens) - n_markers
        self.vocab_size = T.BOV + self.n_codes
        for name, want in (("<|image token|>", T.IMG), ("<|image start|>", T.BOI), ("<|image end|>", T.EOI),
                           ("<|extra_200|>", T.EOL), ("<|extra_203|>", T.BOS), ("<|extra_204|>", T.EOS)):
            assert self.special_ids[name] == want, (name, self.special_ids[name], want)

    @classmethod
    def from_files(cls, tiktoken_file: Path, vision_file: Path) -> "Emu35Tokenizer":
        return cls(read_ranks(tiktoken_file), read_vision_tokens(vision_file))

    def special_strings(self) -> tuple[str, ...]:
        """Spellings of the control tokens ``encode`` turns into structural ids (user text must not hold them)."""
        return tuple(self.special_ids)

    def special_patterns(self) -> tuple[re.Pattern, ...]:
        """The visual tokens, matched by pattern (``<|visual token 000042|>``)."""
        return (VISUAL_RE,)

    def encode(self, text: str) -> list[int]:
        """Text with special tokens written inline -> ids (no BOS added)."""
        text = unicodedata.normalize("NFC", text)
        out: list[int] = []
        start = 0
        for m in VISUAL_RE.finditer(text):
            code = int(m.group(1))
            if code >= self.n_codes:
                continue  # not in this vocabulary: stays plain text, as with the reference tokenizer
            out += self.encoding.encode(text[start:m.start()], allowed_special="all")
            out.append(T.BOV + code)
            start = m.end()
        out += self.encoding.encode(text[start:], allowed_special="all")
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text with special tokens spelled out; broken UTF-8 is replaced."""
        raw = bytearray()
        run: list[int] = []
        for i in ids:
            if i >= T.BOV:
                raw += self.encoding.decode_bytes(run) + visual_token(i - T.BOV).encode()
                run = []
            else:
                run.append(int(i))
        raw += self.encoding.decode_bytes(run)
        return raw.decode("utf-8", errors="replace")

    def decode_text(self, ids: Sequence[int]) -> str:
        """Ids -> text without any special token (what a user should read)."""
        return self.encoding.decode([i for i in ids if i < T.SPECIAL_START], errors="replace")
