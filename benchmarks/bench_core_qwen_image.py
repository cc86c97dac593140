"""ComfyUI core's own Qwen-Image vs Gentor on the SAME Comfy-format file, in the SAME ComfyUI process (issue 20).

One real ComfyUI (tests/comfy_server.py, the pack linked, a temporary models folder) samples one random
Comfy-format transformer file two ways:

- core: ``UNETLoader`` -> ``KSampler`` (euler, simple, cfg 1) on ``EmptySD3LatentImage``; core's text encoder is
  fixed at the 7B size, so a benchmark-only node (written into the run's temporary ``custom_nodes/``, not part
  of the pack) supplies a random conditioning ``[1, tokens, 3584]`` with the token count Gentor's prompt gives;
- Gentor: ``GentorLoadQwenImageFiles`` -> ``GentorTextToImage`` (cfg 1: no negative pass, as core's cfg 1).

Core builds Qwen-Image at the released width (24 x 128, text 3584) whatever the file holds, so the file is
full width with few blocks (tests/tiny_comfy_sized.py); both sides compute in the same dtype (fp32 on the CPU,
bf16 on a GPU: each side's default). Each side runs two step counts, interleaved, ``--repeats`` times after one
warm-up (the loads); seconds per step = (t(n2) - t(n1)) / (n2 - n1), so loading, text encoding and VAE decoding
cancel. On the CPU the time is the server process's CPU seconds (the shared machine's wall clock varies; ComfyUI
runs one thread), wall seconds are printed too. Peak RSS of the server process (psutil samples + VmHWM).

    COMFYUI_DIR=/path/to/ComfyUI python benchmarks/bench_core_qwen_image.py [--layers 1] [--size 256]
        [--steps 2 6] [--repeats 3] [--json out.json]
    ... --gpu     # a GPU machine: 60 blocks (the released depth), 1024 px, bf16, wall seconds; both sides hold a
                  # copy (2 x 41 GB): an H200, or --layers 30 on an H100 (the file itself needs ~41 GB host RAM + disk)
    ... --smoke   # the same code path on the smallest sizes (tests/test_bench_core_qwen_image.py)

Every model file is written under a temporary folder and deleted at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.comfy_server import ComfyServer, describe, status_of  # noqa: E402

PROMPT = "a red fox sitting in fresh snow at dawn, watercolor, soft light"
TEXT_WIDTH = 3584  # core's Qwen-Image joint_attention_dim (fixed)
HELPER_MODULE = "gentor_bench_core_helpers.py"
HELPER_SOURCE = '''"""Benchmark-only nodes (written by benchmarks/bench_core_qwen_image.py; not part of any pack)."""
import torch


class GentorBenchRandomConditioning:
    """A random text conditioning [1, tokens, width] for core's KSampler (core's encoder is fixed at 7B)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tokens": ("INT", {"default": 16, "min": 1, "max": 4096}),
                             "width": ("INT", {"default": 3584, "min": 1, "max": 65536}),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "benchmark"

    def make(self, tokens, width, seed):
        gen = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, width, generator=gen), {}]],)


class GentorBenchLatentSink:
    """An output node that takes core's latent (so the sampler runs) and reports its shape."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    RETURN_TYPES = ()
    FUNCTION = "take"
    OUTPUT_NODE = True
    CATEGORY = "benchmark"

    def take(self, samples):
        return {"ui": {"shape": [list(samples["samples"].shape)]}}


NODE_CLASS_MAPPINGS = {"GentorBenchRandomConditioning": GentorBenchRandomConditioning,
                       "GentorBenchLatentSink": GentorBenchLatentSink}
'''
MODEL_FOLDERS = ("diffusion_models", "text_encoders", "vae")
PRESETS = {  # layers, size, steps, repeats
    "cpu": (1, 256, (2, 6), 3),
    "gpu": (60, 1024, (5, 15), 3),
    "smoke": (1, 64, (2, 3), 1),
}
RUN_TIMEOUT_S = 1800.0
CACHE_LRU = 32


def prompt_tokens(comfy_dir: Path, prompt: str) -> int:
    """How many text tokens Gentor's diffusers pipeline encodes for ``prompt`` (its template, minus the dropped
    system-prompt tokens), with ComfyUI's bundled Qwen2.5 tokenizer: core's conditioning gets the same count."""
    from diffusers import QwenImagePipeline
    from transformers import AutoTokenizer

    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    tok = AutoTokenizer.from_pretrained(comfy_dir / "comfy" / "text_encoders" / "qwen25_tokenizer")
    ids = tok(pipe.prompt_template_encode.format(prompt))["input_ids"]
    return len(ids) - pipe.prompt_template_encode_start_idx


def core_prompt(files: dict[str, Path], tokens: int, size: int, steps: int, seed: int) -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": files["transformer"].name,
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "GentorBenchRandomConditioning", "inputs": {"tokens": tokens, "width": TEXT_WIDTH,
                                                                        "seed": 0}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0],
                                                   "latent_image": ["3", 0], "seed": seed, "steps": steps,
                                                   "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
                                                   "denoise": 1.0}},
        "5": {"class_type": "GentorBenchLatentSink", "inputs": {"samples": ["4", 0]}},
    }


def gentor_prompt(files: dict[str, Path], size: int, steps: int, seed: int) -> dict:
    return {
        "1": {"class_type": "GentorLoadQwenImageFiles", "inputs": {
            "diffusion_model": files["transformer"].name, "text_encoder": files["text_encoder"].name,
            "vae": files["vae"].name, "engine": "diffusers", "variant": "auto"}},
        "2": {"class_type": "GentorTextToImage", "inputs": {
            "model": ["1", 0], "prompt": PROMPT, "negative": "", "seed": seed, "steps": steps, "cfg": 1.0,
            "width": size, "height": size, "batch_size": 1}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }


class RssSampler(threading.Thread):
    """Peak RSS of a process, sampled every 50 ms (VmHWM is read too, at the end)."""

    def __init__(self, pid: int) -> None:
        import psutil

        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except Exception:  # noqa: BLE001 - the server exited: the last sample stands
                return
            time.sleep(0.05)


def vm_hwm(pid: int) -> int:
    """The kernel's peak RSS of ``pid`` (Linux), 0 elsewhere."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def timed(server: ComfyServer, prompt: dict) -> tuple[float, float]:
    """(wall s, server CPU s) of one prompt, queued and waited for."""
    import psutil

    proc = psutil.Process(server.proc.pid)
    cpu0, t0 = sum(proc.cpu_times()[:2]), time.perf_counter()
    entry = server.run(prompt, RUN_TIMEOUT_S)
    wall, cpu = time.perf_counter() - t0, sum(proc.cpu_times()[:2]) - cpu0
    if status_of(entry) != "success":
        raise RuntimeError(describe(entry))
    return wall, cpu


def measure(server: ComfyServer, files: dict[str, Path], tokens: int, size: int, steps: tuple[int, int],
            repeats: int) -> dict:
    """Warm-up (loads) then ``repeats`` interleaved rounds of both step counts per side."""
    rss = server_rss(server)
    build = {"core": lambda n, s: core_prompt(files, tokens, size, n, s),
             "gentor": lambda n, s: gentor_prompt(files, size, n, s)}
    seed = iter(range(1, 10_000))  # a new seed per run: ComfyUI would otherwise return the cached result
    runs: dict[str, dict[int, list[tuple[float, float]]]] = {k: {n: [] for n in steps} for k in build}
    after_load = {}
    for side in build:  # warm-up: each side loads its model (core first: its resident size is read alone)
        timed(server, build[side](steps[0], next(seed)))
        after_load[side] = server_rss(server)
    for r in range(repeats):
        order = list(build) if r % 2 == 0 else list(build)[::-1]
        for side in order:
            for n in steps:
                runs[side][n].append(timed(server, build[side](n, next(seed))))
                print(f"  {side:<6} {n:>3} steps: {runs[side][n][-1][0]:7.2f} s wall, {runs[side][n][-1][1]:7.2f} s CPU",
                      flush=True)
    n1, n2 = steps
    result = {"rss_start": rss, "rss_after_core_load": after_load["core"],
              "rss_after_gentor_load": after_load["gentor"], "runs": runs}
    for side, by_n in runs.items():
        for i, what in enumerate(("wall", "cpu")):
            per_step = [(b[i] - a[i]) / (n2 - n1) for a, b in zip(by_n[n1], by_n[n2])]
            result[f"{side}_{what}_per_step"] = per_step
    return result


def server_rss(server: ComfyServer) -> int:
    import psutil

    return psutil.Process(server.proc.pid).memory_info().rss


def write_files(models: Path, layers: int) -> dict[str, Path]:
    from tests import tiny_comfy_sized

    t = time.perf_counter()
    files = tiny_comfy_sized.write_files(models, layers)
    size = sum(p.stat().st_size for p in files.values())
    print(f"wrote the files ({size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s", flush=True)
    return files


def report(res: dict, args: argparse.Namespace, metric: str) -> str:
    gb = 1024 ** 3
    med = {side: statistics.median(res[f"{side}_{metric}_per_step"]) for side in ("core", "gentor")}
    lines = [f"| side | {metric} s/step (median of {args.repeats}) | each repeat |", "|---|---|---|"]
    for side in ("core", "gentor"):
        each = ", ".join(f"{v:.2f}" for v in res[f"{side}_{metric}_per_step"])
        lines.append(f"| {side} | {med[side]:.2f} | {each} |")
    lines.append(f"\nGentor / core per step ({metric}): **{med['gentor'] / med['core']:.2f}x**")
    lines.append(f"server RSS: start {res['rss_start'] / gb:.2f} GiB, after core's load "
                 f"{res['rss_after_core_load'] / gb:.2f} GiB, after Gentor's load {res['rss_after_gentor_load'] / gb:.2f}"
                 f" GiB, peak {res['rss_peak'] / gb:.2f} GiB")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfy-dir", type=Path, default=os.environ.get("COMFYUI_DIR"))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--gpu", action="store_true", help="ComfyUI on the GPU, full depth, 1024 px, wall seconds")
    mode.add_argument("--smoke", action="store_true", help="the smallest sizes (a test runs this)")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--steps", type=int, nargs=2)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--log", type=Path, help="keep the server's log here")
    args = parser.parse_args()
    if args.comfy_dir is None:
        parser.error("set COMFYUI_DIR (or --comfy-dir) to a ComfyUI checkout")
    layers, size, steps, repeats = PRESETS["gpu" if args.gpu else "smoke" if args.smoke else "cpu"]
    args.layers, args.size = args.layers or layers, args.size or size
    args.steps, args.repeats = tuple(args.steps or steps), args.repeats or repeats
    if args.steps[1] <= args.steps[0]:
        parser.error(f"--steps: the second count must be larger (got {args.steps})")
    tokens = prompt_tokens(args.comfy_dir, PROMPT)
    print(f"{args.layers} blocks x 3072 wide, {args.size} px, steps {args.steps}, {args.repeats} repeats, "
          f"{tokens} text tokens, cfg 1, {'GPU' if args.gpu else 'CPU'}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gentor-core-bench-") as tmp:
        base = Path(tmp)
        models = base / "models"
        files = write_files(models, args.layers)
        (base / "custom_nodes").mkdir(parents=True)
        (base / "custom_nodes" / HELPER_MODULE).write_text(HELPER_SOURCE, encoding="utf-8")
        yaml = "\n".join(["gentor_bench:", f"    base_path: {json.dumps(str(models))}",
                          *(f"    {k}: {k}/" for k in MODEL_FOLDERS)]) + "\n"
        # The default (classic) cache drops the outputs of nodes the last prompt lacked, so core's UNETLoader would
        # re-read its file after each Gentor run; an LRU cache keeps both sides' loader outputs between prompts.
        server = ComfyServer(args.comfy_dir, base, models, extra_model_paths=yaml, cpu=not args.gpu,
                             extra_args=("--cache-lru", str(CACHE_LRU)))
        server.start()
        sampler = RssSampler(server.proc.pid)
        sampler.start()
        try:
            res = measure(server, files, tokens, args.size, args.steps, args.repeats)
            res["rss_peak"] = max(sampler.peak, vm_hwm(server.proc.pid))
        finally:
            sampler.stop.set()
            server.stop()
            if args.log:
                args.log.write_text(server.log_text(), encoding="utf-8")
    metrics = ("wall",) if args.gpu else ("cpu", "wall")
    for metric in metrics:
        print(report(res, args, metric), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "tokens": tokens,
                                         **res}, indent=1, default=str))


if __name__ == "__main__":
    main()
