"""BAGEL benchmarks: packed KV cache vs recomputing the context, think tokens/s, FP8 load RAM, GPU runs.

CPU (default, random weights at a mid size): per flow step, our MoT forward against the cached context
vs rebuilding that context every step (VAE encode + ViT + LLM over the reference image and the
instruction, then the same step) — the cache must win; think decoding tokens/s with the cache.

    python benchmarks/bench_bagel.py [--hidden 512 --layers 4 --image 256 --steps 4 --tokens 32]

Load RAM (``--load-ram``): a random ema.safetensors of ~--params-m million parameters loaded through
the pack's streaming loader with FP8 storage in a fresh subprocess; prints peak RSS above baseline vs
resting bytes + the largest tensor (DESIGN.md §5).

GPU (``--gpu``, full size with random weights; speed does not depend on values): seconds per 1024x1024
T2I (50 steps, cfg_text 4, T2I defaults) and peak VRAM for bf16 resident, FP8 storage, FP8 + block
offload. Published: 36 s on an A100 (a user, notebook), ~5 s on an H800 (maintainers); target <= 12 s on
an H100/H200, <= 24 GB with FP8, <= 12 GB with FP8 + block offload.

    python benchmarks/bench_bagel.py --gpu [--modes bf16,fp8,fp8_block] [--steps 50] [--size 1024]

Official check (``--official DIR``, DIR = a checkout of github.com/ByteDance-Seed/Bagel): the official
modeling code and ours on the same tiny weights in fp32 — autoencoder, ViT, prefill KV caches, one
velocity per CFG branch, 4-step images for every renorm type, greedy think/understanding text. The
official files are copied to a temp folder with their hard-coded bf16 casts set to fp32; flash-attn is
replaced by a naive varlen attention written here, cv2 by an empty module, and transformers 5's missing
'default' RoPE init is supplied. Nothing of it is imported by the pack.

    python benchmarks/bench_bagel.py --official ~/src/Bagel
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FULL_LLM = {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4, "rope_theta": 1e6, "rms_norm_eps": 1e-6}
FULL_VIT = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
            "patch_size": 14, "image_size": 980}
BLOCKS = ("language_model.model.layers", "vit_model.vision_model.encoder.layers")
FP8_SKIP = ("pos_embed", "patch_embed", "norm", "embed", "lm_head", "vae2llm", "llm2vae", "connector")
PROMPT = "a photo of a red fox sitting in fresh snow, golden hour light"


def import_pack():
    if "gentor" in sys.modules:
        return sys.modules["gentor"]
    spec = importlib.util.spec_from_file_location("gentor", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["gentor"] = module
    spec.loader.exec_module(module)
    return module


def modeling():
    import_pack()
    return importlib.import_module("gentor.modeling.bagel")


def tokenizer():
    from tests import tiny_models

    return tiny_models.build_qwen_tokenizer()


def mid_config(args):
    mb = modeling()
    heads = max(2, args.hidden // 64)
    llm = mb.LLMConfig(vocab_size=2048, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                       num_layers=args.layers, num_heads=heads, num_kv_heads=max(1, heads // 4))
    vit = mb.ViTConfig(hidden_size=args.hidden // 2, intermediate_size=args.hidden * 2, num_layers=args.layers,
                       num_heads=max(2, heads // 2))
    return mb.BagelConfig(llm, vit, mb.AEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1))


def random_init(module: torch.nn.Module, std: float = 0.02) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cpu_bench(args) -> None:
    from PIL import Image

    mb = modeling()
    pre = importlib.import_module("gentor.modeling.bagel.preprocess")
    cfg = mid_config(args)
    torch.manual_seed(0)
    model, ae = mb.Bagel(cfg).eval(), mb.AutoEncoder(cfg.ae).eval()
    random_init(model)
    side = args.image
    engine = mb.BagelEngine(model, ae, tokenizer(), pre.ResizeRule(side, side // 2, 16),
                            pre.ResizeRule(side - side % 14, side // 4, 14))
    image = Image.radial_gradient("L").convert("RGB").resize((side, side))
    inputs = [image, PROMPT]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ctx = engine.build_contexts(inputs, gen, (side, side))
        n = (side // 16) ** 2
        x = torch.randn(n, 64, generator=gen)

        def cached():
            engine.velocity(ctx.gen, x, side, side, 0.5)

        def recomputed():
            fresh = engine.build_contexts(inputs, torch.Generator().manual_seed(0), (side, side))
            engine.velocity(fresh.gen, x, side, side, 0.5)

        cached()
        t_cache, t_full = timed(cached, args.steps), timed(recomputed, args.steps)
        print(f"context {ctx.gen.length} tokens, query {n + 2} tokens, {sum(p.numel() for p in model.parameters())/1e6:.0f} M params")
        print(f"per step: cached {t_cache * 1000:.1f} ms, recomputed context {t_full * 1000:.1f} ms, "
              f"ratio {t_full / t_cache:.2f}x (cache must win: > 1)")

        def think_cached():
            engine.generate_text(ctx.gen, args.tokens)

        t = timed(think_cached, 1)
        print(f"think decoding with the cache: {args.tokens / t:.1f} tokens/s ({args.tokens} tokens)")


def load_ram(args) -> None:
    """Write a random checkpoint, then measure loading it in a fresh process (peak RSS)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        child = [sys.executable, __file__, "--load-child", str(folder), "--hidden", str(args.hidden),
                 "--layers", str(args.layers)]
        subprocess.run(child + ["--write"], check=True)
        out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
        print(out.strip())


def load_child(args) -> None:
    mb = modeling()
    from safetensors.torch import save_file

    folder = Path(args.load_child)
    cfg = mid_config(args)
    if args.write:
        torch.manual_seed(0)
        model = mb.Bagel(cfg).to(torch.bfloat16)
        random_init(model)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "ema.safetensors"))
        return
    streaming = importlib.import_module("gentor.loaders.streaming")
    memory = importlib.import_module("gentor.loaders.memory")
    import accelerate  # noqa: F401  (imports the loader needs, outside the measurement)
    import diffusers.hooks  # noqa: F401

    with torch.device("meta"):
        mb.Bagel(cfg)  # warm up module construction code paths
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    precision = memory.Precision(torch.float8_e4m3fn, torch.bfloat16)
    model = streaming.load_module(lambda: mb.Bagel(cfg), precision, FP8_SKIP, files=[folder / "ema.safetensors"],
                                  display="BAGEL", component="model")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    resting = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    largest = max(t.numel() * 2 for t in model.state_dict().values())
    file_mb = (folder / "ema.safetensors").stat().st_size / 1e6
    print(json.dumps({"file_MB": round(file_mb), "resting_MB": round(resting / 1e6),
                      "largest_tensor_bf16_MB": round(largest / 1e6), "peak_rss_above_baseline_MB": round(peak / 1e6)}))


def gpu_bench(args) -> None:
    mb = modeling()
    placement = importlib.import_module("gentor.loaders.placement")
    device = torch.device("cuda")
    cfg = mb.BagelConfig(mb.LLMConfig.from_dict(FULL_LLM), mb.ViTConfig.from_dict(FULL_VIT))
    tok = tokenizer()
    flow = mb.FlowSettings(steps=args.steps, cfg_text=4.0, cfg_img=1.0, cfg_interval=(0.4, 1.0))
    for mode in args.modes.split(","):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        build_on = "cpu" if mode == "fp8_block" else device
        with torch.device(build_on):
            model = mb.Bagel(cfg).to(torch.bfloat16)
            ae = mb.AutoEncoder(cfg.ae).to(torch.bfloat16)
        random_init(model)
        ae.to(device)
        if mode.startswith("fp8"):
            from diffusers.hooks import apply_layerwise_casting

            apply_layerwise_casting(model, storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16,
                                    skip_modules_pattern=FP8_SKIP)
        if mode == "fp8_block":
            placement.apply_block_offload(model, BLOCKS, device, "BAGEL", "model")
        weights = torch.cuda.memory_allocated() / 1e9
        engine = mb.BagelEngine(model.eval(), ae.eval(), tok, device=device)
        side = args.size
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            torch.cuda.synchronize()
            t = time.perf_counter()
            ctx = engine.build_contexts([PROMPT], gen, (side, side))
            x = engine.generate_image(ctx, torch.randn((side // 16) ** 2, 64, generator=gen), flow)
            engine.decode(x, side, side)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated() / 1e9
        print(f"{mode:10s} {side}x{side} {args.steps} steps: {seconds:6.1f} s, weights on GPU {weights:5.1f} GB, "
              f"peak {peak:5.1f} GB")
        del engine, model, ae, ctx
        gc.collect()


def _official_shims(src: Path, dst: Path) -> None:
    """Copy the official code, fp32 instead of its hard-coded bf16 casts; stand-ins for flash-attn / cv2."""
    import math
    import shutil
    import types

    for name in ("modeling", "data", "inferencer.py"):
        (shutil.copytree if (src / name).is_dir() else shutil.copy)(src / name, dst / name)
    for rel in ("modeling/bagel/qwen2_navit.py", "modeling/bagel/siglip_navit.py", "modeling/bagel/bagel.py"):
        path = dst / rel
        path.write_text(path.read_text().replace("torch.bfloat16", "torch.float32"))

    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False, **_):
        outs = []
        for i in range(len(cu_seqlens_q) - 1):
            qs = q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]].float()
            ks = k[cu_seqlens_k[i]:cu_seqlens_k[i + 1]].float().repeat_interleave(q.shape[1] // k.shape[1], 1)
            vs = v[cu_seqlens_k[i]:cu_seqlens_k[i + 1]].float().repeat_interleave(q.shape[1] // k.shape[1], 1)
            scores = torch.einsum("qhd,khd->hqk", qs, ks) / math.sqrt(qs.shape[-1])
            if causal:  # bottom-right aligned, as flash-attn >= 2.1
                lq, lk = qs.shape[0], ks.shape[0]
                keep = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
                scores = scores.masked_fill(~keep, float("-inf"))
            outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs))
        return torch.cat(outs).to(q.dtype)

    import transformers.modeling_utils  # noqa: F401  (transformers probes flash_attn on import: before the stand-in)
    from transformers import modeling_rope_utils

    def default_rope(config, device=None, **_):
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0

    modeling_rope_utils.ROPE_INIT_FUNCTIONS.setdefault("default", default_rope)
    sys.modules["flash_attn"] = types.SimpleNamespace(flash_attn_varlen_func=varlen)
    sys.modules.setdefault("cv2", types.ModuleType("cv2"))
    sys.path.insert(0, str(dst))


def official_check(args) -> None:
    import copy

    import numpy as np
    from PIL import Image

    mb = modeling()
    from tests import tiny_bagel

    tmp = Path(tempfile.mkdtemp(prefix="bagel_official_"))
    folder = tiny_bagel.write(tmp / "models")[tiny_bagel.FOLDER]
    _official_shims(Path(args.official).expanduser(), tmp / "code")
    from data.data_utils import add_special_tokens, get_flattened_position_ids_extrapolate, patchify
    from data.transforms import ImageTransform
    from inferencer import InterleaveInferencer
    from modeling.autoencoder import AutoEncoder, AutoEncoderParams
    from modeling.bagel import Bagel, BagelConfig, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel
    from safetensors.torch import load_file

    pre = importlib.import_module("gentor.modeling.bagel.preprocess")
    llm = Qwen2Config.from_json_file(str(folder / "llm_config.json"))
    llm.qk_norm, llm.tie_word_embeddings, llm.layer_module, llm.freeze_und = True, False, "Qwen2MoTDecoderLayer", False
    vit = SiglipVisionConfig.from_json_file(str(folder / "vit_config.json"))
    vit.rope, vit.num_hidden_layers = False, vit.num_hidden_layers - 1
    t = tiny_bagel.AE_SIZES
    params = AutoEncoderParams(resolution=256, in_channels=3, downsample=8, ch=t["ch"], out_ch=3,
                               ch_mult=list(t["ch_mult"]), num_res_blocks=t["num_res_blocks"], z_channels=16,
                               scale_factor=0.3611, shift_factor=0.1159)
    oae = AutoEncoder(params).eval()
    oae.load_state_dict(load_file(str(folder / "ae.safetensors")), strict=True)
    cfg = BagelConfig(visual_gen=True, visual_und=True, llm_config=llm, vit_config=vit, vae_config=params,
                      vit_max_num_patch_per_side=70, connector_act="gelu_pytorch_tanh", latent_patch_size=2,
                      max_latent_size=64)
    om = Bagel(Qwen2ForCausalLM(llm), SiglipVisionModel(vit), cfg)
    om.vit_model.vision_model.embeddings.convert_conv2d_to_linear(vit)
    missing, unexpected = om.load_state_dict(load_file(str(folder / "ema.safetensors")), strict=False)
    print(f"official load of our tiny files: {len(missing)} missing, {len(unexpected)} unexpected keys")
    model, ae, tok = tiny_bagel.load_plain(folder)
    tok, new_ids, _ = add_special_tokens(tok)
    vae_t, vit_t = ImageTransform(64, 32, 16), ImageTransform(56, 28, 14)
    inf = InterleaveInferencer(om.eval(), oae, tok, vae_t, vit_t, new_ids)
    eng = mb.BagelEngine(model, ae, tok, pre.ResizeRule(64, 32, 16), pre.ResizeRule(56, 28, 14))

    def rel(a, b):
        return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8))
    img2 = Image.fromarray(rng.integers(0, 255, (56, 40, 3), dtype=np.uint8))
    with torch.no_grad():
        x = vae_t(img).unsqueeze(0)
        z = ae.encode(x, sample=False)
        print(f"autoencoder: encoder moments rel {rel(ae.encoder(x), oae.encoder(x)):.1e}, "
              f"decode rel {rel(ae.decode(z), oae.decode(z)):.1e}")
        pix = vit_t(vae_t.resize_transform(img))
        p, ids = patchify(pix, 14), get_flattened_position_ids_extrapolate(pix.shape[1], pix.shape[2], 14, 70)
        ref = om.vit_model(packed_pixel_values=p, packed_flattened_position_ids=ids,
                           cu_seqlens=torch.tensor([0, p.shape[0]], dtype=torch.int32), max_seqlen=p.shape[0])
        print(f"ViT features rel {rel(model.vit_model(p, ids, [p.shape[0]]), ref):.1e}")
        oae.reg.sample = False  # deterministic posterior on both sides for the context checks
        encode = ae.encode
        ae.encode = lambda x, generator=None, sample=True: encode(x, sample=False)
        for inputs in ([img, "make it blue"], ["a red fox"], [img, img2, "combine them"]):
            gen = inf.init_gen_context()
            cfg_text, cfg_img, shape = copy.deepcopy(gen), copy.deepcopy(gen), (32, 48)
            for term in inputs:
                if isinstance(term, str):
                    cfg_text = copy.deepcopy(gen)
                    gen, cfg_img = inf.update_context_text(term, gen), inf.update_context_text(term, cfg_img)
                else:
                    resized = vae_t.resize_transform(term)
                    gen = inf.update_context_image(resized, gen, vae=True)
                    shape, cfg_text = resized.size[::-1], copy.deepcopy(gen)
            ctx = eng.build_contexts(inputs, None, (32, 48))
            layers = range(len(ctx.gen.keys))
            kv = max(max(rel(ctx.gen.keys[i], gen["past_key_values"].key_cache[i]),
                         rel(ctx.gen.values[i], gen["past_key_values"].value_cache[i])) for i in layers)
            same = (ctx.gen.length, ctx.cfg_text.length, ctx.cfg_img.length) == \
                (gen["kv_lens"][0], cfg_text["kv_lens"][0], cfg_img["kv_lens"][0])
            worst = 0
            for renorm in mb.RENORM_TYPES:
                for interval in ((0.4, 1.0), (0.0, 1.0)):
                    torch.manual_seed(5)
                    noise = torch.randn((shape[0] // 16) * (shape[1] // 16), 64)
                    torch.manual_seed(5)  # the official draws the same noise from the global generator
                    theirs = inf.gen_image(shape, gen, cfg_text_scale=4.0, cfg_img_scale=2.0,
                                           cfg_text_precontext=cfg_text, cfg_img_precontext=cfg_img,
                                           cfg_interval=interval, cfg_renorm_min=0.0, cfg_renorm_type=renorm,
                                           num_timesteps=4, timestep_shift=3.0)
                    xs = eng.generate_image(ctx, noise, mb.FlowSettings(4, 4.0, 2.0, interval, renorm, 0.0, 3.0))
                    ours = (eng.decode(xs, *shape).permute(1, 2, 0) * 255).to(torch.uint8)
                    worst = max(worst, int((ours.int() - torch.from_numpy(np.asarray(theirs)).int()).abs().max()))
            text_same = inf.gen_text(gen, max_length=12, do_sample=False) == eng.generate_text(ctx.gen, 12)[0]
            print(f"{len(inputs) - 1} image(s): KV cache rel {kv:.1e}, context lengths equal {same}, 4-step images "
                  f"(3 renorm types x 2 intervals) max |uint8 diff| {worst}, greedy text identical {text_same}")
        for und in (True, False):
            inputs = [img, "what is it?"] if und else ["a cat"]
            theirs = inf.interleave_inference(inputs, think=True, understanding_output=und, max_think_token_n=10,
                                              do_sample=False, num_timesteps=2, image_shapes=(32, 32))[0]
            ctx = eng.build_contexts(inputs, None, (32, 32), think=True, understanding=und)
            print(f"think text with the {'understanding' if und else 'generation'} system prompt identical: "
                  f"{theirs == eng.generate_text(ctx.gen, 10)[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--image", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--load-ram", action="store_true")
    parser.add_argument("--load-child", default="")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--modes", default="bf16,fp8,fp8_block")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--official", default="", help="a checkout of ByteDance-Seed/Bagel to compare against")
    args = parser.parse_args()
    if args.official:
        official_check(args)
    elif args.load_child:
        load_child(args)
    elif args.load_ram:
        load_ram(args)
    elif args.gpu:
        if args.steps == 4:
            args.steps = 50
        gpu_bench(args)
    else:
        cpu_bench(args)


if __name__ == "__main__":
    main()
