"""Qwen-Image engines side by side: our diffusers engine vs the DiffSynth engine, one process, same weights.

Both engines run through the real sampler (``samplers/qwen_image.py``) on the same cached weights (one copy),
same prompt, seed, size, steps and true-CFG 4 (both run the negative branch as a second pass), interleaved
(ours, DiffSynth, ours, ...) so machine noise hits both alike. Modes: bf16 (fp32 with ``--fp32``), FP8 storage
(e4m3 + bf16 compute), FP8 + offload (block on ours; DiffSynth's layer-level vram_limit). Prints seconds per
denoising step (median over the repeats of the time between the first and the last step's progress tick, so
text encoding and the VAE are left out; the whole-run ratio is printed too), the ratio ours / DiffSynth (target
<= 1.0) and the peak memory a run adds above the loaded weights, each engine in a fresh process: device
memory on a GPU (``max_memory_allocated``); on a CPU process RSS (sampled every 2 ms; allocator caching makes it
noisy) and the peak of live torch allocations (the profiler's allocation events: the CPU analogue of
``max_memory_allocated``).

    python benchmarks/bench_qwen_image_engines.py [--layers 6] [--heads 6] [--size 256] [--steps 4]

On a GPU the same script runs at full size with random weights (written to a temporary folder first):

    python benchmarks/bench_qwen_image_engines.py --layers 60 --heads 24 --size 1328 --steps 10

``--model 2.1``: the same for Qwen-Image 2.1 (mid-size random 2.1 transformer; its folder's scheduler set to
DiffSynth's schedule so both engines sample on the same sigmas).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import statistics
import subprocess
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_qwen_image as base  # noqa: E402

MODES = {  # name -> MemoryOptions kwargs
    "bf16": dict(weight_dtype="bf16", compute_dtype="bf16"),
    "fp8": dict(weight_dtype="fp8_e4m3fn", compute_dtype="bf16"),
    "fp8+offload": dict(weight_dtype="fp8_e4m3fn", compute_dtype="bf16", offload="block"),
}
PROMPT = "a lighthouse on a cliff at dusk, cinematic"
WARM_SIZE = 32
MODELS = {"1": "mid-qwen-image", "2.1": "mid-qwen-image-2.1"}
SAMPLE_S = 0.002


def peak_child(root: Path, mode: str, engine: str, args: argparse.Namespace) -> tuple[float, float]:
    """Peak memory one run (2 steps) of one engine adds above the loaded weights, in a fresh process, in MiB:
    (device memory ``max_memory_allocated``, nan) on a GPU; (process RSS sampled every 2 ms, live torch
    allocations counted by the profiler) on a CPU."""
    cmd = [sys.executable, __file__, "--child", str(root), "--modes", mode, "--engine", engine,
           "--size", str(args.size), "--model", args.model] + (["--fp32"] if args.fp32 else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()
    allocated = next((float(line.split()[1]) for line in out if line.startswith("allocated ")), float("nan"))
    return float(out[-1]), allocated


def child(args: argparse.Namespace) -> None:
    base.import_pack()
    import psutil

    from gentor import glue
    from gentor.loaders import qwen_image as loader
    from gentor.loaders.memory import MemoryOptions
    from gentor.samplers import qwen_image as sampler
    from gentor.samplers.common import Request

    glue.set_fallback_roots("qwen_image", [Path(args.child)])
    handle = loader.load_handle(MODELS[args.model], MemoryOptions(**options(args.modes, args.fp32)), args.engine)

    def run(size: int) -> None:
        sampler.run(handle, "t2i", Request(PROMPT, seed=5, steps=2, width=size, height=size, cfg=4.0,
                                           settings=sampler.make_settings(preview_every=0)))
    run(WARM_SIZE)  # loads the weights with small activations
    if glue.torch_device().type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        run(args.size)
        print((torch.cuda.max_memory_allocated() - start) / 2**20)
        return
    proc, peak, stop = psutil.Process(), [0], threading.Event()
    start = proc.memory_info().rss

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss - start)
            time.sleep(SAMPLE_S)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    run(args.size)
    stop.set()
    thread.join()
    print(f"allocated {peak_allocated(lambda: run(args.size)) / 2**20}")  # after: RSS growth is of a first run
    print(peak[0] / 2**20)


def peak_allocated(fn) -> int:
    """Peak bytes of live torch CPU allocations above the start while ``fn`` runs (the CPU analogue of
    ``max_memory_allocated``), from the profiler's allocation events in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def options(mode: str, fp32: bool) -> dict:
    out = dict(MODES[mode])
    if mode == "bf16" and fp32:
        out.update(weight_dtype="fp32", compute_dtype="fp32")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=6, help="transformer width = heads x 128 (24 = full size)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--fp32", action="store_true", help="fp32 instead of bf16 in the first mode")
    parser.add_argument("--model", choices=list(MODELS), default="1", help="Qwen-Image 1.x or 2.1")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    base.import_pack()
    from gentor import glue
    from gentor.loaders import qwen_image as loader
    from gentor.loaders.cache import CACHE
    from gentor.loaders.memory import MemoryOptions
    from gentor.samplers import qwen_image as sampler
    from gentor.samplers.common import Request

    base.MID_HEADS = args.heads
    tmp = Path(tempfile.mkdtemp(prefix="gentor-engines-"))
    build = base.mid_models21 if args.model == "2.1" else base.mid_models
    root = build(tmp, args.layers, torch.float32)
    glue.set_fallback_roots("qwen_image", [root])
    device = glue.torch_device()
    req = Request(PROMPT, seed=5, steps=args.steps, width=args.size,
                  height=args.size, cfg=4.0, settings=sampler.make_settings(preview_every=0))
    import diffsynth  # noqa: F401  (fail early, with the import error, when it is missing)
    from gentor.loaders.qwen_image_diffsynth import installed_version

    print(f"device {device}, Qwen-Image {args.model}, transformer {args.layers} layers x {args.heads * 128}, "
          f"{args.size}px, {args.steps} steps, true-CFG 4, diffsynth {installed_version()}, "
          f"torch threads {torch.get_num_threads()}")
    try:
        for mode in args.modes.split(","):
            handles = {e: loader.load_handle(MODELS[args.model], MemoryOptions(**options(mode, args.fp32)), e)
                       for e in ("diffusers", "diffsynth")}

            step_s: dict[str, list[float]] = {e: [] for e in handles}
            total_s: dict[str, list[float]] = {e: [] for e in handles}
            images: dict[str, torch.Tensor] = {}

            def run(engine: str, record: bool = True) -> None:
                ticks: list[float] = []
                t = time.perf_counter()
                images[engine] = sampler.run(handles[engine], "t2i", req,
                                             listener=lambda *_: ticks.append(time.perf_counter())).image
                if record:  # denoising only: from the end of step 1 to the end of the last step
                    total_s[engine].append(time.perf_counter() - t)
                    step_s[engine].append((ticks[-1] - ticks[0]) / (len(ticks) - 1))
            run("diffusers", record=False)  # load the weights once (shared by both engines)
            run("diffsynth", record=False)
            for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
                run("diffusers")
                run("diffsynth")
            ours, theirs = (statistics.median(step_s[e]) for e in ("diffusers", "diffsynth"))
            whole = {e: statistics.median(total_s[e]) for e in handles}
            diff = float((images["diffusers"] - images["diffsynth"]).norm() / images["diffsynth"].norm())
            CACHE.unload()
            peaks = {e: peak_child(root, mode, e, args) for e in handles}
            (ours_rss, ours_alloc), (their_rss, their_alloc) = peaks["diffusers"], peaks["diffsynth"]
            cpu = "" if ours_alloc != ours_alloc else (  # nan on a GPU: max_memory_allocated is the figure there
                f"  (CPU live torch allocations: ours {ours_alloc:8.1f} MiB  DiffSynth {their_alloc:8.1f} MiB)")
            print(f"{mode:12s} ours {ours:7.3f} s/step  DiffSynth {theirs:7.3f} s/step  ratio {ours / theirs:5.3f}  "
                  f"(whole run ratio {whole['diffusers'] / whole['diffsynth']:5.3f})  peak ours "
                  f"{ours_rss:8.1f} MiB  DiffSynth {their_rss:8.1f} MiB{cpu}  images rel diff {diff:.1e}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
