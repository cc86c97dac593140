"""DeepGen benchmarks: our DiT loop vs diffusers' SD3 transformer, text-encoding time, GPU memory/speed.

CPU (default): a mid-size random SD3 transformer; per-step time of our sampling loop (dynamic forward,
CFG batch, Euler) vs the same loop calling diffusers' ``SD3Transformer2DModel`` directly on identical
weights (target ratio <= 1.05; outputs must agree), the edit step with one reference, and the VLM
pass (prompt + meta queries + six-layer bridge) on a mid-size random 36-layer Qwen2.5-VL.

    python benchmarks/bench_deepgen.py [--repeats 3] [--size 128] [--layers 4]

Load (--load): peak host RAM while the loader streams a mid-size checkpoint into FP8 storage, against the
resting bytes of what was loaded plus the largest weight file (DESIGN.md §5), measured in a fresh process.

    python benchmarks/bench_deepgen.py --load [--layers 8]

GPU (--gpu): full-size random weights (SD3.5-Medium DiT, 2048-wide bridge); seconds per 512x512 image
(50 steps, CFG) and peak VRAM for bf16, FP8 storage, FP8 + block offload of the DiT blocks.

    python benchmarks/bench_deepgen.py --gpu [--steps 50]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SD35M = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
             pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
             qk_norm="rms_norm")
BRIDGE_FULL = dict(llm_hidden=2048, num_queries=128, hidden=2048, intermediate=11946, num_layers=6, num_heads=32,
                   pooled_dim=2048, joint_dim=4096)
PROMPT_TOKENS = 24  # "Generate an image: <prompt>" in the chat template, typical prompt


def import_pack():
    spec = importlib.util.spec_from_file_location("gentor", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["gentor"] = module
    spec.loader.exec_module(module)


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each function, run round-robin so machine noise hits all alike."""
    times = {k: [] for k in fns}
    outs = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t)
    return {k: (statistics.median(v), outs[k]) for k, v in times.items()}


def mid_dit(layers: int, dtype: torch.dtype, device: str):
    from diffusers import SD3Transformer2DModel

    from gentor.modeling.deepgen.transformer import DeepGenTransformer

    cfg = dict(SD35M, num_layers=layers, num_attention_heads=6, joint_attention_dim=256, caption_projection_dim=384,
               pooled_projection_dim=256, dual_attention_layers=tuple(range(min(2, layers))))
    torch.manual_seed(0)
    ref = SD3Transformer2DModel(**cfg).to(device, dtype).eval()
    ours = DeepGenTransformer.from_config(ref.config).to(device, dtype).eval()
    ours.load_state_dict(ref.state_dict())
    return ours, ref, cfg


def bench_cpu(args) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from gentor.modeling.deepgen.sampling import denoise, initial_noise, generator
    from tests.deepgen_helpers import rel_err

    torch.set_grad_enabled(False)
    ours, ref, cfg = mid_dit(args.layers, torch.float32, "cpu")
    params = sum(p.numel() for p in ref.parameters())
    g = torch.Generator().manual_seed(1)
    pos = (torch.randn(1, PROMPT_TOKENS + 8, cfg["joint_attention_dim"], generator=g),
           torch.randn(1, cfg["pooled_projection_dim"], generator=g))
    neg = (torch.randn(1, PROMPT_TOKENS + 8, cfg["joint_attention_dim"], generator=g),
           torch.randn(1, cfg["pooled_projection_dim"], generator=g))
    x0 = initial_noise(generator(0), 1, args.size, args.size)
    scheduler = lambda: FlowMatchEulerDiscreteScheduler(shift=3.0)  # noqa: E731
    steps, guidance = args.steps, 4.0

    def ours_loop():
        return denoise(ours, scheduler(), x0.clone(), pos, neg, [], steps, guidance)

    def diffusers_loop():
        s = scheduler()
        s.set_timesteps(steps)
        x = x0.clone()
        seq, pooled = torch.cat([neg[0], pos[0]]), torch.cat([neg[1], pos[1]])
        for t in s.timesteps:
            v = ref(torch.cat([x, x]), seq, pooled, t.expand(2), return_dict=False)[0]
            u, c = v.chunk(2)
            x = s.step(u + guidance * (c - u), t, x, return_dict=False)[0]
        return x

    ref_latent = torch.randn(1, 16, args.size // 8, args.size // 8, generator=g)[0]

    def ours_edit():
        return denoise(ours, scheduler(), x0.clone(), pos, neg, [ref_latent], steps, guidance)

    ours_loop(), diffusers_loop()  # warm-up
    res = interleaved({"ours": ours_loop, "diffusers": diffusers_loop, "edit": ours_edit}, args.repeats)
    (t_o, out_o), (t_d, out_d), (t_e, _) = res["ours"], res["diffusers"], res["edit"]
    print(f"DiT {params / 1e6:.0f}M params, {args.size}x{args.size}, {steps} steps, CFG batch 2, "
          f"{torch.get_num_threads()} threads")
    print(f"  per step: ours {t_o / steps * 1e3:.1f} ms, diffusers {t_d / steps * 1e3:.1f} ms, "
          f"ratio {t_o / t_d:.3f} (target <= 1.05); outputs rel. diff {rel_err(out_o, out_d):.1e}")
    print(f"  edit with one {args.size}x{args.size} reference: {t_e / steps * 1e3:.1f} ms per step "
          f"({t_e / t_o:.2f}x T2I: twice the image tokens)")
    bench_text(args)


def bench_text(args) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from gentor.modeling.deepgen.bridge import BridgeConfig, DeepGenBridge
    from gentor.modeling.deepgen.encode import encode
    from gentor.modeling.deepgen.prompts import to_pixels
    from tests.tiny_deepgen import VLM_TEXT, VLM_VISION
    from tests.tiny_models import build_qwen_tokenizer, qwen_text_vocab_size, qwen_token_ids
    from PIL import Image

    hidden = args.vlm_hidden
    ids = qwen_token_ids()
    config = Qwen2_5_VLConfig(
        text_config=dict(VLM_TEXT, hidden_size=hidden, intermediate_size=hidden * 4, num_attention_heads=hidden // 64,
                         num_key_value_heads=2, vocab_size=qwen_text_vocab_size(),
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}),
        vision_config=dict(VLM_VISION, hidden_size=256, num_heads=4, intermediate_size=512, out_hidden_size=hidden),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    vlm = Qwen2_5_VLForConditionalGeneration(config).eval()
    tok = build_qwen_tokenizer()
    bridge = DeepGenBridge(BridgeConfig(**dict(BRIDGE_FULL, llm_hidden=hidden, hidden=512, intermediate=1536,
                                               num_heads=8, pooled_dim=256, joint_dim=256))).eval()
    prompt = "a watercolor painting of a lighthouse on a rocky coast at sunset, seagulls"
    image = Image.new("RGB", (512, 512), (120, 140, 200))
    refs = [to_pixels(image, (512, 512))]
    res = interleaved({"t2i": lambda: encode(vlm, tok, bridge, [prompt], [""]),
                       "edit": lambda: encode(vlm, tok, bridge, ["make it night"], [""], refs)}, args.repeats)
    n = sum(p.numel() for p in vlm.parameters()) / 1e6
    print(f"text encoding (random {n:.0f}M-param 36-layer Qwen2.5-VL, hidden {hidden}, 128 queries): "
          f"T2I {res['t2i'][0] * 1e3:.0f} ms, edit with one 512x512 reference (ViT 448) {res['edit'][0] * 1e3:.0f} ms "
          "(prompt + negative in one batch)")


def bench_gpu(args) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.hooks import apply_group_offloading, apply_layerwise_casting

    from gentor.modeling.deepgen.sampling import denoise, generator, initial_noise
    from gentor.modeling.deepgen.transformer import DeepGenTransformer

    torch.set_grad_enabled(False)
    dev = torch.device("cuda")
    results = []
    for mode in ("bf16", "fp8", "fp8+block"):
        torch.cuda.empty_cache()
        with torch.device("meta"):
            dit = DeepGenTransformer(**SD35M)
        dit = dit.to_empty(device="cpu").to(torch.bfloat16).eval()
        for p in dit.parameters():
            p.data.normal_(0, 0.02)
        if mode != "bf16":
            apply_layerwise_casting(dit, storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16,
                                    skip_modules_pattern=("pos_embed", "patch_embed", "norm", "embed", "^proj_out$"))
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        if mode == "fp8+block":
            apply_group_offloading(dit, onload_device=dev, offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1, use_stream=True)
        else:
            dit.to(dev)
        g = torch.Generator().manual_seed(0)
        pos = (torch.randn(1, 128 + PROMPT_TOKENS, 4096, generator=g).to(dev), torch.randn(1, 2048, generator=g).to(dev))
        neg = (torch.randn(1, 128 + 14, 4096, generator=g).to(dev), torch.randn(1, 2048, generator=g).to(dev))
        neg = (torch.nn.functional.pad(neg[0], (0, 0, pos[0].shape[1] - neg[0].shape[1], 0)), neg[1])
        x0 = initial_noise(generator(0), 1, 512, 512).to(dev)
        denoise(dit, FlowMatchEulerDiscreteScheduler(shift=3.0), x0, pos, neg, [], 2, 4.0)
        torch.cuda.synchronize()
        t = time.perf_counter()
        denoise(dit, FlowMatchEulerDiscreteScheduler(shift=3.0), x0, pos, neg, [], args.steps, 4.0)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**30
        results.append((mode, dt, peak))
        del dit
    for mode, dt, peak in results:
        print(f"DiT SD3.5-M 512x512 {args.steps} steps CFG: {mode:10s} {dt:6.2f} s/image, peak VRAM {peak:5.2f} GiB")


def bench_load(args) -> None:
    """Write a mid-size DeepGen checkpoint (safetensors form) next to the tiny folders, then load it with FP8
    storage in a child process and compare its peak RSS growth with resting bytes + largest file."""
    import json
    import subprocess
    import tempfile

    from safetensors.torch import save_file

    from tests import tiny_deepgen as tiny

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny.write(root)
        folder = root / tiny.DEEPGEN_FOLDER / tiny.CHECKPOINT_FOLDER
        ours, _, cfg = mid_dit(args.layers, torch.float32, "cpu")
        config = json.loads((folder / "transformer" / "config.json").read_text())
        config.update({k: v for k, v in cfg.items() if k != "dual_attention_layers"},
                      dual_attention_layers=list(cfg["dual_attention_layers"]))
        mid = root / tiny.DEEPGEN_FOLDER / "mid"
        (mid / "transformer").mkdir(parents=True)
        for part in ("vae", "scheduler"):
            import shutil  # noqa: PLC0415

            shutil.copytree(folder / part, mid / part)
        (mid / "transformer" / "config.json").write_text(json.dumps(config))
        bridge = tiny.bridge_state()
        bridge["projector_2.weight"] = torch.randn(cfg["pooled_projection_dim"], tiny.BRIDGE["hidden"])
        bridge["projector_2.bias"] = torch.randn(cfg["pooled_projection_dim"])
        bridge["projector_3.weight"] = torch.randn(cfg["joint_attention_dim"], tiny.BRIDGE["hidden"])
        bridge["projector_3.bias"] = torch.randn(cfg["joint_attention_dim"])
        state = {**bridge, **{f"transformer.{k}": v.contiguous() for k, v in ours.state_dict().items()}}
        save_file(state, str(mid / "model.safetensors"))
        del ours, state
        child = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
import importlib.util
spec = importlib.util.spec_from_file_location("gentor", {str(ROOT / "__init__.py")!r}, submodule_search_locations=[{str(ROOT)!r}])
m = importlib.util.module_from_spec(spec); sys.modules["gentor"] = m; spec.loader.exec_module(m)
from gentor import glue
from gentor.loaders import deepgen as loader
from gentor.loaders.cache import CACHE
from gentor.loaders.memory import MemoryOptions, resolve
import diffusers, transformers, peft, accelerate
glue.set_fallback_roots("deepgen", [{str(root / tiny.DEEPGEN_FOLDER)!r}])
glue.set_fallback_roots("vlm", [{str(root / tiny.VLM_FOLDER)!r}])
h = loader.load_handle("mid/model.safetensors", "mid", {tiny.VLM_NAME!r}, MemoryOptions(weight_dtype="fp8_e4m3fn", compute_dtype="bf16"))
import gc, threading, time, psutil
gc.collect()
proc = psutil.Process()
base = proc.memory_info().rss
peak = [base]
done = threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.002)
t = threading.Thread(target=watch); t.start()
with CACHE.session() as s:
    comps = loader.load_components(h, resolve(h.memory, torch.device("cpu")), s)
    done.set(); t.join()
    peak = peak[0]
    resting = sum(comps[r].nbytes for r in ("transformer", "bridge", "vae", "vlm"))
    dit = comps["transformer"].nbytes
print(peak - base, resting, dit)
"""
        out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
        grow, resting, dit = (int(x) for x in out.stdout.split()[-3:])
        largest = (mid / "model.safetensors").stat().st_size
        print(f"FP8 load of a {largest / 1e6:.0f} MB checkpoint (DiT {dit / 1e6:.0f} MB resting in FP8): peak RSS growth "
              "(sampled every 2 ms) "
              f"{grow / 1e6:.0f} MB vs resting {resting / 1e6:.0f} MB + largest file {largest / 1e6:.0f} MB = "
              f"{(resting + largest) / 1e6:.0f} MB ({'within' if grow <= resting + largest else 'ABOVE'} the bound)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--load", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--vlm-hidden", type=int, default=256)
    args = parser.parse_args()
    import_pack()
    if args.gpu:
        args.steps = max(args.steps, 50)
        bench_gpu(args)
    elif args.load:
        bench_load(args)
    else:
        bench_cpu(args)


if __name__ == "__main__":
    main()
