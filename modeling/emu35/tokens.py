"""Fixed token ids and official defaults of Emu3.5 (backend_specs.md §3.2, §3.5).

The ids are absolute: the reference logits processor hard-codes them, and the tokenizer numbers its
special tokens from ``SPECIAL_START`` whatever the BPE file holds.
"""
from __future__ import annotations

BPE_RANKS = 151643  # BPE tokens, ids 0..151642
SPECIAL_START = 151643  # first special id: <|endoftext|>
TEXT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
N_EXTRA = 205  # <|extra_0|> .. <|extra_204|>
EXTRA_START = SPECIAL_START + len(TEXT_SPECIALS)  # 151646


def extra_id(i: int) -> int:
    """Id of ``<|extra_i|>``."""
    return EXTRA_START + i


PAD = SPECIAL_START  # <|endoftext|>
EOL = extra_id(200)  # end of an image row
EOF_ = extra_id(201)
TMS = extra_id(202)
BOS = extra_id(203)
EOS = extra_id(204)
IMG = 151851  # <|image token|>: ends the "h*w" header
BOI = 151852  # <|image start|>
EOI = 151853  # <|image end|>
BOV = 151854  # <|visual token 000000|>: visual code k has id BOV + k
BSS = extra_id(100)
ESS = extra_id(101)
BOG, EOG = extra_id(60), extra_id(61)  # global chain of thought
BOC, EOC = extra_id(50), extra_id(51)  # image chain of thought
IMAGE_MARKERS = ("<|image token|>", "<|image start|>", "<|image end|>")

# Digits '0'..'9' are BPE ids 15..24 and '*' is 9 (the free-size header rule uses them).
DIGIT_0 = 15
STAR = 9

# Official defaults (configs/example_config_t2i.py, example_config_x2i.py, config.py).
MAX_NEW_TOKENS = 5120
IMAGE_AREA = 1048576
GENERAL_IMAGE_AREA = 518400
IMAGE_TOP_K = 5120  # Emu3.5-Image configs
GENERAL_IMAGE_TOP_K = 10240  # general Emu3.5 config
TEXT_TOP_K = 1024
TEXT_TOP_P = 0.9
IMAGE_TOP_P = 1.0
CFG_T2I = 5.0  # Emu3.5-Image
CFG_X2I = 3.0  # Emu3.5-Image
CFG_GENERAL = 2.0  # general Emu3.5, T2I and X2I
DOWNSAMPLE = 16  # IBQ pixels per token side
CODE_DIM = 256  # IBQ codebook vector size
MAX_REFERENCES = 3

# T2I token grids (rows*cols) per aspect, at the official 1048576-pixel area.
ASPECT_PRESETS = {
    "4:3": (55, 73), "21:9": (41, 97), "16:9": (47, 85), "3:2": (52, 78), "1:1": (64, 64),
    "3:4": (73, 55), "9:16": (85, 47), "2:3": (78, 52),
}
DEFAULT_ASPECT = "4:3"  # the official "default" preset is 55*73

# Prompt templates (x2i puts the images before the question; t2i has no image).
SYSTEM = "<|extra_203|>You are a helpful assistant"
T2I_TEMPLATE = SYSTEM + " for t2i task. USER: {question} ASSISTANT: <|extra_100|>"
T2I_UNCOND = SYSTEM + ". USER:  ASSISTANT: <|extra_100|>"
X2I_TEMPLATE = SYSTEM + " for x2i task. USER: {images}{question} ASSISTANT: <|extra_100|>"
X2I_UNCOND = SYSTEM + ". USER: {images} ASSISTANT: <|extra_100|>"
