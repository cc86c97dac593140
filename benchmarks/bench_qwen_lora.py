"""Qwen-Image LoRA and VAE-tiling benchmarks (CPU by default; --device cuda on a GPU).

1. LoRA overhead per transformer step vs the base (random mid-size transformer, rank-r LoRA on every block
   Linear): unfused (PEFT layers active, what Gentor runs: the shared base stays untouched and FP8-stored
   bases keep their precision) and fused (PEFT's merge into the weights, then unmerged).
2. Switching a LoRA on/off between runs through the real sampler (tiny kit): components read from disk and
   bytes read by the process (``/proc/self/io`` rchar) for the runs after the first; and the FP8 error: the
   image of an FP8-stored base (+ LoRA, factors in fp32) vs the fp32 base (+ LoRA), relative L2.
3. VAE decode peak memory, whole vs tiled, at --vae-size (default 2048) with a random AutoencoderKLQwenImage
   (--vae-base-dim 96 = the real width); each decode in a fresh subprocess, peak RSS (CPU) or peak CUDA memory.

    python benchmarks/bench_qwen_lora.py [--layers 6] [--rank 32] [--size 256] [--repeats 3]
                                         [--vae-size 2048] [--vae-base-dim 96] [--skip-vae]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MID = dict(patch_size=2, in_channels=64, out_channels=16, attention_head_dim=128, num_attention_heads=6,
           joint_attention_dim=512, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
TEXT_TOKENS = 64
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]
KIB = 1024


def import_pack():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gentor", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["gentor"] = module
    spec.loader.exec_module(module)


def time_forward(model, inputs, repeats: int, device: str) -> float:
    with torch.no_grad():
        model(**inputs)  # warm-up
        times = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(**inputs)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_overhead(args) -> dict:
    from diffusers import QwenImageTransformer2DModel
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(num_layers=args.layers, **MID).to(args.device, dtype).eval()
    side = args.size // 16
    gen = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, side * side, 64, generator=gen).to(args.device, dtype),
                  encoder_hidden_states=torch.randn(1, TEXT_TOKENS, MID["joint_attention_dim"], generator=gen).to(
                      args.device, dtype),
                  encoder_hidden_states_mask=torch.ones(1, TEXT_TOKENS, dtype=torch.long, device=args.device),
                  timestep=torch.tensor([0.5], device=args.device, dtype=dtype), img_shapes=[[(1, side, side)]],
                  return_dict=False)
    base = time_forward(model, inputs, args.repeats, args.device)
    inject_adapter_in_model(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=LORA_TARGETS,
                                       init_lora_weights="gaussian"), model, adapter_name="bench")
    model.to(args.device, dtype)
    unfused = time_forward(model, inputs, args.repeats, args.device)
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.merge(adapter_names=["bench"])
    fused = time_forward(model, inputs, args.repeats, args.device)
    for layer in layers:
        layer.unmerge()
    return {"tokens": side * side + TEXT_TOKENS, "layers": args.layers, "rank": args.rank, "base_s": base,
            "unfused_s": unfused, "fused_s": fused, "unfused_ratio": unfused / base, "fused_ratio": fused / base}


def rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def bench_switching() -> dict:
    import_pack()
    from gentor import glue
    from gentor.loaders import lora
    from gentor.loaders import qwen_image as loader
    from gentor.loaders.cache import CACHE
    from gentor.loaders.memory import MemoryOptions
    from gentor.samplers import qwen_image as sampler
    from gentor.samplers.common import Request
    from tests import tiny_models, tiny_qwen_lora

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tiny_models.write_qwen_image(tmp, [tiny_models.QWEN_IMAGE_T2I])
        loras = tiny_qwen_lora.write(tmp)
        glue.set_fallback_roots("qwen_image", [Path(tmp) / "qwen_image"])
        glue.set_fallback_roots("loras", [Path(tmp) / "loras"])
        name = tiny_qwen_lora.file_name("kohya")
        base = loader.load_handle(tiny_models.QWEN_IMAGE_T2I, None)
        styled = lora.with_lora(base, name, 1.0)
        req = Request(prompt="a red fox", steps=2, width=32, height=32)
        sampler.run(base, "t2i", req)
        sampler.run(styled, "t2i", req)  # first LoRA use: reads the LoRA file once
        reads, chars = CACHE.disk_reads, rchar()
        for handle in (base, styled, base, styled):
            sampler.run(handle, "t2i", req)
        reads_after, chars_after = CACHE.disk_reads, rchar()
        errors = {}
        for label, handle in (("base", base), ("with_lora", styled)):
            images = {}
            for weight_dtype in ("auto", "fp8_e4m3fn"):
                mem = MemoryOptions(weight_dtype=weight_dtype, compute_dtype="fp32")
                h = dataclasses.replace(handle, memory=mem)
                images[weight_dtype] = sampler.run(h, "t2i", req).image
            errors[label] = float((images["fp8_e4m3fn"] - images["auto"]).norm() / images["auto"].norm())
        out = {"fp8_vs_fp32_relative_error": errors,
               "component_reads_during_4_switches": reads_after - reads,
               "bytes_read_during_4_switches": chars_after - chars,
               "base_transformer_bytes": sum(f.stat().st_size for f in (
                   Path(tmp) / "qwen_image" / tiny_models.QWEN_IMAGE_T2I / "transformer").glob("*.safetensors")),
               "lora_file_bytes": loras[name].stat().st_size}
    return out


VAE_CHILD = r"""
import json, resource, sys, torch
from diffusers import AutoencoderKLQwenImage
size, base, tiled, device = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
torch.manual_seed(0)
vae = AutoencoderKLQwenImage(base_dim=base, z_dim=16).eval().to(device)
if tiled:
    vae.enable_tiling(); vae.enable_slicing()
z = torch.randn(1, 16, 1, size // 8, size // 8, device=device)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
import time
t0 = time.perf_counter()
with torch.no_grad():
    out = vae.decode(z).sample
secs = time.perf_counter() - t0
peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_bytes": peak, "rss_before_bytes": before * 1024, "seconds": secs, "shape": list(out.shape)}))
"""


def bench_vae(args) -> dict:
    out = {}
    for tiled in (False, True):
        proc = subprocess.run([sys.executable, "-c", VAE_CHILD, str(args.vae_size), str(args.vae_base_dim),
                               "1" if tiled else "0", args.device], capture_output=True, text=True)
        if proc.returncode != 0:
            out["tiled" if tiled else "whole"] = {"error": proc.stderr.strip().splitlines()[-1:]}
            continue
        out["tiled" if tiled else "whole"] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vae-size", type=int, default=2048)
    p.add_argument("--vae-base-dim", type=int, default=96)
    p.add_argument("--skip-vae", action="store_true")
    args = p.parse_args()
    results = {"device": args.device, "lora_overhead": bench_overhead(args), "switching": bench_switching()}
    if not args.skip_vae:
        results["vae_decode"] = bench_vae(args)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
