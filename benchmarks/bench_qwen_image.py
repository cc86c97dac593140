"""Qwen-Image benchmarks: our sampler vs diffusers' own pipeline, FP8 bytes, GPU memory/speed.

CPU (default): a mid-size random transformer (hundreds of MB) in the real pipeline layout; our T2I and
Edit-Plus samplers vs diffusers' pipelines on the same weights and seed, previews off. Prints the time
ratio (target <= 1.05) and checks the outputs are identical.

    python benchmarks/bench_qwen_image.py [--repeats 3] [--layers 6] [--size 256]

GPU (--gpu): the full-size transformer (60 layers, 3072 wide, random bf16 weights) at 1328x1328; seconds
per step (two CFG passes) and peak VRAM for bf16 resident, FP8 storage, FP8 + block offload.

    python benchmarks/bench_qwen_image.py --gpu [--layers 60] [--size 1328]
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FULL_CONFIG = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                   axes_dims_rope=(16, 56, 56))
MID_HEADS = 6  # 6 x 128 = 768 wide


def import_pack():
    spec = importlib.util.spec_from_file_location("gentor", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["gentor"] = module
    spec.loader.exec_module(module)


def mid_models(out: Path, layers: int, dtype: torch.dtype = torch.float32) -> Path:
    """Tiny pipelines whose transformer is replaced by a mid-size random one."""
    from diffusers import QwenImageTransformer2DModel
    from tests import tiny_models

    tiny = tiny_models.write_qwen_image(out / "tiny")
    root = out / "qwen_image"
    for name in ("tiny-qwen-image", "tiny-qwen-image-edit-2511"):
        dst = root / name.replace("tiny", "mid")
        shutil.copytree(tiny[name], dst)
        cfg = dict(FULL_CONFIG, num_layers=layers, num_attention_heads=MID_HEADS, joint_attention_dim=64,
                   zero_cond_t="2511" in name)
        torch.manual_seed(0)
        shutil.rmtree(dst / "transformer")
        QwenImageTransformer2DModel(**cfg).to(dtype).save_pretrained(dst / "transformer")
    return root


def mid_models21(out: Path, layers: int, dtype: torch.dtype = torch.float32) -> Path:
    """The tiny Qwen-Image 2.1 pipeline whose transformer is replaced by a mid-size random one
    (``MID_HEADS`` x 128 wide, the kit's text width); its scheduler is DiffSynth's Qwen-Image schedule, so both
    engines sample on the same sigmas."""
    import json

    from diffusers import QwenImage21Transformer2DModel
    from gentor.samplers.qwen_image_diffsynth import DIFFSYNTH_SCHEDULE
    from tests import tiny_models, tiny_qwen21

    tiny = tiny_models.write_qwen_image(out / "tiny")
    root = out / "qwen_image"
    dst = root / "mid-qwen-image-2.1"
    shutil.copytree(tiny[tiny_models.QWEN_IMAGE_21], dst)
    cfg = dict(tiny_qwen21.TRANSFORMER_CONFIG, num_layers=layers, num_attention_heads=MID_HEADS,
               attention_head_dim=128, axes_dims_rope=FULL_CONFIG["axes_dims_rope"])
    torch.manual_seed(0)
    shutil.rmtree(dst / "transformer")
    QwenImage21Transformer2DModel(**cfg).to(dtype).save_pretrained(dst / "transformer")
    sched = dst / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps(dict(json.loads(sched.read_text()), **DIFFSYNTH_SCHEDULE)))
    return root


def timed_pair(ours, ref, repeats: int) -> tuple[float, float, object, object]:
    """Median seconds of both, interleaved (ours, ref, ours, ...) so machine noise hits both alike."""
    t_ours, t_ref, out_ours, out_ref = [], [], None, None
    for _ in range(repeats):
        for fn, times in ((ours, t_ours), (ref, t_ref)):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
            if fn is ours:
                out_ours = out
            else:
                out_ref = out
    return statistics.median(t_ours), statistics.median(t_ref), out_ours, out_ref


def bench_cpu(args) -> None:
    import diffusers
    from PIL import Image

    import_pack()
    from gentor import glue
    from gentor.loaders import qwen_image as loader
    from gentor.loaders.cache import CACHE
    from gentor.loaders.memory import MemoryOptions
    from gentor.samplers import qwen_image as sampler
    from gentor.samplers.common import Request

    global MID_HEADS
    MID_HEADS = args.heads
    tmp = Path(tempfile.mkdtemp(prefix="gentor-bench-"))
    root = mid_models(tmp, args.layers, getattr(torch, args.dtype))
    weight_dtype = {"float32": "fp32", "bfloat16": "bf16"}[args.dtype]
    glue.set_fallback_roots("qwen_image", [root])
    no_preview = sampler.make_settings(preview_every=0)
    prompt, steps, size = "a lighthouse on a cliff at dusk, cinematic", args.steps, args.size
    images = [Image.new("RGB", (64, 48), (200, 40, 40)), Image.new("RGB", (48, 64), (40, 40, 200))]
    cases = [("t2i", "mid-qwen-image", diffusers.QwenImagePipeline, {}),
             ("edit", "mid-qwen-image-edit-2511", diffusers.QwenImageEditPlusPipeline, {"image": images})]
    for task, name, cls, extra in cases:
        if task not in args.tasks.split(","):
            continue
        handle = loader.load_handle(name, MemoryOptions(weight_dtype=weight_dtype))
        req = Request(prompt, seed=5, steps=steps, width=size, height=size, settings=no_preview,
                      images=images if task == "edit" else [])
        ours_fn = lambda: sampler.run(handle, task, req).image  # noqa: E731
        ours_fn()  # warm the cache (load once) like a second queue run
        pipe = cls(**{k: e.value for k, e in _entries(CACHE, root / name).items()})
        pipe.set_progress_bar_config(disable=True)
        ref_fn = lambda: pipe(prompt=prompt, negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=steps,  # noqa: E731
                              width=size, height=size, max_sequence_length=512, output_type="pt",
                              generator=torch.Generator("cpu").manual_seed(5), **extra).images
        t_ours, t_ref, ours, ref = timed_pair(ours_fn, ref_fn, args.repeats)
        same = torch.equal(ours, ref.permute(0, 2, 3, 1).float().cpu())
        params = sum(p.numel() for p in pipe.transformer.parameters())
        print(f"{task} on {glue.torch_device()}: transformer {params / 1e6:.0f}M params ({args.dtype}), {size}px, "
              f"{steps} steps: ours {t_ours:.2f}s, diffusers {t_ref:.2f}s, ratio {t_ours / t_ref:.3f}, "
              f"identical={same}")
    CACHE.unload()
    if args.tasks == "t2i,edit" or "bytes" in args.tasks:
        _fp8_bytes(loader, sampler, CACHE, root, prompt, no_preview)
    shutil.rmtree(tmp)


def _fp8_bytes(loader, sampler, CACHE, root, prompt, no_preview) -> None:
    from gentor.loaders.memory import MemoryOptions, stored_dtypes
    from gentor.samplers.common import Request

    fp8 = {}
    for dtype in ("bf16", "fp8_e4m3fn"):
        CACHE.unload()
        sampler.run(loader.load_handle("mid-qwen-image", MemoryOptions(weight_dtype=dtype, compute_dtype="bf16")),
                    "t2i", Request(prompt, seed=1, steps=2, width=64, height=64, settings=no_preview))
        fp8[dtype] = sum(stored_dtypes(_entries(CACHE, root / "mid-qwen-image")["transformer"].value).values())
    print(f"transformer bytes: bf16 {fp8['bf16'] / 1e6:.1f} MB, fp8 {fp8['fp8_e4m3fn'] / 1e6:.1f} MB, "
          f"ratio {fp8['fp8_e4m3fn'] / fp8['bf16']:.3f}")


def _entries(cache, path: Path) -> dict:
    # Most recently used copy per component (several precisions may be cached).
    return {Path(e.source).name: e for e in reversed(cache.entries()) if Path(e.source).parent == path}


def bench_gpu(args) -> None:
    from diffusers import QwenImageTransformer2DModel

    import_pack()
    from gentor.loaders.memory import Precision, apply_storage, module_bytes
    from gentor.loaders.placement import apply_block_offload
    from gentor.registry import COMMON_FP8_SKIP

    dev = torch.device("cuda")
    tokens = (args.size // 16) ** 2
    text = 128
    cfg = dict(FULL_CONFIG, num_layers=args.layers)

    def build():
        with torch.device("meta"):
            model = QwenImageTransformer2DModel(**cfg)
        model = model.to(torch.bfloat16).to_empty(device="cpu")
        # RoPE tables are plain attributes (not buffers): to_empty leaves them on meta, so rebuild them on the CPU.
        model.pos_embed = type(model.pos_embed)(theta=10000, axes_dim=list(cfg["axes_dims_rope"]), scale_rope=True)
        for p in model.parameters():  # CPU normal_ on bf16 is serial (minutes at 20B params): fill on the GPU
            p.data.copy_(torch.empty_like(p, device=dev).normal_(0, 0.02))
        return model.eval().requires_grad_(False)

    def inputs():
        g = torch.Generator("cpu").manual_seed(0)
        hs = torch.randn(1, tokens, 64, generator=g).to(dev, torch.bfloat16)
        enc = torch.randn(1, text, 3584, generator=g).to(dev, torch.bfloat16)
        return dict(hidden_states=hs, encoder_hidden_states=enc,
                    encoder_hidden_states_mask=torch.ones(1, text, device=dev, dtype=torch.bool),
                    timestep=torch.tensor([0.5], device=dev, dtype=torch.bfloat16),
                    img_shapes=[[(1, args.size // 16, args.size // 16)]], return_dict=False)

    print(f"full-size transformer: {args.layers} layers, {args.size}^2 ({tokens} image tokens + {text} text)")
    for mode in ("bf16", "fp8", "fp8+block"):
        model = build()
        if mode.startswith("fp8"):
            apply_storage(model, Precision(torch.float8_e4m3fn, torch.bfloat16), COMMON_FP8_SKIP)
        weights = module_bytes(model)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        if mode.endswith("block"):
            apply_block_offload(model, ("transformer_blocks",), dev)
        else:
            model.to(dev)
        kw = inputs()
        with torch.inference_mode():
            for _ in range(2):  # warm-up = one step (cond + uncond)
                model(**kw)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(2 * args.steps):
                model(**kw)
            torch.cuda.synchronize()
        per_step = (time.perf_counter() - t) / args.steps
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        print(f"{mode:10s} weights {weights / 1e9:6.1f} GB  peak VRAM {peak:6.1f} GiB"
              f"  {per_step:6.2f} s/step (2 passes)")
        del model, kw
        gc.collect()  # hooks make reference cycles: free the model before the next mode is measured
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tasks", default="t2i,edit", help="ratio mode: t2i, edit, bytes (comma-separated)")
    parser.add_argument("--heads", type=int, default=MID_HEADS, help="ratio mode: width = heads x 128")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="ratio mode: weight dtype (bfloat16 on a GPU)")
    args = parser.parse_args()
    if args.gpu:
        args.layers, args.size = args.layers or 60, args.size or 1328
        bench_gpu(args)
    else:
        args.layers, args.size = args.layers or 6, args.size or 256
        bench_cpu(args)


if __name__ == "__main__":
    main()
