"""ComfyUI core's own Qwen-Image vs Gentor on the same Comfy-format transformer file, in one ComfyUI process.

Core: UNETLoader + KSampler (euler / simple, cfg 4: one batched cond+uncond pass per step; ``--cfg 1``: one
pass) on an empty 16-channel latent, conditioning from a benchmark-only helper node (random tensors of the width
core's Qwen-Image reads: its text encoder is fixed at the 7B size). Gentor: Gentor Load Qwen-Image (ComfyUI
files) on the same file plus a text encoder and VAE file, Gentor Text to Image with true CFG 4 (two passes per
step). Both at the same size.

Core builds its Qwen-Image with 24 heads x 128 and a 3584-wide text input whatever the file holds (only the
layer count and input channels come from the weights), so the file is full width with ``--layers`` blocks; the
text encoder file is 3584 wide (one layer) with the real vocabulary.

Seconds per step = (time at ``--steps-hi`` - time at ``--steps-lo``) / the difference, from the server's own
execution timestamps, interleaved core / Gentor, ``--repeats`` times; loading and Gentor's text encoding and VAE
decode cancel out. A new seed per run (ComfyUI would otherwise return its cached result). Peak RSS of the
server at the end (both backends' weights in one process).

    COMFYUI_DIR=/path/to/ComfyUI python benchmarks/bench_core_qwen_image.py [--layers 1] [--size 128]
"""
from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CORE_HEADS, CORE_TEXT_WIDTH = 24, 3584  # comfy/ldm/qwen_image/model.py defaults, not read from the file
TEXT_TOKENS = 32
HELPER = "GentorBenchRandomConditioning"
HELPER_SOURCE = f'''"""Benchmark-only: random CONDITIONING of a given shape (benchmarks/bench_core_qwen_image.py)."""
import torch


class {HELPER}:
    @classmethod
    def INPUT_TYPES(cls):
        return {{"required": {{"tokens": ("INT", {{"default": {TEXT_TOKENS}, "min": 1, "max": 4096}}),
                              "width": ("INT", {{"default": {CORE_TEXT_WIDTH}, "min": 1, "max": 16384}}),
                              "seed": ("INT", {{"default": 0, "min": 0, "max": 2**31}})}}}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "benchmark"

    def make(self, tokens, width, seed):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, width, generator=g), {{}}]],)


NODE_CLASS_MAPPINGS = {{"{HELPER}": {HELPER}}}
'''


def write_files(out: Path, layers: int) -> dict[str, Path]:
    """The kit's Comfy-format writers (tests/tiny_comfy.py) at core's widths: its size tables are module
    constants, widened here, in this benchmark process only."""
    from tests import tiny_comfy as kit

    kit.TRANSFORMER_CONFIG.update(num_layers=layers, num_attention_heads=CORE_HEADS,
                                  joint_attention_dim=CORE_TEXT_WIDTH)
    kit.TEXT_CONFIG.update(hidden_size=CORE_TEXT_WIDTH, intermediate_size=512, num_hidden_layers=1,
                           num_attention_heads=28, num_key_value_heads=4)
    kit.VISION_CONFIG.update(out_hidden_size=CORE_TEXT_WIDTH)
    folders = kit.write_comfy_qwen_image(out / "kit", [kit.T2I])
    # base/models: ComfyUI's own model folders under --base-directory (core's UNETLoader lists them)
    files = kit.comfy_files(folders[kit.T2I], out / "base" / "models", ("bf16",), text_encoder_formats=("bf16",))
    shutil.rmtree(out / "kit")
    return files


def core_prompt(dm: str, steps: int, seed: int, size: int, cfg: float) -> dict:
    return {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": dm, "weight_dtype": "default"}},
            "2": {"class_type": HELPER, "inputs": {"tokens": TEXT_TOKENS, "width": CORE_TEXT_WIDTH, "seed": 1}},
            "3": {"class_type": HELPER, "inputs": {"tokens": TEXT_TOKENS, "width": CORE_TEXT_WIDTH, "seed": 2}},
            "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
            "5": {"class_type": "KSampler", "inputs": {
                "model": ["1", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler",
                "scheduler": "simple", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
                "denoise": 1.0}},
            "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "bench/core"}}}


def gentor_prompt(files: dict[str, Path], steps: int, seed: int, size: int, cfg: float) -> dict:
    return {"1": {"class_type": "GentorLoadQwenImageFiles", "inputs": {
                "diffusion_model": files["transformer:bf16"].name, "text_encoder": files["text_encoder:bf16"].name,
                "vae": files["vae"].name, "engine": "diffusers", "variant": "auto"}},
            "2": {"class_type": "GentorTextToImage", "inputs": {
                "model": ["1", 0], "prompt": "a lighthouse on a cliff at dusk", "negative": "", "seed": seed,
                "steps": steps, "cfg": cfg, "width": size, "height": size, "batch_size": 1}},
            "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}


def seconds(entry: dict) -> float:
    """Execution time of one prompt from the server's own timestamps (ms)."""
    from tests.comfy_server import messages

    start = messages(entry, "execution_start")[0]["timestamp"]
    end = messages(entry, "execution_success")[0]["timestamp"]
    return (end - start) / 1000.0


def peak_rss_gib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 2**30
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps-lo", type=int, default=2)
    ap.add_argument("--steps-hi", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cfg", type=float, default=4.0, help="1.0: one pass per step on both sides (no guidance)")
    ap.add_argument("--timeout", type=float, default=1800.0)
    a = ap.parse_args()
    from tests.comfy_server import ComfyServer, comfy_dir_or_skip, describe, status_of

    comfy_dir = Path(os.environ.get("COMFYUI_DIR", "")) if os.environ.get("COMFYUI_DIR") else comfy_dir_or_skip()
    tmp = Path(tempfile.mkdtemp(prefix="gentor-bench-core-"))
    try:
        files = write_files(tmp, a.layers)
        base = tmp / "base"
        (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        (base / "custom_nodes" / "gentor_bench_conditioning.py").write_text(HELPER_SOURCE, encoding="utf-8")
        dm = files["transformer:bf16"].name
        makers = {"core": lambda steps, seed: core_prompt(dm, steps, seed, a.size, a.cfg),
                  "gentor": lambda steps, seed: gentor_prompt(files, steps, seed, a.size, a.cfg)}
        times: dict[tuple[str, int], list[float]] = {(k, s): [] for k in makers for s in (a.steps_lo, a.steps_hi)}
        seeds = itertools.count(100)
        with ComfyServer(comfy_dir, base, base / "models") as srv:
            for name, make in makers.items():  # load once each (and compile nothing): not timed
                entry = srv.run(make(a.steps_lo, next(seeds)), a.timeout)
                if status_of(entry) != "success":
                    raise SystemExit(f"{name} warm-up failed: {describe(entry)}")
            for _ in range(a.repeats):
                for name, make in makers.items():
                    for steps in (a.steps_lo, a.steps_hi):
                        entry = srv.run(make(steps, next(seeds)), a.timeout)
                        if status_of(entry) != "success":
                            raise SystemExit(f"{name} {steps} steps failed: {describe(entry)}")
                        times[(name, steps)].append(seconds(entry))
            rss = peak_rss_gib(srv.proc.pid)
        span = a.steps_hi - a.steps_lo
        per_step = {k: (statistics.median(times[(k, a.steps_hi)]) - statistics.median(times[(k, a.steps_lo)])) / span
                    for k in makers}
        print(f"Qwen-Image {a.layers}-layer full-width (3072, 24 heads) Comfy-format bf16 file, {a.size}px, "
              f"cfg {a.cfg:g}, "
              f"{a.steps_lo} vs {a.steps_hi} steps, median of {a.repeats} interleaved runs, one ComfyUI process "
              f"({comfy_dir.name}), CPU")
        print("| | s/step | s at lo | s at hi |")
        print("|---|---|---|---|")
        for k in makers:
            print(f"| {k} | {per_step[k]:.3f} | {statistics.median(times[(k, a.steps_lo)]):.2f} | "
                  f"{statistics.median(times[(k, a.steps_hi)]):.2f} |")
        print(f"Gentor / core per step: {per_step['gentor'] / per_step['core']:.3f} (target <= 1.0); peak RSS of the "
              f"server {rss:.2f} GiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
