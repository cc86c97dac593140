"""Emu3.5 benchmarks: cached two-branch decoding vs an uncached loop and HF ``generate``, the CFG branch's
cost, the IBQ quantiser's memory, peak host RAM while loading.

CPU (default): a mid-size random Emu3.5-shaped decoder (real vocabulary of 282,926 ids, so the head and
the logits processing cost what they cost), a fixed image of ``--rows x --cols`` tokens:

    python benchmarks/bench_emu35.py [--layers 4 --hidden 512 --rows 4 --cols 8 --repeats 3]

- tokens/s of our generator: ``batched`` (both CFG branches in one forward per token, the default),
  ``static`` (the same over a fixed-size StaticCache: the GPU path that can be compiled),
  ``separate`` (two cached forwards), ``uncached`` (full recomputation), HF ``generate`` with the same
  processing in a LogitsProcessor whose unconditional branch keeps its own cache (as the official
  code does), and a single branch (no CFG) for the CFG cost ratio (target <= 1.3x when batched);
  ``linearhead`` repeats batched and single with the LM head as a plain ``F.linear`` (the form before
  ``VocabHead``) in the same process, so the ratio before/after is measured on one machine state;
- parts: milliseconds per decode step of the decoder layers, the head (both forms) and the logits
  processing for 1 row vs 2 rows, i.e. where the second branch costs what it costs;
- cache: appending one position to one layer's K/V of both rows at the released KV shape after
  ``--cache-lengths`` positions, transformers' ``DynamicLayer`` (``torch.cat``) vs our ``AppendLayer``;
- quantiser: peak RSS of the naive ``einsum`` + argmax ([B, n_codes, h, w] scores) vs our chunked
  argmax at ``--latent`` x ``--latent`` with 131,072 codes (each in a fresh process);
- load: peak RSS above the baseline while streaming a random checkpoint into bf16 / FP8 vs its
  resting bytes and its file size.

GPU (``--device cuda``, ``--preset 34b``): the released shape (64 layers, 5120 hidden, 64/8 heads,
25600 MLP) with random weights built on the GPU; seconds for a 64x64-token image (4,160 tokens) with
CFG. Published: 512 s naive, 120 s optimised, bandwidth floor ~42 s FP8 / 85 s bf16 on an H100.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
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

VOCAB = 282926
CODES = 131072
PRESET_34B = dict(hidden=5120, layers=64, heads=64, kv_heads=8, inter=25600, head_dim=128)
PROMPT_TOKENS = 64


def import_pack():
    if "gentor" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("gentor", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["gentor"] = module
    spec.loader.exec_module(module)


def emu_config(a) -> dict:
    return {"model_type": "Emu3", "vocab_size": VOCAB, "hidden_size": a.hidden, "intermediate_size": a.inter,
            "num_hidden_layers": a.layers, "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads,
            "head_dim": a.head_dim, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False}


def build_model(a, device: torch.device, dtype: torch.dtype):
    from gentor.modeling.emu35.decoder import build_decoder, qwen3_config

    torch.manual_seed(0)
    with torch.device(device):
        model = build_decoder(qwen3_config(emu_config(a))).to(dtype)
    return model.eval().requires_grad_(False)


def hf_processor(model, uncond: list[int], params, grid, device):
    """Our processing as an HF LogitsProcessor; the unconditional branch is run inside with its own cache."""
    from transformers import DynamicCache, LogitsProcessor

    from gentor.modeling.emu35 import tokens as T
    from gentor.modeling.emu35.logits import VISUAL, Structure, process

    class Proc(LogitsProcessor):
        def __init__(self):
            self.state, self.seen, self.cache, self.ulogits = Structure(grid), 0, None, None
            self.uncond = list(uncond)

        def __call__(self, input_ids, scores):
            ids = input_ids[0].tolist()
            for tok in ids[max(self.seen, len(ids) - 1):] if self.seen else ids[-1:]:
                self.state.advance(tok)
                if self.state.image_mode or tok == T.EOI:
                    self.uncond.append(tok)
                    feed = self.uncond if self.cache is None else self.uncond[-1:]
                    self.cache = self.cache or DynamicCache(config=model.config)
                    out = model(input_ids=torch.tensor([feed], device=device), past_key_values=self.cache,
                                use_cache=True, logits_to_keep=1)
                    self.ulogits = out.logits[0, -1].float()
            self.seen = len(ids)
            rule = self.state.rule()
            return process(rule, scores[0], self.ulogits if rule[0] == VISUAL else None, params)[None]

    return Proc()


def bench_decode(a) -> dict:
    from transformers import GenerationConfig, LogitsProcessorList

    from gentor.modeling.emu35 import tokens as T
    from gentor.modeling.emu35.generate import generate
    from gentor.modeling.emu35.image_tokens import tokens_needed
    from gentor.modeling.emu35.logits import SamplingParams

    device = torch.device(a.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    model = build_model(a, device, dtype)
    grid = (a.rows, a.cols)
    gen = torch.Generator().manual_seed(1)
    cond = [T.BOS] + torch.randint(0, 150000, (PROMPT_TOKENS,), generator=gen).tolist() + [T.BOI]
    unc = [T.BOS] + torch.randint(0, 150000, (PROMPT_TOKENS // 2,), generator=gen).tolist()
    params = SamplingParams(cfg=5.0)
    n = tokens_needed(grid, boi_in_prompt=True)

    def ours(mode):
        return lambda: generate(model, cond, unc, params, seed=0, max_new_tokens=n, grid=grid, mode=mode,
                                device=device).tokens

    def single():  # the same generator and processing without the guidance branch: the CFG cost baseline
        return generate(model, cond, None, params, seed=0, max_new_tokens=n, grid=grid, device=device).tokens

    def hf():
        proc = hf_processor(model, unc, params, grid, device)
        cfg = GenerationConfig(do_sample=True, top_k=0, top_p=1.0, max_new_tokens=n, pad_token_id=T.PAD,
                               eos_token_id=T.EOS, use_cache=True)
        return model.generate(torch.tensor([cond], device=device), cfg,
                              logits_processor=LogitsProcessorList([proc])).shape[1] - len(cond)

    fns = {"batched": ours("batched"), "separate": ours("separate"), "static cache": ours("static"),
           "single branch": single, "hf generate": hf, "uncached": ours("uncached")}
    fns = {k: v for k, v in fns.items() if k.split()[0] in a.modes}
    if "linearhead" in a.modes:  # the head as it was before VocabHead: plain F.linear (same process, same weights)
        fns["batched, F.linear head"] = plain_head(model, ours("batched"))
        fns["single branch, F.linear head"] = plain_head(model, single)
    times = {k: [] for k in fns}
    tokens = {}
    with torch.no_grad():
        for k in fns if a.warmup else ():  # first-call overheads out of the timings
            fns[k]()
        for _ in range(a.repeats):  # interleaved, so that a busy machine slows every mode alike
            for k, fn in fns.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                tokens[k] = fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"tokens": n, "seconds": med, "tokens_per_s": {k: n / v for k, v in med.items()}}
    if "batched, F.linear head" in tokens and "batched" in tokens:
        out["same_tokens_with_either_head"] = tokens["batched"] == tokens["batched, F.linear head"]
    return out


def plain_head(model, fn):
    """``fn`` run with the LM head computed by ``nn.Linear.forward`` (the form before VocabHead)."""
    from gentor.modeling.emu35.decoder import VocabHead

    def run():
        model.lm_head.__class__ = torch.nn.Linear
        try:
            return fn()
        finally:
            model.lm_head.__class__ = VocabHead

    return run


def bench_parts(a) -> dict:
    """Milliseconds per decode step of each part, for 1 row (no CFG) and 2 rows (both CFG branches batched)."""
    from transformers import DynamicCache

    from gentor.modeling.emu35 import tokens as T
    from gentor.modeling.emu35.logits import VISUAL, SamplingParams, process

    device = torch.device(a.device)
    model = build_model(a, device, {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype])
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 150000, (2, PROMPT_TOKENS), generator=gen).to(device)
    steps = a.rows * (a.cols + 1)
    params = SamplingParams(cfg=5.0)
    parts: dict[str, dict[str, float]] = {}

    def clock(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    with torch.no_grad():
        for rows in (1, 2):
            cache = DynamicCache(config=model.config)
            model.model(input_ids=prompt[:rows], past_key_values=cache, use_cache=True)
            acc = {"layers": [], "head (VocabHead)": [], "head (F.linear)": [], "logits processing": []}
            token = torch.full((rows, 1), T.BOV + 1, device=device)
            for _ in range(steps):
                box = {}
                acc["layers"].append(clock(lambda: box.update(h=model.model(
                    input_ids=token, past_key_values=cache, use_cache=True).last_hidden_state)))
                acc["head (VocabHead)"].append(clock(lambda: box.update(logits=model.lm_head(box["h"])[:, -1].float())))
                acc["head (F.linear)"].append(clock(lambda: torch.nn.functional.linear(box["h"], model.lm_head.weight)))
                acc["logits processing"].append(clock(lambda: process(
                    (VISUAL, None), box["logits"][0], box["logits"][1] if rows == 2 else None, params)))
            parts[f"{rows} row{'s' if rows > 1 else ''}"] = {k: 1000 * statistics.median(v) for k, v in acc.items()}
    one, two = parts["1 row"], parts["2 rows"]
    parts["2 rows / 1 row"] = {k: two[k] / one[k] for k in one}
    return parts


def bench_cache(a) -> dict:
    """Milliseconds per decode step to append one position to one layer's K/V at the released KV shape
    (8 heads x 128, 2 rows = both CFG branches) after L positions: transformers' DynamicLayer (torch.cat,
    copies the whole cache) vs AppendLayer (in place); x64 layers is the per-token cost."""
    from transformers.cache_utils import DynamicLayer

    from gentor.modeling.emu35.kv_cache import append_layer

    device = torch.device(a.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    out = {}
    for length in a.cache_lengths:
        kv = [torch.randn(2, PRESET_34B["kv_heads"], length, PRESET_34B["head_dim"], device=device, dtype=dtype)
              for _ in range(2)]
        new = [torch.randn(2, PRESET_34B["kv_heads"], 1, PRESET_34B["head_dim"], device=device, dtype=dtype)
               for _ in range(2)]
        row = {}
        for name, layer in (("DynamicLayer (cat)", DynamicLayer()), ("AppendLayer", append_layer(length + 64))):
            layer.update(*kv)
            times = []
            for _ in range(32):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                layer.update(*new)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            row[name] = 1000 * statistics.median(times)
        out[f"L={length}"] = row
    return out


QUANT_CHILD = """
import resource, sys, torch, importlib.util
from pathlib import Path
root = Path(sys.argv[1]); mode = sys.argv[2]; side = int(sys.argv[3])
spec = importlib.util.spec_from_file_location("gentor", root / "__init__.py", submodule_search_locations=[str(root)])
m = importlib.util.module_from_spec(spec); sys.modules["gentor"] = m; spec.loader.exec_module(m)
from gentor.modeling.emu35.ibq import Quantizer
torch.manual_seed(0)
q = Quantizer(131072, 256)
z = torch.randn(1, 256, side, side)
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
base = hwm()
import time; t = time.perf_counter()
if mode == "naive":
    codes = torch.einsum("bdhw,nd->bnhw", z, q.embedding.weight).argmax(1)
else:
    codes = q.codes(z)
dt = time.perf_counter() - t
print(hwm() - base, dt, int((codes * torch.arange(codes.numel()).view_as(codes)).sum()))
"""


def bench_quantiser(a) -> dict:
    out = {}
    for mode in ("naive", "chunked"):
        res = subprocess.run([sys.executable, "-c", QUANT_CHILD, str(ROOT), mode, str(a.latent)], capture_output=True,
                             text=True, check=True)
        kb, secs, checksum = res.stdout.split()
        out[mode] = {"peak_rss_mb": int(kb) / 1024, "seconds": float(secs), "checksum": int(checksum)}
    out["same_codes"] = out["naive"]["checksum"] == out["chunked"]["checksum"]
    return out


LOAD_CHILD = """
import resource, sys, json, torch, importlib.util
from pathlib import Path
root, folder, dtype = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
spec = importlib.util.spec_from_file_location("gentor", root / "__init__.py", submodule_search_locations=[str(root)])
m = importlib.util.module_from_spec(spec); sys.modules["gentor"] = m; spec.loader.exec_module(m)
from gentor.loaders import emu35 as L
from gentor.loaders.memory import Precision
from gentor.registry import get
import transformers.models.qwen3.modeling_qwen3, accelerate, diffusers.hooks  # imports out of the measurement
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
base = hwm()
prec = Precision(torch.float8_e4m3fn, torch.bfloat16) if dtype == "fp8" else Precision(torch.bfloat16, torch.bfloat16)
model = L.load_llm(folder, prec, get("emu35").fp8_skip)
rest = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"peak_above_baseline_mb": (hwm() - base) / 1024,
                  "resting_mb": rest / 2**20}))
"""


def bench_load(a) -> dict:
    from safetensors.torch import save_file

    from tests.tiny_emu35 import llm_shapes

    cfg = emu_config(a)
    cfg.update(head_dim=a.head_dim)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.json").write_text(json.dumps(cfg))
        shapes = llm_shapes(cfg)
        sd = {k: torch.randn(s, dtype=torch.bfloat16) * 0.02 for k, s in shapes.items()}
        save_file(sd, str(folder / "model.safetensors"))
        file_mb = (folder / "model.safetensors").stat().st_size / 2**20
        del sd
        for dtype in ("bf16", "fp8"):
            res = subprocess.run([sys.executable, "-c", LOAD_CHILD, str(ROOT), str(folder), dtype],
                                 capture_output=True, text=True, check=True)
            out[dtype] = json.loads(res.stdout.strip().splitlines()[-1])
        out["file_mb"] = file_mb
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_emu35.py")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--preset", choices=("34b",), default=None)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", dest="kv_heads", type=int, default=2)
    p.add_argument("--inter", type=int, default=1536)
    p.add_argument("--head-dim", dest="head_dim", type=int, default=64)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--cols", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--latent", type=int, default=32, help="quantiser test: latent side (tokens)")
    p.add_argument("--modes", default="batched,separate,static,single,linearhead,hf,uncached",
                   help="comma-separated subset of batched, separate, single, linearhead (batched and single with "
                        "the head as a plain F.linear: the form before VocabHead), hf, uncached")
    p.add_argument("--warmup", type=int, default=1, help="0: no warm-up run")
    p.add_argument("--cache-lengths", dest="cache_lengths", default="4096,16384",
                   help="cache part: positions already cached (comma-separated)")
    p.add_argument("--only", choices=("decode", "parts", "cache", "quantiser", "load"), action="append")
    a = p.parse_args(argv)
    a.modes = a.modes.split(",")
    a.cache_lengths = [int(x) for x in a.cache_lengths.split(",")]
    if a.preset == "34b":
        for k, v in PRESET_34B.items():
            setattr(a, k, v)
    import_pack()
    parts = a.only or ["decode", "parts", "cache", "quantiser", "load"]
    report = {"shape": {k: getattr(a, k) for k in ("layers", "hidden", "heads", "kv_heads", "inter", "head_dim")},
              "device": a.device, "dtype": a.dtype, "torch_threads": torch.get_num_threads(),
              "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)")}
    if "decode" in parts:
        d = bench_decode(a)
        report["decode"] = d
        s = d["seconds"]
        if "batched" in s:
            for key, other in (("cfg_cost_batched_vs_single", "single branch"), ("uncached_vs_batched", "uncached"),
                               ("hf_generate_vs_batched", "hf generate"), ("separate_vs_batched", "separate")):
                if other in s:
                    report[key] = (s["batched"] / s[other]) if key.startswith("cfg") else s[other] / s["batched"]
        if "batched, F.linear head" in s:
            report["cfg_cost_batched_vs_single_with_F.linear_head"] = (s["batched, F.linear head"]
                                                                       / s["single branch, F.linear head"])
        print(json.dumps({"decode": report["decode"]}), flush=True)  # each part as soon as it is done
    if "parts" in parts:
        report["parts_ms_per_step"] = bench_parts(a)
        print(json.dumps({"parts_ms_per_step": report["parts_ms_per_step"]}), flush=True)
    if "cache" in parts:
        report["kv_append_ms_per_layer_and_step"] = bench_cache(a)
        print(json.dumps({"kv_append_ms_per_layer_and_step": report["kv_append_ms_per_layer_and_step"]}), flush=True)
    if "quantiser" in parts:
        report["quantiser"] = bench_quantiser(a)
        print(json.dumps({"quantiser": report["quantiser"]}), flush=True)
    if "load" in parts:
        report["load"] = bench_load(a)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
