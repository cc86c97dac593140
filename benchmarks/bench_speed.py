"""Speed Options on the CPU: does a step cache save the time it skips, and what does torch.compile do here?

A mid-size random Qwen-Image transformer (the real pipeline layout, bench_qwen_image.mid_models) is sampled
through the real sampler with no options, a first-block cache and a TaylorSeer cache, interleaved in one
process. For each cache: the passes computed (from the run's text), the CPU time saved (process time: the machine may be
shared; wall time printed beside it), and the IDEAL saving:
the plain run's time inside the transformer times the share of block work skipped (first_block still runs
its first block on a skipped pass). Pass when saved >= 0.9 x ideal. Then compile_blocks: first run (compiles)
and steady runs against plain, or the reason it cannot run.

    python benchmarks/bench_speed.py [--layers 6] [--size 256] [--steps 20] [--repeats 3] [--no-compile]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_qwen_image import import_pack, mid_models  # noqa: E402

TARGET = 0.9  # share of the ideal saving a cache must deliver
PROMPT = "a lighthouse on a cliff at dusk, cinematic"


def computed_of(text: str) -> tuple[int, int]:
    line = next(line for line in text.splitlines() if "step cache" in line)
    done, total = line.split("computed ")[1].split(" transformer")[0].split(" steps")[0].split(" of ")
    return int(done), int(total)


def transformer_seconds(module: torch.nn.Module, fn) -> tuple[float, object]:  # noqa: ANN001
    """CPU seconds spent inside ``module``'s forwards during ``fn()`` (hooks removed afterwards)."""
    spent, start = [0.0], [0.0]
    pre = module.register_forward_pre_hook(lambda *_: start.__setitem__(0, time.process_time()))
    post = module.register_forward_hook(lambda *_: spent.__setitem__(0, spent[0] + time.process_time() - start[0]))
    try:
        out = fn()
    finally:
        pre.remove()
        post.remove()
    return spent[0], out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    import_pack()
    from gentor import glue
    from gentor.loaders import qwen_image as loader
    from gentor.loaders.cache import CACHE
    from gentor.samplers import qwen_image as sampler
    from gentor.samplers import speed
    from gentor.samplers.common import Request

    tmp = Path(tempfile.mkdtemp(prefix="gentor-bench-speed-"))
    try:
        glue.set_fallback_roots("qwen_image", [mid_models(tmp, args.layers)])
        handle = loader.load_handle("mid-qwen-image", None)
        no_preview = sampler.make_settings(preview_every=0)

        def run(options: speed.SpeedOptions | None):  # noqa: ANN202
            req = Request(PROMPT, seed=5, steps=args.steps, width=args.size, height=args.size, settings=no_preview,
                          speed=options)
            return sampler.run(handle, "t2i", req)

        run(None)  # load once, as a second queue run finds it
        transformer = next(e.value for e in CACHE.entries() if type(e.value).__name__.startswith("QwenImageTrans"))
        cases = {"plain": None,
                 "first_block": speed.SpeedOptions(cache="first_block", threshold=1.0, warmup_steps=3, last_steps=1),
                 "taylorseer": speed.SpeedOptions(cache="taylorseer", interval=4, warmup_steps=3)}
        times: dict[str, list[float]] = {k: [] for k in cases}
        walls: dict[str, list[float]] = {k: [] for k in cases}
        inside: list[float] = []
        outputs = {}
        for _ in range(args.repeats):
            for name, options in cases.items():
                t, wall = time.process_time(), time.perf_counter()
                if name == "plain":
                    spent, outputs[name] = transformer_seconds(transformer, lambda: run(None))
                    inside.append(spent)
                else:
                    outputs[name] = run(options)
                times[name].append(time.process_time() - t)
                walls[name].append(time.perf_counter() - wall)
        plain, in_transformer = statistics.median(times["plain"]), statistics.median(inside)
        print(f"CPU ({torch.get_num_threads()} thread(s), torch {torch.__version__}): Qwen-Image {args.layers}-layer "
              f"768-wide random transformer, {args.size}px, {args.steps} steps, true CFG (2 passes per step), "
              f"median of {args.repeats} interleaved runs")
        print("| option | computed passes | CPU s | saved | ideal saving | saved / ideal | wall s |")
        print("|---|---|---|---|---|---|---|")
        print(f"| none | {2 * args.steps} of {2 * args.steps} | {plain:.2f} | - | - | - | "
              f"{statistics.median(walls['plain']):.2f} |")
        ok = True
        for name in ("first_block", "taylorseer"):
            done, total = computed_of(outputs[name].text)
            skipped_work = (total - done) / total
            if name == "first_block":  # a skipped pass still runs the first of the L blocks
                skipped_work *= (args.layers - 1) / args.layers
            ideal = in_transformer * skipped_work
            saved = plain - statistics.median(times[name])
            share = saved / ideal if ideal > 0 else float("nan")
            ok &= share >= TARGET
            print(f"| {name} | {done} of {total} | {statistics.median(times[name]):.2f} | {saved:.2f} | "
                  f"{ideal:.2f} | {share:.2f} | {statistics.median(walls[name]):.2f} |")
        print(f"transformer share of the plain run: {in_transformer / plain:.2f}; target saved/ideal >= {TARGET}: "
              f"{'PASS' if ok else 'FAIL'}")
        if not args.no_compile:
            compile_section(run, plain)
    finally:
        CACHE.unload()
        shutil.rmtree(tmp, ignore_errors=True)


def compile_section(run, plain: float) -> None:  # noqa: ANN001
    from gentor.samplers import speed

    reason = speed.compiler_available()
    if reason:
        print(f"compile_blocks: not measured: {reason}")
        return
    options = speed.SpeedOptions(compile_blocks=True)
    try:
        t = time.perf_counter()
        first = run(options)
        first_s = time.perf_counter() - t
        t, cpu = time.perf_counter(), time.process_time()
        run(options)
        steady, steady_cpu = time.perf_counter() - t, time.process_time() - cpu
        t, cpu = time.perf_counter(), time.process_time()
        run(None)
        plain, plain_cpu = time.perf_counter() - t, time.process_time() - cpu
    except Exception as exc:  # noqa: BLE001 - the benchmark reports why compile failed, then ends
        print(f"compile_blocks: failed on this CPU ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})")
        return
    line = next((x for x in first.text.splitlines() if "compiled" in x), "")
    print(f"compile_blocks ({line.strip('- ')}): first run {first_s:.1f} s wall (includes compiling); then "
          f"compiled {steady_cpu:.2f} CPU s ({steady:.2f} wall) vs plain {plain_cpu:.2f} CPU s ({plain:.2f} wall): "
          f"ratio {steady_cpu / plain_cpu:.3f} (CPU s)")


if __name__ == "__main__":
    main()
