"""GPU check: Gentor's weights inside ComfyUI's memory manager (needs CUDA and a ComfyUI checkout).

Runs the real Qwen-Image sampler with ComfyUI's model_management imported (as inside ComfyUI) on a
mid-size random model and checks, printing PASS/FAIL per line:
- offload none: weights on the GPU and registered with ComfyUI;
- a core-style model that needs the VRAM makes ComfyUI evict ours; the next run brings them back;
- ``unload_all_models`` (what /free does) moves ours off the GPU;
- Cancel during a model-offload run leaves no weights on the GPU;
- peak VRAM of bf16 / FP8 / FP8 + block offload for one run.

    COMFYUI_DIR=/path/to/ComfyUI python benchmarks/gpu_comfy_memory.py [--layers 12] [--heads 12]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_qwen_image import import_pack, mid_models  # noqa: E402

GIB = 2**30
results: list[bool] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    results.append(bool(ok))
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    sys.path.insert(0, os.environ["COMFYUI_DIR"])
    import comfy.model_management as mm
    import comfy.model_patcher
    import folder_paths

    import bench_qwen_image
    bench_qwen_image.MID_HEADS = args.heads
    import_pack()
    from gentor import glue
    from gentor.loaders import qwen_image as loader
    from gentor.loaders.cache import CACHE
    from gentor.loaders.memory import MemoryOptions
    from gentor.samplers import qwen_image as sampler
    from gentor.samplers.common import Request

    dev = mm.get_torch_device()
    print("device", dev, torch.cuda.get_device_name(), "ComfyUI memory manager:", glue.in_comfyui(), flush=True)
    root = mid_models(Path(tempfile.mkdtemp()), args.layers)
    folder_paths.add_model_folder_path("qwen_image", str(root))
    settings = sampler.make_settings(preview_every=0)

    def run(memory: MemoryOptions, listener=None):
        handle = loader.load_handle("mid-qwen-image", memory)
        return sampler.run(handle, "t2i", Request("a castle", seed=1, steps=4, width=args.size, height=args.size,
                                                  settings=settings), listener=listener)

    def transformer():
        return CACHE.entries("qwen_image_transformer")[0]

    bf16 = MemoryOptions(weight_dtype="bf16")
    run(bf16)
    entry = transformer()
    weight_dev = next(entry.value.parameters()).device
    ours = [m for m in mm.current_loaded_models if m.model is entry.patcher]
    check("resident weights on the GPU and registered with ComfyUI", weight_dev.type == "cuda" and len(ours) == 1,
          f"(transformer on {weight_dev}, {entry.nbytes / GIB:.2f} GiB)")

    # A core-style model that needs nearly all free VRAM: ComfyUI must evict ours to load it.
    free = mm.get_free_memory(dev)
    numel = int((free - entry.nbytes / 2) // 2)
    big = comfy.model_patcher.ModelPatcher(torch.nn.Linear(1, 1), load_device=dev, offload_device=torch.device("cpu"))
    big.model.weight = torch.nn.Parameter(torch.empty(numel, dtype=torch.bfloat16), requires_grad=False)
    big.size = numel * 2
    mm.load_models_gpu([big], force_full_load=True)
    weight_dev = next(transformer().value.parameters()).device
    check("ComfyUI evicts our weights for a core model", weight_dev.type == "cpu" and transformer().placement == "cpu",
          f"(transformer now on {weight_dev}, placement {transformer().placement})")
    run(bf16)
    weight_dev = next(transformer().value.parameters()).device
    check("next run puts ours back on the GPU", weight_dev.type == "cuda", f"({weight_dev})")
    del big
    mm.unload_all_models()
    weight_dev = next(transformer().value.parameters()).device
    check("unload_all_models (/free) moves ours off the GPU", weight_dev.type == "cpu", f"({weight_dev})")

    base = torch.cuda.memory_allocated()

    def cancel(value, total, preview):
        if value == 1:
            mm.interrupt_current_processing(True)

    try:
        run(MemoryOptions(weight_dtype="bf16", offload="model"), listener=cancel)
        check("cancel raises", False)
    except mm.InterruptProcessingException:
        mm.interrupt_current_processing(False)
        left = (torch.cuda.memory_allocated() - base) / GIB
        check("cancel during model offload leaves no weights on the GPU", left < 0.05, f"({left:.3f} GiB left)")

    for name, memory in (("bf16 resident", bf16),
                         ("fp8 storage", MemoryOptions(weight_dtype="fp8_e4m3fn", compute_dtype="bf16")),
                         ("fp8 + block offload", MemoryOptions(weight_dtype="fp8_e4m3fn", compute_dtype="bf16",
                                                               offload="block")),
                         ("bf16 + model offload", MemoryOptions(weight_dtype="bf16", offload="model"))):
        mm.unload_all_models()
        CACHE.unload()
        run(memory)  # load + place
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        import time
        t = time.perf_counter()
        out = run(memory)
        torch.cuda.synchronize()
        print(f"{name:22s} peak VRAM {torch.cuda.max_memory_allocated() / GIB:6.2f} GiB, "
              f"{time.perf_counter() - t:6.2f} s per 4-step run, finite={bool(torch.isfinite(out.image).all())}",
              flush=True)
    print(f"{sum(results)} passed, {len(results) - sum(results)} failed")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
