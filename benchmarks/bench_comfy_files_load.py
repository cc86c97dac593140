"""Load-memory benchmark for Comfy-format single files (issue 19 part 3): peak host RAM while loading.

Writes a random mid-size Qwen-Image transformer (default 32 layers x 768 wide, ~1.36 GB bf16) as ONE Comfy-style
file per form (bf16, scaled FP8 with per-layer ``weight_scale``, GGUF Q8_0 / Q4_0 through the gguf package's
writer in tests/tiny_comfy_gguf.py), then loads each in a FRESH subprocess through
``loaders.qwen_image_files.load_transformer`` and reports the peak RSS above the child's baseline (VmHWM reset at
the baseline, and a sampling thread), the RSS after the load and the resting bytes. The ``qwen21_*`` forms are a
Qwen-Image 2.1 transformer in Comfy-Org's layout (fused ``img_mlp.gate_up``, split back while streaming by
``loaders.qwen_image21_files.load_transformer``; ``--layers21`` blocks of the same width):

Target: peak <= resting + one read window (64 MB), after <= 1.1 x resting, no model file mapped afterwards.

    python benchmarks/bench_comfy_files_load.py [--layers 32] [--heads 6] [--forms bf16 fp8_scaled Q8_0 Q4_0
        qwen21_bf16 qwen21_Q8_0] [--layers21 72]
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.bench_streaming_load import MB, import_pack, measure_load, run_script, write_model  # noqa: E402

FORMS = ("bf16", "fp8_scaled", "Q8_0", "Q4_0")
FORMS21 = ("qwen21_bf16", "qwen21_Q8_0")
TARGET_AFTER = 1.1


def file_name(form: str) -> str:
    stem = "qwen_image_2.1" if form.startswith("qwen21_") else "qwen_image"
    form = form.removeprefix("qwen21_")
    return f"{stem}_{form}.safetensors" if form in ("bf16", "fp8_scaled") else f"{stem}-{form}.gguf"


def write_files21(out: Path, layers: int, heads: int, forms: list[str]) -> dict[str, Path]:
    """A random 2.1 transformer (head 128, ``heads`` heads, the kit's text width) in Comfy-Org's fused layout."""
    import diffusers
    import torch

    from tests import tiny_comfy, tiny_comfy21, tiny_comfy_sized
    from tests.tiny_comfy_gguf import write_gguf

    cfg = dict(tiny_comfy21.TRANSFORMER_CONFIG, num_layers=layers, num_attention_heads=heads)
    model = tiny_comfy_sized._on_meta(lambda: diffusers.QwenImage21Transformer2DModel(**cfg))
    fused = tiny_comfy21.fuse_gate_up(tiny_comfy_sized.random_state_dict(model, 0, torch.bfloat16))
    paths = {}
    for form in forms:
        path = out / file_name(form)
        if form == "qwen21_bf16":
            paths[form] = tiny_comfy._save(fused, path)
        else:
            paths[form] = write_gguf(fused, path, form.removeprefix("qwen21_"), arch=tiny_comfy21.GGUF_ARCH)
        gc.collect()
    return paths


def write_files(out: Path, layers: int, heads: int, forms: list[str]) -> dict[str, Path]:
    """The folder (written shard by shard), then each Comfy form written by the test kit's producers."""
    from tests import tiny_comfy
    from tests.tiny_comfy_gguf import write_gguf

    folder = out / "folder"
    (folder / "transformer").mkdir(parents=True, exist_ok=True)
    write_model(folder / "transformer", layers, heads, 512, single=False)
    paths = {}
    for form in forms:
        if form in ("bf16", "fp8_scaled"):
            paths[form] = tiny_comfy.write_transformer_file(folder, out / f"qwen_image_{form}.safetensors", form)
        else:
            paths[form] = write_gguf(tiny_comfy.read_component(folder, "transformer"), out / f"qwen_image-{form}.gguf",
                                     form)
        gc.collect()
    return paths


def child(path: Path, warm: Path | None = None) -> dict:
    import torch

    import_pack()
    from gentor.loaders import qwen_image21_files as qf21
    from gentor.loaders import qwen_image_files as qf
    from gentor.loaders.memory import Precision
    from gentor.loaders.streaming import release_freed_memory, resting_bytes
    from gentor.registry import COMMON_FP8_SKIP

    # Everything the load imports lazily is imported before the baseline, so only the weights are measured.
    import accelerate  # noqa: F401
    import gguf  # noqa: F401
    import safetensors.torch  # noqa: F401
    from diffusers import QwenImageTransformer2DModel  # noqa: F401
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: F401
    from diffusers.quantizers.gguf import utils  # noqa: F401

    bf16 = torch.bfloat16
    prec = Precision(bf16, bf16)

    def load(file: Path):
        if file.name.startswith("qwen_image_2.1"):
            return qf21.load_transformer(file, prec, None, COMMON_FP8_SKIP)
        return qf.load_transformer(file, prec, None, COMMON_FP8_SKIP, False)

    if warm is not None:
        # A 1-block file of the same form first: what a first load of a kind costs once (lazy imports, the
        # libraries' first-use allocations; measured ~18 MB) is not weights, and a ComfyUI has paid it already.
        del_me = load(warm)
        del del_me
        gc.collect()
        release_freed_memory()
    model, m = measure_load(lambda: load(path), path.name)
    return {"seconds": m["seconds"], "peak": m["peak"], "after": m["after"], "resting": resting_bytes(model),
            "mapped_after": m["mapped"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--forms", nargs="+", default=list(FORMS + FORMS21), choices=FORMS + FORMS21)
    parser.add_argument("--layers21", type=int, default=72, help="blocks of the Qwen-Image 2.1 transformer")
    parser.add_argument("--keep", type=Path, help="write the files here (and reuse them) instead of a temp dir")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--warm", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--no-warm", action="store_true", help="measure the first load of a kind in the process")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.warm)))
        return
    import_pack()
    from gentor.loaders.streaming import READ_WINDOW_BYTES

    window = READ_WINDOW_BYTES
    with tempfile.TemporaryDirectory(prefix="gentor-comfy-") as tmp:
        t = time.perf_counter()
        out = args.keep or Path(tmp)
        names = {f: out / file_name(f) for f in args.forms}
        forms1, forms21 = [f for f in args.forms if f in FORMS], [f for f in args.forms if f in FORMS21]
        paths = names
        warm = {f: out / "warm" / file_name(f) for f in args.forms}
        if not all(p.is_file() for p in [*names.values(), *warm.values()]):
            for where, layers, layers21 in ((out, args.layers, args.layers21), (out / "warm", 1, 1)):
                where.mkdir(parents=True, exist_ok=True)
                written = {**(write_files(where, layers, args.heads, forms1) if forms1 else {}),
                           **(write_files21(where, layers21, args.heads, forms21) if forms21 else {})}
                paths = written if where == out else paths
        print(f"wrote {len(paths)} files in {time.perf_counter() - t:.0f} s")
        print(f"{'form':<12}{'file MB':>9}{'resting MB':>11}{'peak MB':>9}{'after MB':>10}{'peak/(rest+win)':>17}"
              f"{'after/rest':>11}{'s':>6}  mapped")
        for form, path in paths.items():
            warm_args = [] if args.no_warm else ["--warm", str(warm[form])]
            r = run_script(Path(__file__), ["--child", str(path), *warm_args])
            bound = r["resting"] + window
            ok = r["peak"] <= bound and r["after"] <= TARGET_AFTER * r["resting"] and not r["mapped_after"]
            print(f"{form:<12}{path.stat().st_size / MB:>9,.0f}{r['resting'] / MB:>11,.0f}{r['peak'] / MB:>9,.0f}"
                  f"{r['after'] / MB:>10,.0f}{r['peak'] / bound:>17.2f}{r['after'] / r['resting']:>11.2f}"
                  f"{r['seconds']:>6.1f}  {r['mapped_after']}  {'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
