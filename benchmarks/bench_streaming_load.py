"""Streaming-load benchmark: host RAM while loading a mid-size model into FP8 (issue 6, item 2).

Writes a random Qwen-Image transformer (default 32 layers x 768 wide, ~1.36 GB bf16) in 100 MB shards
to a temporary folder, then loads it in a FRESH subprocess per run and reports the peak RSS above the
child's baseline (the kernel's high-water mark VmHWM, reset at the baseline, and a sampling thread) and
the RSS after the load, against the resting bytes of the loaded model, the on-disk bytes and the
largest shard:

- ``from_pretrained``: diffusers' from_pretrained in bf16, then FP8 layerwise casting (the old path);
- ``streaming``: ``loaders.streaming.load_diffusers`` straight into FP8 storage / bf16 compute;
- ``streaming-bf16``: the same loader with bf16 storage (no FP8), for comparison.

Target for ``streaming``: peak <= resting + largest shard, after <= 1.1 x resting.

    python benchmarks/bench_streaming_load.py [--layers 32] [--heads 6] [--shard-mb 100] [--single-file]
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MB = 1024**2
SAMPLE_SECONDS = 0.002
MODES = ("from_pretrained", "streaming", "streaming-bf16")
TARGET_AFTER = 1.1
# Real Qwen-Image widths except the number of heads/layers (backend_specs.md §4.2).
BASE_CONFIG = dict(patch_size=2, in_channels=64, out_channels=16, attention_head_dim=128,
                   joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
INIT_STD = 0.02


def import_pack() -> None:
    spec = importlib.util.spec_from_file_location("gentor", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["gentor"] = module
    spec.loader.exec_module(module)


# ----------------------------------------------------------------------------- writing the model
def write_model(out: Path, layers: int, heads: int, shard_mb: int, single: bool) -> None:
    """Random bf16 weights in diffusers' sharded layout, generated one shard at a time (low RAM)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel
    from safetensors.torch import save_file

    config = dict(BASE_CONFIG, num_layers=layers, num_attention_heads=heads)
    with init_empty_weights():
        skeleton = QwenImageTransformer2DModel(**config)
    skeleton.save_config(out)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    groups: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        if groups[-1] and size + nbytes > shard_mb * MB and not single:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, keys in enumerate(groups, 1):
        name = ("diffusion_pytorch_model.safetensors" if single
                else f"diffusion_pytorch_model-{i:05d}-of-{len(groups):05d}.safetensors")
        tensors = {k: (torch.randn(shapes[k], generator=gen) * INIT_STD).to(torch.bfloat16) for k in keys}
        save_file(tensors, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
        del tensors
    if not single:
        total = sum(2 * torch.Size(s).numel() for s in shapes.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# ----------------------------------------------------------------------------- measuring (child process)
def reset_high_water() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM). ru_maxrss cannot be used: after fork + exec it still
    carries the parent's peak (the driver that wrote the weights)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def high_water() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler(threading.Thread):
    """Highest RSS seen while running (the sampling thread)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = rss()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(SAMPLE_SECONDS)


def measure_load(load: Callable[[], Any], mapped_suffix: str) -> tuple[Any, dict]:
    """Run ``load()`` once while sampling RSS: (its result, {seconds, baseline, peak, sampled_peak, after,
    mapped}); bytes are relative to the RSS before the load, ``mapped`` counts mappings of files whose path
    ends with ``mapped_suffix`` that are left after it."""
    gc.collect()
    kernel_peak = reset_high_water()
    baseline = rss()
    sampler = PeakSampler()
    sampler.start()
    t = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - t
    gc.collect()
    sampler.stop.set()
    sampler.join()
    after = rss()
    hwm = high_water() if kernel_peak else 0
    with open("/proc/self/maps", encoding="utf-8") as maps:
        mapped = sum(1 for line in maps if line.rstrip().endswith(mapped_suffix))
    return model, {"seconds": seconds, "baseline": baseline, "peak": max(sampler.peak, hwm) - baseline,
                   "sampled_peak": sampler.peak - baseline, "after": after - baseline, "mapped": mapped}


def child(mode: str, folder: Path) -> dict:
    import torch
    from diffusers import QwenImageTransformer2DModel
    from diffusers.hooks import apply_layerwise_casting

    import_pack()
    from gentor.loaders.memory import Precision
    from gentor.loaders.streaming import load_diffusers, resting_bytes
    from gentor.registry import COMMON_FP8_SKIP

    # Everything both paths import lazily is imported before the baseline, so only weights are measured.
    import accelerate  # noqa: F401
    import safetensors.torch  # noqa: F401

    fp8, bf16 = torch.float8_e4m3fn, torch.bfloat16

    def load():
        if mode == "from_pretrained":
            model = QwenImageTransformer2DModel.from_pretrained(folder, torch_dtype=bf16)
            apply_layerwise_casting(model, storage_dtype=fp8, compute_dtype=bf16,
                                    skip_modules_pattern=COMMON_FP8_SKIP)
            return model
        storage = fp8 if mode == "streaming" else bf16
        return load_diffusers(QwenImageTransformer2DModel, folder, Precision(storage, bf16), COMMON_FP8_SKIP,
                              None, "bench", "transformer")

    model, m = measure_load(load, ".safetensors")
    return {"mode": mode, "seconds": m["seconds"], "baseline": m["baseline"], "peak": m["peak"],
            "sampled_peak": m["sampled_peak"], "after": m["after"], "resting": resting_bytes(model),
            "mapped_files_after": m["mapped"]}


# ----------------------------------------------------------------------------- driver
def run_child(mode: str, folder: Path) -> dict:
    return run_script(Path(__file__), ["--child", mode, "--folder", str(folder)])


def run_script(script: Path, args: list[str]) -> dict:
    """Run a benchmark script in a fresh process (offline, the pack importable); its last line as JSON."""
    cmd = [sys.executable, str(script.resolve()), *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--shard-mb", type=int, default=100)
    parser.add_argument("--single-file", action="store_true", help="one unsharded file instead of shards")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--keep", type=Path, help="write the model here (and keep it) instead of a temp dir")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder)))
        return
    with tempfile.TemporaryDirectory(prefix="gentor-stream-") as tmp:
        folder = args.keep or Path(tmp) / "transformer"
        if not (folder / "config.json").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            write_model(folder, args.layers, args.heads, args.shard_mb, args.single_file)
            print(f"wrote {folder} in {time.perf_counter() - t:.1f} s")
        files = sorted(folder.glob("*.safetensors"))
        disk, largest = sum(f.stat().st_size for f in files), max(f.stat().st_size for f in files)
        print(f"on disk: {disk / MB:,.0f} MB in {len(files)} file(s), largest {largest / MB:,.0f} MB")
        print(f"{'mode':<16}{'resting MB':>11}{'peak MB':>9}{'after MB':>10}{'peak/(rest+shard)':>19}"
              f"{'after/rest':>11}{'peak/disk':>10}{'s':>6}  mapped")
        for mode in args.modes:
            r = run_child(mode, folder)
            bound = r["resting"] + largest
            print(f"{mode:<16}{r['resting'] / MB:>11,.0f}{r['peak'] / MB:>9,.0f}{r['after'] / MB:>10,.0f}"
                  f"{r['peak'] / bound:>19.2f}{r['after'] / r['resting']:>11.2f}{r['peak'] / disk:>10.2f}"
                  f"{r['seconds']:>6.1f}  {r['mapped_files_after']}")
            if mode == "streaming":
                ok = r["peak"] <= bound and r["after"] <= TARGET_AFTER * r["resting"]
                print(f"  target (peak <= resting + largest shard, after <= {TARGET_AFTER} x resting): "
                      f"{'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
