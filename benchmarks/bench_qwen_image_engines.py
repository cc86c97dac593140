"""Qwen-Image engines side by side: our diffusers engine vs the DiffSynth engine, one process, same weights.

Both engines run through the real sampler (``samplers/qwen_image.py``) on the same cached weights (one copy),
same prompt, seed, size, steps and true-CFG 4 (both run the negative branch as a second pass), interleaved
(ours, DiffSynth, ours, ...) so machine noise hits both alike. Modes: bf16 (fp32 with ``--fp32``), FP8 storage
(e4m3 + bf16 compute), FP8 + offload (block on ours; DiffSynth's layer-level vram_limit). Prints seconds per
step (median of the whole run / steps, text encoding and VAE included), the ratio ours / DiffSynth (target
<= 1.0) and the peak memory above the pre-run level: device memory on a GPU (``max_memory_allocated``), the
process RSS on a CPU (sampled every 5 ms; the weights are resident before the run, so this is activations).

    python benchmarks/bench_qwen_image_engines.py [--layers 6] [--heads 6] [--size 256] [--steps 4]

On a GPU the same script runs at full size with random weights (written to a temporary folder first):

    python benchmarks/bench_qwen_image_engines.py --layers 60 --heads 24 --size 1328 --steps 10
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
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
SAMPLE_S = 0.005


class Peak:
    """Peak memory above the level at entry: CUDA allocator on a GPU, process RSS (sampled) on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> "Peak":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return self
        import psutil

        self.proc = psutil.Process()
        self.start = self.proc.memory_info().rss
        self.stop = threading.Event()

        def sample() -> None:
            while not self.stop.is_set():
                self.peak = max(self.peak, self.proc.memory_info().rss - self.start)
                time.sleep(SAMPLE_S)
        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.stop.set()
            self.thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=6, help="transformer width = heads x 128 (24 = full size)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--fp32", action="store_true", help="fp32 instead of bf16 in the first mode")
    args = parser.parse_args()

    base.import_pack()
    from gentor import glue
    from gentor.loaders import qwen_image as loader
    from gentor.loaders.cache import CACHE
    from gentor.loaders.memory import MemoryOptions
    from gentor.samplers import qwen_image as sampler
    from gentor.samplers.common import Request

    base.MID_HEADS = args.heads
    tmp = Path(tempfile.mkdtemp(prefix="gentor-engines-"))
    root = base.mid_models(tmp, args.layers, torch.float32)
    glue.set_fallback_roots("qwen_image", [root])
    device = glue.torch_device()
    req = Request("a lighthouse on a cliff at dusk, cinematic", seed=5, steps=args.steps, width=args.size,
                  height=args.size, cfg=4.0, settings=sampler.make_settings(preview_every=0))
    import diffsynth  # noqa: F401  (fail early, with the import error, when it is missing)
    from gentor.loaders.qwen_image_diffsynth import installed_version

    print(f"device {device}, transformer {args.layers} layers x {args.heads * 128}, {args.size}px, {args.steps} "
          f"steps, true-CFG 4, diffsynth {installed_version()}, torch threads {torch.get_num_threads()}")
    try:
        for mode in args.modes.split(","):
            options = dict(MODES[mode])
            if mode == "bf16" and args.fp32:
                options.update(weight_dtype="fp32", compute_dtype="fp32")
            handles = {e: loader.load_handle("mid-qwen-image", MemoryOptions(**options), e)
                       for e in ("diffusers", "diffsynth")}
            peaks = {e: 0 for e in handles}

            def runner(engine: str):
                def run() -> torch.Tensor:
                    with Peak(device) as peak:
                        image = sampler.run(handles[engine], "t2i", req).image
                    peaks[engine] = max(peaks[engine], peak.peak)
                    return image
                return run
            runner("diffusers")()  # load the weights once (shared by both engines)
            runner("diffsynth")()
            peaks = {e: 0 for e in handles}
            t_ours, t_ds, ours, theirs = base.timed_pair(runner("diffusers"), runner("diffsynth"), args.repeats)
            diff = float((ours - theirs).norm() / theirs.norm())
            print(f"{mode:12s} ours {t_ours / args.steps:7.3f} s/step  DiffSynth {t_ds / args.steps:7.3f} s/step  "
                  f"ratio {t_ours / t_ds:5.3f}  peak ours {peaks['diffusers'] / 2**20:8.1f} MiB  DiffSynth "
                  f"{peaks['diffsynth'] / 2**20:8.1f} MiB  images rel diff {diff:.1e}")
            CACHE.unload()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
