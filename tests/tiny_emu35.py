"""Tiny random-weight Emu3.5 models in the real on-disk layouts (backend_specs.md §3.8).

``write(out_dir)`` writes, under ``out_dir/emu35/``:

- ``tiny-emu35-image/``: an HF causal-LM folder (``config.json`` with ``model_type: Emu3`` and the
  released file's fields, ``image_area`` 518400 as in both releases; ``README.md`` with the hub card's
  front matter, ``pipeline_tag: text-to-image`` as on BAAI/Emu3.5-Image; ``model.safetensors`` with the
  reference key names, bf16) holding the tokenizer data files too:
  ``emu3.tiktoken`` with 151,643 GENERATED ranks (the 256 single bytes in the real file's order, so
  digits are ids 15..24 and '*' is 9, then distinct letter strings) and ``emu3_vision_tokens.txt``
  (3 markers + ``N_CODES`` visual tokens), so every control id is the real one. Vocab 151854 + N_CODES.
- ``tiny-ibq/``: ``config.yaml`` + ``model.ckpt`` (``{"state_dict": …}``, loadable with
  ``torch.load(weights_only=True)``); 16x downsampling (5 levels), codebook N_CODES x 256.

Weights are random but deterministic (fixed seeds). Folders are written next to their final place and
renamed into it once complete (``.complete`` marker); complete folders are skipped unless ``force``.
"""
from __future__ import annotations

import base64
import itertools
import json
import string
from pathlib import Path

FOLDER = "emu35"
MODEL = "tiny-emu35-image"
IBQ = "tiny-ibq"
N_CODES = 64
BPE_RANKS = 151643
FIRST_VISUAL = 151854
BOI = 151852
IMAGE_FIRST_CHANNEL = 4.0
IMAGE_FIRST_WEIGHT = 50.0
LLM_SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16)
IBQ_DDCONFIG = dict(double_z=False, z_channels=16, resolution=256, in_channels=3, out_ch=3, ch=32,
                    ch_mult=[1, 1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[16], dropout=0.0)
CODE_DIM = 256
SEED = 35
WEIGHT_STD = 0.2  # large enough that greedy choices differ between prompts
IMAGE_PIPELINE_TAG = "text-to-image"  # BAAI/Emu3.5-Image's card; BAAI/Emu3.5's says "any-to-any"


def byte_order() -> list[int]:
    """The 256 bytes in GPT-2's printable-first order (the order of the real file's first ranks)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    return printable + [b for b in range(256) if b not in printable]


def synthetic_ranks() -> list[bytes]:
    """151,643 distinct tokens: single bytes, then lowercase strings of 2, 3, 4 letters (prefix-closed)."""
    out = [bytes([b]) for b in byte_order()]
    for n in (2, 3, 4):
        for combo in itertools.product(string.ascii_lowercase, repeat=n):
            out.append("".join(combo).encode())
            if len(out) == BPE_RANKS:
                return out
    raise AssertionError("not enough synthetic tokens")


def write_tokenizer(folder: Path, n_codes: int = N_CODES) -> None:
    lines = [base64.b64encode(tok) + b" " + str(rank).encode() for rank, tok in enumerate(synthetic_ranks())]
    (folder / "emu3.tiktoken").write_bytes(b"\n".join(lines) + b"\n")
    vision = ["<|image token|>", "<|image start|>", "<|image end|>"]
    vision += [f"<|visual token {i:06d}|>" for i in range(n_codes)]
    (folder / "emu3_vision_tokens.txt").write_text("\n".join(vision) + "\n", encoding="utf-8")


def emu3_config(n_codes: int = N_CODES, **shape: int) -> dict:
    """The fields of the released config.json (BAAI/Emu3.5 commit c48ad67) with tiny shapes."""
    cfg = dict(LLM_SHAPE, **shape)
    return {
        "architectures": ["Emu3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "boi_token_id": 151852, "bos_token_id": 151849, "eof_token_id": 151847, "eoi_token_id": 151853,
        "eol_token_id": 151846, "eos_token_id": 151850, "hidden_act": "silu", "image_area": 518400,
        "img_token_id": 151851, "initializer_range": 0.02, "max_position_embeddings": 32768,
        "max_window_layers": 28, "model_type": "Emu3", "pad_token_id": 151643, "pretraining_tp": 1,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 4096,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.52.0",
        "use_cache": True, "vocab_size": FIRST_VISUAL + n_codes, **cfg}


def model_card(pipeline_tag: str) -> str:
    """A README.md with the hub card's front matter (the card's body is left out)."""
    return (f"---\nlicense: apache-2.0\npipeline_tag: {pipeline_tag}\nlibrary_name: transformers\n---\n\n"
            "<div align='center'>\n<h1>Emu3.5: Native Multimodal Models are World Learners</h1>\n</div>\n")


def llm_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the reference decoder (Emu3ForCausalLM; Qwen3ForCausalLM has the same keys)."""
    hid, inter, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hid), "model.norm.weight": (hid,),
              "lm_head.weight": (config["vocab_size"], hid)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (heads * hd, hid), p + "self_attn.k_proj.weight": (kv * hd, hid),
            p + "self_attn.v_proj.weight": (kv * hd, hid), p + "self_attn.o_proj.weight": (hid, heads * hd),
            p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
            p + "mlp.gate_proj.weight": (inter, hid), p + "mlp.up_proj.weight": (inter, hid),
            p + "mlp.down_proj.weight": (hid, inter), p + "input_layernorm.weight": (hid,),
            p + "post_attention_layernorm.weight": (hid,)})
    return shapes


def llm_state_dict(config: dict, seed: int = SEED, image_first: bool | None = None) -> dict:
    """Random weights with the reference key names; norms away from 1 so a wrong norm shows.

    ``image_first`` (default: when the vocabulary has the image tokens) makes the model open its answer
    with <|image start|>, as the real Emu3.5-Image does, so end-to-end runs produce an image: hidden
    channel 0 carries a constant (embeddings set it, no layer writes to it) that only the head row of
    <|image start|> reads, with a large weight. Every other weight stays random.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in llm_shapes(config).items():
        if "norm" in key:
            out[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            out[key] = torch.randn(shape, generator=gen) * WEIGHT_STD
    if image_first is None:
        image_first = config["vocab_size"] > BOI
    if image_first:
        out["model.embed_tokens.weight"][:, 0] = IMAGE_FIRST_CHANNEL
        for key in out:
            if key.endswith(("o_proj.weight", "down_proj.weight")):
                out[key][0, :] = 0.0
        out["lm_head.weight"][:, 0] = 0.0
        out["lm_head.weight"][BOI, 0] = IMAGE_FIRST_WEIGHT
    return out


def ibq_state_dict(seed: int = SEED, n_codes: int = N_CODES) -> dict:
    """Random IBQ weights built with the pack's own module (key names = the reference's)."""
    import torch

    from tests.tiny_common import import_pack  # the pack importable as ``gentor`` whatever its folder is called

    import_pack()
    from gentor.modeling.emu35.ibq import IBQ as Model, IBQConfig

    torch.manual_seed(seed)
    model = Model(IBQConfig.from_yaml_dict({"ddconfig": IBQ_DDCONFIG, "n_embed": n_codes, "embed_dim": CODE_DIM}))
    with torch.no_grad():
        model.quantize.embedding.weight.normal_(0.0, 1.0)
    return model.state_dict()


def write_model(folder: Path, n_codes: int = N_CODES, **shape: int) -> None:
    import torch
    from safetensors.torch import save_file

    config = emu3_config(n_codes, **shape)
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "README.md").write_text(model_card(IMAGE_PIPELINE_TAG), encoding="utf-8")
    sd = {k: v.to(torch.bfloat16) for k, v in llm_state_dict(config).items()}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer(folder, n_codes)


def write_ibq(folder: Path, n_codes: int = N_CODES) -> None:
    import torch
    import yaml

    cfg = {"ddconfig": IBQ_DDCONFIG, "n_embed": n_codes, "embed_dim": CODE_DIM, "beta": 0.25,
           "use_entropy_loss": False}
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    torch.save({"state_dict": ibq_state_dict(n_codes=n_codes)}, folder / "model.ckpt")


def write(out_dir: Path | str, force: bool = False) -> dict[str, Path]:
    """Write both tiny folders under ``out_dir/emu35/``; return {folder name: path}."""
    from tests.tiny_common import atomic_folder

    root = Path(out_dir) / FOLDER
    return {MODEL: atomic_folder(root / MODEL, write_model, force), IBQ: atomic_folder(root / IBQ, write_ibq, force)}
