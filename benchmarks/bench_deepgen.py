"""DeepGen benchmarks: our DiT loop vs diffusers' SD3 transformer, text-encoding time, GPU memory/speed.

CPU (default): a mid-size random SD3 transformer; per-step time of our sampling loop (dynamic forward,
CFG batch, Euler) vs the same loop calling diffusers' ``SD3Transformer2DModel`` directly on identical
weights (target ratio <= 1.05; outputs must agree), the edit step with one reference, and the VLM
pass (prompt + meta queries + six-layer bridge) on a mid-size random 36-layer Qwen2.5-VL.

    python benchmarks/bench_deepgen.py [--repeats 3] [--size 128] [--layers 4]

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true")
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
    else:
        bench_cpu(args)


if __name__ == "__main__":
    main()
