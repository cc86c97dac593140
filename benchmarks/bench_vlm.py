"""Qwen-VL decoding benchmark: our enhancer's decode path vs transformers' own ``generate``.

Both run on the SAME module object and the same inputs (greedy), interleaved, so the ratio isolates our
overhead (chat building, per-token progress / Cancel check, generation-config handling). Target: ratio of
tokens/s (ours / transformers) >= 0.95. The token streams are checked to be identical.

CPU (default): a mid-size random Qwen2.5-VL written in the real layout and loaded through our loader.

    python benchmarks/bench_vlm.py [--tokens 64] [--repeats 5] [--hidden 512] [--layers 8]

GPU (--gpu): the Qwen2.5-VL-7B shapes (28 layers x 3584, random weights, nothing written to disk), bf16
resident vs FP8 storage (diffusers layerwise casting, bf16 compute): tokens/s and peak VRAM of each.

    python benchmarks/bench_vlm.py --gpu [--tokens 128]
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PROMPT = "a lighthouse on a cliff at dusk"
# Qwen2.5-VL-7B-Instruct's text and vision shapes (its config.json).
FULL_7B_TEXT = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 128000,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}}
FULL_7B_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
                  "fullatt_block_indexes": [7, 15, 23, 31], "window_size": 112}


def import_pack() -> None:
    spec = importlib.util.spec_from_file_location("gentor", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["gentor"] = module
    spec.loader.exec_module(module)


def write_mid(out: Path, hidden: int, layers: int) -> Path:
    """The tiny Qwen2.5-VL folder (tokenizer, processor, template) with a mid-size random model."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from tests import tiny_vlm

    tiny = tiny_vlm.write_one(out / "tiny", tiny_vlm.QWEN2_5_VL)
    folder = out / "mid-qwen2.5-vl"
    folder.mkdir(parents=True, exist_ok=True)
    for f in tiny.iterdir():
        if not f.name.endswith((".safetensors", ".index.json")) and f.name != "config.json":
            (folder / f.name).write_bytes(f.read_bytes())
    small = Qwen2_5_VLConfig.from_pretrained(tiny)
    text = dict(small.text_config.to_dict(), hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                num_attention_heads=hidden // 64, num_key_value_heads=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]})
    text.pop("layer_types", None)
    vision = dict(small.vision_config.to_dict(), out_hidden_size=hidden)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=small.image_token_id,
                              video_token_id=small.video_token_id, vision_start_token_id=small.vision_start_token_id,
                              vision_end_token_id=small.vision_end_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    with torch.no_grad():
        for name in ("<|im_end|>", "<|endoftext|>"):  # never stop early: every run decodes exactly --tokens
            model.lm_head.weight[tiny_vlm._ids()[name]] = 0.0
    model.save_pretrained(folder)
    return folder


def time_pair(model, processor, device: torch.device, tokens: int, repeats: int) -> dict:
    """Interleaved timings of our decode path and transformers' generate on the same module."""
    from gentor.samplers import vlm as sampler
    from gentor.samplers import vlm_prompts as prompts

    messages = sampler.build_messages(prompts.T2I_SYSTEM_EN, PROMPT, 0)
    gen = sampler.Generation(max_new_tokens=tokens)
    chat = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[chat], return_tensors="pt").to(device)
    config = sampler.generation_config(model, processor.tokenizer, gen)

    def ours() -> list[int]:
        return sampler.decode(model, processor, messages, [], gen, device).tokens

    def theirs() -> list[int]:
        with torch.inference_mode():
            out = model.generate(**inputs, generation_config=config)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    assert ours() == theirs(), "token streams differ"  # also the warm-up
    times: dict[str, list[float]] = {"ours": [], "transformers": []}
    for _ in range(repeats):
        for name, fn in (("ours", ours), ("transformers", theirs)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            n = len(fn())
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(n / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"ours_tps": med["ours"], "ref_tps": med["transformers"], "ratio": med["ours"] / med["transformers"]}


def run_cpu(args: argparse.Namespace) -> None:
    from gentor import glue
    from gentor.loaders import vlm as loader
    from gentor.loaders.memory import Precision

    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_mid(Path(tmp), args.hidden, args.layers)
        glue.set_fallback_roots("vlm", [folder.parent])
        info = loader.inspect_folder(folder)
        model = loader.load_qwen_vl(folder, Precision(torch.float32, torch.float32), None, ())
        processor = loader.load_processor(folder, folder)
        res = time_pair(model, processor, torch.device("cpu"), args.tokens, args.repeats)
    print(f"CPU {info.variant}: {args.tokens} tokens greedy, median of {args.repeats} (interleaved)")
    print(f"  ours {res['ours_tps']:.1f} tok/s, transformers generate {res['ref_tps']:.1f} tok/s, "
          f"ratio {res['ratio']:.3f} (target >= 0.95)")


def run_gpu(args: argparse.Namespace) -> None:
    from diffusers.hooks import apply_layerwise_casting
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from gentor import registry
    from gentor.loaders import vlm as loader

    device = torch.device("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        from tests import tiny_vlm

        processor = loader.load_processor(*(2 * [tiny_vlm.write_one(Path(tmp), tiny_vlm.QWEN2_5_VL)]))
        for storage in ("bf16", "fp8_e4m3fn"):
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            config = Qwen2_5_VLConfig(text_config=FULL_7B_TEXT, vision_config=FULL_7B_VISION, tie_word_embeddings=False)
            with torch.device(device):
                model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
            if storage != "bf16":
                apply_layerwise_casting(model, storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16,
                                        skip_modules_pattern=registry.get("vlm").fp8_skip)
            weights = torch.cuda.memory_allocated()
            res = time_pair(model, processor, device, args.tokens, args.repeats)
            print(f"GPU Qwen2.5-VL-7B shapes, {storage}: weights {weights / 2**30:.2f} GiB, peak "
                  f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, ours {res['ours_tps']:.1f} tok/s, "
                  f"transformers {res['ref_tps']:.1f} tok/s, ratio {res['ratio']:.3f}")
            del model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()
    import_pack()
    run_gpu(args) if args.gpu else run_cpu(args)


if __name__ == "__main__":
    main()
