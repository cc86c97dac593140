"""Load-memory benchmark for Comfy-format single files (issue 19 part 3): peak host RAM while loading.

Writes a random mid-size Qwen-Image transformer (default 32 layers x 768 wide, ~1.36 GB bf16) as ONE Comfy-style
file per form (bf16, scaled FP8 with per-layer ``weight_scale``, GGUF Q8_0 / Q4_0 through the gguf package's
writer in tests/tiny_comfy_gguf.py), then loads each in a FRESH subprocess through
``loaders.qwen_image_files.load_transformer`` and reports the peak RSS above the child's baseline (VmHWM reset at
the baseline, and a sampling thread), the RSS after the load and the resting bytes:

Target: peak <= resting + one read window (64 MB), after <= 1.1 x resting, no model file mapped afterwards.

    python benchmarks/bench_comfy_files_load.py [--layers 32] [--heads 6] [--forms bf16 fp8_scaled Q8_0 Q4_0]
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
TARGET_AFTER = 1.1


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


def child(path: Path) -> dict:
    import torch

    import_pack()
    from gentor.loaders import qwen_image_files as qf
    from gentor.loaders.memory import Precision
    from gentor.loaders.streaming import resting_bytes
    from gentor.registry import COMMON_FP8_SKIP

    # Everything the load imports lazily is imported before the baseline, so only the weights are measured.
    import accelerate  # noqa: F401
    import gguf  # noqa: F401
    import safetensors.torch  # noqa: F401
    from diffusers import QwenImageTransformer2DModel  # noqa: F401
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: F401
    from diffusers.quantizers.gguf import utils  # noqa: F401

    bf16 = torch.bfloat16
    model, m = measure_load(lambda: qf.load_transformer(path, Precision(bf16, bf16), None, COMMON_FP8_SKIP, False),
                            path.name)
    return {"seconds": m["seconds"], "peak": m["peak"], "after": m["after"], "resting": resting_bytes(model),
            "mapped_after": m["mapped"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    parser.add_argument("--keep", type=Path, help="write the files here (and reuse them) instead of a temp dir")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    import_pack()
    from gentor.loaders.streaming import READ_WINDOW_BYTES

    window = READ_WINDOW_BYTES
    with tempfile.TemporaryDirectory(prefix="gentor-comfy-") as tmp:
        t = time.perf_counter()
        out = args.keep or Path(tmp)
        names = {f: out / (f"qwen_image_{f}.safetensors" if f in ("bf16", "fp8_scaled") else f"qwen_image-{f}.gguf")
                 for f in args.forms}
        paths = names if all(p.is_file() for p in names.values()) else write_files(out, args.layers, args.heads,
                                                                                  args.forms)
        print(f"wrote {len(paths)} files in {time.perf_counter() - t:.0f} s")
        print(f"{'form':<12}{'file MB':>9}{'resting MB':>11}{'peak MB':>9}{'after MB':>10}{'peak/(rest+win)':>17}"
              f"{'after/rest':>11}{'s':>6}  mapped")
        for form, path in paths.items():
            r = run_script(Path(__file__), ["--child", str(path)])
            bound = r["resting"] + window
            ok = r["peak"] <= bound and r["after"] <= TARGET_AFTER * r["resting"] and not r["mapped_after"]
            print(f"{form:<12}{path.stat().st_size / MB:>9,.0f}{r['resting'] / MB:>11,.0f}{r['peak'] / MB:>9,.0f}"
                  f"{r['after'] / MB:>10,.0f}{r['peak'] / bound:>17.2f}{r['after'] / r['resting']:>11.2f}"
                  f"{r['seconds']:>6.1f}  {r['mapped_after']}  {'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
