"""Every GPU figure the README lacks, in one command (≤ 10 minutes on one H100).

    python benchmarks/gpu_suite.py [--json gpu_suite.json] [--only qwen_image,qwen_cache,...]
    python benchmarks/gpu_suite.py --smoke        # the same code paths on the CPU, tiny models, < 2 min

Random full-size weights (speed does not depend on their values), each model built straight on the device
(or on the CPU for block offload). Each section runs in its own process with a time budget: peak VRAM
(``max_memory_allocated``) and peak host RSS are that section's, and a section that runs out of budget is
killed and reported as skipped. Sections:

- ``qwen_image``: Qwen-Image transformer (60 x 3072) at 1024², true CFG: seconds per step per memory mode
  (bf16 resident / FP8 storage / FP8 + block offload), through Gentor's storage and placement code;
- ``qwen_cache``: 1024², 50 steps with and without each step cache (``samplers/speed.py``): seconds,
  transformer passes computed, mean abs difference of the final latents vs uncached (random weights: the
  drift figure only means something with real weights, see README);
- ``deepgen``: DeepGen's SD3.5-Medium DiT at 1024², batched CFG: seconds per step per memory mode, and with
  TaylorSeer;
- ``bagel``: BAGEL 7B MoT (28 layers x 3584), 1024² T2I 50 steps, text CFG: seconds plain and with TaylorSeer;
- ``emu35``: the Emu3.5 decoder (64 x 5120, bf16) on a 16x16-token image: tokens/s with the CFG branch (batched,
  static cache, static + compiled step) and without it; the CFG cost ratio.

It prints one Markdown table and writes the rows as JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BUDGETS_S = {"qwen_image": 110, "qwen_cache": 150, "deepgen": 80, "bagel": 120, "emu35": 110}  # sum 570 s
SMOKE_BUDGET_S = 300  # per section on the CPU: ~10 s of CPU each, room for a busy shared machine
QWEN_FULL = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
QWEN_SMOKE = dict(QWEN_FULL, num_layers=2, num_attention_heads=2, attention_head_dim=32, joint_attention_dim=32,
                  axes_dims_rope=(8, 12, 12))
TEXT_TOKENS = 64
CACHES = {"off": None, "first_block 0.05": dict(cache="first_block", threshold=0.05, warmup_steps=3),
          "taylorseer 4": dict(cache="taylorseer", interval=4, warmup_steps=3)}
MEMORY_MODES = ("bf16", "fp8", "fp8_block")
GIB = 2**30


# ----------------------------------------------------------------------------- shared measurement helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_vram(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def peak_rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def row(section: str, backend: str, mode: str, value: float, unit: str, device: torch.device, **extra) -> dict:
    return {"section": section, "backend": backend, "mode": mode, "value": round(value, 4), "unit": unit,
            "peak_vram_gib": None if peak_vram(device) is None else round(peak_vram(device), 2),
            "peak_rss_gib": round(peak_rss(), 2), **extra}


def fresh(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def build(make, device: torch.device, dtype: torch.dtype):  # noqa: ANN001, ANN201
    """``make()`` with its parameters created directly in ``dtype`` on ``device`` (a full-size model built in
    fp32 first would not fit: BAGEL's 14B or Emu3.5's 34B parameters)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return make()
    finally:
        torch.set_default_dtype(old)


def place(module: torch.nn.Module, mode: str, device: torch.device, blocks: tuple[str, ...], display: str,
          skip: tuple[str, ...]) -> torch.nn.Module:
    """Gentor's own storage / placement code: FP8 layerwise storage, block offload (blocks stream from RAM)."""
    from gentor.loaders.memory import Precision, apply_storage
    from gentor.loaders.placement import apply_block_offload

    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    if mode == "fp8_block":
        module.to("cpu")
    apply_storage(module, Precision(torch.float8_e4m3fn if mode != "bf16" else compute, compute), skip)
    if mode == "fp8_block":
        apply_block_offload(module, blocks, device, display, "transformer")
    else:
        module.to(device)
    return module.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- Qwen-Image
def qwen_pipe(device: torch.device, smoke: bool, mode: str = "bf16"):  # noqa: ANN201
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    tr = build(lambda: QwenImageTransformer2DModel(**(QWEN_SMOKE if smoke else QWEN_FULL)), device, dtype)
    tr = place(tr, mode, device, ("transformer_blocks",), "Qwen-Image", tuple(tr._skip_layerwise_casting_patterns))
    sched = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192,
                                            max_shift=0.9, shift_terminal=0.02, use_dynamic_shifting=True)
    pipe = QwenImagePipeline(scheduler=sched, vae=None, text_encoder=None, tokenizer=None, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    width = tr.config.joint_attention_dim
    emb = [torch.randn(1, TEXT_TOKENS, width, generator=g).to(device, dtype) for _ in range(2)]
    mask = torch.ones(1, TEXT_TOKENS, dtype=torch.long, device=device)

    def run(steps: int, size: int) -> torch.Tensor:
        return pipe(prompt_embeds=emb[0], prompt_embeds_mask=mask, negative_prompt_embeds=emb[1],
                    negative_prompt_embeds_mask=mask, true_cfg_scale=4.0, num_inference_steps=steps, width=size,
                    height=size, output_type="latent", generator=torch.Generator().manual_seed(1)).images
    return pipe, run


def section_qwen_image(device: torch.device, smoke: bool) -> list[dict]:
    size, steps = (64, 2) if smoke else (1024, 3)
    rows = []
    for mode in MEMORY_MODES:
        fresh(device)
        pipe, run = qwen_pipe(device, smoke, mode)
        run(2, size)  # warm-up: kernels, the hooks' first pass (2: the schedule needs two steps)
        sync(device)
        t = time.perf_counter()
        run(steps, size)
        sync(device)
        rows.append(row("qwen_image", "Qwen-Image", mode, (time.perf_counter() - t) / steps, "s/step (2 passes)",
                        device, size=size))
        del pipe, run
    return rows


def section_qwen_cache(device: torch.device, smoke: bool) -> list[dict]:
    from diffusers.hooks.hooks import _set_cache_context  # noqa: F401 - the speed module's dependency, early

    from gentor.samplers import speed

    size, steps = (64, 8) if smoke else (1024, 50)
    fresh(device)
    pipe, run = qwen_pipe(device, smoke)
    run(2, size)
    rows, plain = [], None
    for name, options in CACHES.items():
        opts = speed.SpeedOptions(**options) if options else None
        sync(device)
        t = time.perf_counter()
        with speed.applied(pipe.transformer, opts, "Qwen-Image", steps, 2) as report:
            latents = run(steps, size)
        sync(device)
        seconds = time.perf_counter() - t
        plain = latents if plain is None else plain
        diff = float((latents.float() - plain.float()).abs().mean())
        rows.append(row("qwen_cache", "Qwen-Image", name, seconds, f"s / {steps} steps", device, size=size,
                        computed=f"{report.computed or 2 * steps} of {2 * steps} passes",
                        latent_mean_abs_diff=round(diff, 5)))
    return rows


# ----------------------------------------------------------------------------- DeepGen
def section_deepgen(device: torch.device, smoke: bool) -> list[dict]:
    from bench_deepgen import SD35M
    from diffusers import FlowMatchEulerDiscreteScheduler

    from gentor.modeling.deepgen.sampling import denoise, generator, initial_noise
    from gentor.modeling.deepgen.transformer import DeepGenTransformer
    from gentor.samplers import speed

    cfg = dict(SD35M, num_layers=2, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=32,
               caption_projection_dim=32, pooled_projection_dim=16, dual_attention_layers=(0,)) if smoke else SD35M
    size, steps = (64, 2) if smoke else (1024, 4)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for mode in (*MEMORY_MODES, "bf16 + taylorseer 4"):
        fresh(device)
        torch.manual_seed(0)
        dit = build(lambda: DeepGenTransformer(**cfg), device, dtype)
        dit = place(dit, mode.split()[0], device, ("transformer_blocks",), "DeepGen",
                    tuple(dit._skip_layerwise_casting_patterns))
        g = torch.Generator().manual_seed(0)
        pos = (torch.randn(1, 128 + 24, cfg["joint_attention_dim"], generator=g).to(device),
               torch.randn(1, cfg["pooled_projection_dim"], generator=g).to(device))
        x0 = initial_noise(generator(0), 1, size, size).to(device)
        n = steps if "taylorseer" not in mode else (8 if smoke else 20)
        opts = speed.SpeedOptions(cache="taylorseer", interval=4, warmup_steps=3) if "taylorseer" in mode else None
        with torch.inference_mode():
            denoise(dit, FlowMatchEulerDiscreteScheduler(shift=3.0), x0, pos, pos, [], 2, 4.0)
            sync(device)
            t = time.perf_counter()
            with speed.applied(dit, opts, "DeepGen", n, whole_model=True) as report:
                denoise(dit, FlowMatchEulerDiscreteScheduler(shift=3.0), x0, pos, pos, [], n, 4.0)
            sync(device)
        rows.append(row("deepgen", "DeepGen DiT", mode, (time.perf_counter() - t) / n, "s/step (batched CFG)",
                        device, size=size, computed=f"{report.computed or n} of {n} steps"))
        del dit
    return rows


# ----------------------------------------------------------------------------- BAGEL
def section_bagel(device: torch.device, smoke: bool) -> list[dict]:
    from bench_bagel import FULL_LLM, FULL_VIT, PROMPT, modeling, random_init, tokenizer

    from gentor.samplers import speed

    mb = modeling()
    if smoke:
        llm = mb.LLMConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                           num_kv_heads=1)
        vit = mb.ViTConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
        cfg = mb.BagelConfig(llm, vit, mb.AEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1))
    else:
        cfg = mb.BagelConfig(mb.LLMConfig.from_dict(FULL_LLM), mb.ViTConfig.from_dict(FULL_VIT))
    side, steps = (64, 6) if smoke else (1024, 50)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fresh(device)
    torch.manual_seed(0)
    model, ae = build(lambda: mb.Bagel(cfg), device, dtype), build(lambda: mb.AutoEncoder(cfg.ae), device, dtype)
    random_init(model)
    engine = mb.BagelEngine(model.eval(), ae.eval(), tokenizer(), device=device)
    flow = mb.FlowSettings(steps=steps, cfg_text=4.0, cfg_img=1.0, cfg_interval=(0.4, 1.0))
    rows = []
    plain_velocity = engine.velocity
    for name, options in (("plain", None), ("taylorseer 4", speed.SpeedOptions(cache="taylorseer", interval=4))):
        report = speed.Report()
        engine.velocity = speed.velocity_cache(plain_velocity, options, steps - 1, lambda *a: a[4], report)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            sync(device)
            t = time.perf_counter()
            ctx = engine.build_contexts([PROMPT], gen, (side, side))
            x = engine.generate_image(ctx, torch.randn((side // 16) ** 2, 64, generator=gen), flow)
            engine.decode(x, side, side)
            sync(device)
        rows.append(row("bagel", "BAGEL", name, time.perf_counter() - t, f"s / image ({steps} steps)", device,
                        size=side, computed=f"{report.computed} of {report.calls} velocity passes" if options else ""))
    return rows


# ----------------------------------------------------------------------------- Emu3.5
def section_emu35(device: torch.device, smoke: bool) -> list[dict]:
    from bench_emu35 import PRESET_34B, PROMPT_TOKENS, emu_config

    from gentor.modeling.emu35 import tokens as T
    from gentor.modeling.emu35.generate import generate
    from gentor.modeling.emu35.image_tokens import tokens_needed
    from gentor.modeling.emu35.logits import SamplingParams

    shape = dict(hidden=64, layers=2, heads=4, kv_heads=2, inter=128, head_dim=16) if smoke else PRESET_34B
    grid = (2, 3) if smoke else (16, 16)
    fresh(device)
    from gentor.modeling.emu35.decoder import build_decoder, qwen3_config

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(lambda: build_decoder(qwen3_config(emu_config(argparse.Namespace(**shape)))), device, dtype)
    model = model.eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    cond = [T.BOS] + torch.randint(0, 150000, (PROMPT_TOKENS,), generator=gen).tolist() + [T.BOI]
    unc = [T.BOS] + torch.randint(0, 150000, (PROMPT_TOKENS // 2,), generator=gen).tolist()
    n = tokens_needed(grid, boi_in_prompt=True)
    runs = {"single branch": dict(uncond=None), "CFG batched": dict(mode="batched"),
            "CFG static cache": dict(mode="static"),
            "CFG static + compiled step": dict(mode="static", compile_step=device.type == "cuda")}
    rows, seconds = [], {}
    for name, kw in runs.items():
        args = dict(kw)
        uncond = args.pop("uncond", unc)
        with torch.no_grad():
            generate(model, cond, uncond, SamplingParams(cfg=5.0), seed=0, max_new_tokens=min(n, 8), grid=grid,
                     device=device, **args)  # warm-up (and compile)
            sync(device)
            t = time.perf_counter()
            out = generate(model, cond, uncond, SamplingParams(cfg=5.0), seed=0, max_new_tokens=n, grid=grid,
                           device=device, **args)
            sync(device)
        seconds[name] = time.perf_counter() - t
        rows.append(row("emu35", "Emu3.5", name, len(out.tokens) / seconds[name], "tokens/s", device,
                        grid=f"{grid[0]}x{grid[1]}", cfg_cost=round(seconds[name] / seconds["single branch"], 3),
                        compiled=bool(args.get("compile_step"))))
    return rows


SECTIONS = {"qwen_image": section_qwen_image, "qwen_cache": section_qwen_cache, "deepgen": section_deepgen,
            "bagel": section_bagel, "emu35": section_emu35}


# ----------------------------------------------------------------------------- driver
def child(name: str, out: Path, smoke: bool) -> None:
    from bench_qwen_image import import_pack

    import_pack()
    torch.set_grad_enabled(False)
    device = torch.device("cpu" if smoke else "cuda")
    rows = SECTIONS[name](device, smoke)
    out.write_text(json.dumps(rows))


def dash(value: object) -> object:
    return "–" if value is None else value


def table(rows: list[dict]) -> str:
    lines = ["| section | backend | mode | value | unit | peak VRAM GiB | peak RSS GiB | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        notes = ", ".join(f"{k}={v}" for k, v in r.items() if k not in
                          {"section", "backend", "mode", "value", "unit", "peak_vram_gib", "peak_rss_gib"} and v != "")
        lines.append(f"| {r['section']} | {r.get('backend', '')} | {r.get('mode', '')} | {r.get('value', '')} | "
                     f"{r.get('unit', '')} | {dash(r.get('peak_vram_gib'))} | {dash(r.get('peak_rss_gib'))} | "
                     f"{notes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny models: the same code paths, < 2 minutes")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    ap.add_argument("--json", default="gpu_suite.json", help="where to write the rows")
    ap.add_argument("--section", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.section:
        child(a.section, Path(a.out), a.smoke)
        return 0
    if not a.smoke and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device (got torch.cuda.is_available() == False, expected a GPU). Run with --smoke "
              "for the CPU check of the same code paths.")
        return 2
    rows, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gentor-gpu-suite-") as tmp:
        for name in a.only.split(","):
            budget = SMOKE_BUDGET_S if a.smoke else BUDGETS_S[name]
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, __file__, "--section", name, "--out", str(out)] + (["--smoke"] if a.smoke else [])
            t = time.perf_counter()
            try:
                proc = subprocess.run(cmd, timeout=budget, capture_output=True, text=True)
            except subprocess.TimeoutExpired:
                rows.append({"section": name, "mode": f"skipped: budget of {budget} s ran out"})
                continue
            if proc.returncode != 0 or not out.exists():
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                rows.append({"section": name, "mode": f"failed (rc {proc.returncode}): {tail[0][:200]}"})
                continue
            section_rows = json.loads(out.read_text())
            for r in section_rows:
                r["section_s"] = round(time.perf_counter() - t, 1)
            rows.extend(section_rows)
    print(table(rows))
    where = "CPU (smoke)" if a.smoke else torch.cuda.get_device_name()
    print(f"\ntotal {time.perf_counter() - started:.0f} s on {where}")
    Path(a.json).write_text(json.dumps({"smoke": a.smoke, "torch": torch.__version__, "rows": rows}, indent=1))
    failed = [r for r in rows if str(r.get("mode", "")).startswith(("failed", "skipped"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
