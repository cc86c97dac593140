"""Headless client benchmarks against a real ComfyUI (issue 3 targets).

1. Client overhead per row: a trivial core workflow (EmptyImage -> SaveImage) over 100 rows; overhead =
   row wall time (start of the row to results.csv written) minus the server's own execution time
   (execution_start -> execution_success timestamps in /history). Target: median <= 20 ms.
2. Two servers vs one, each pinned to one core with OMP_NUM_THREADS=1, on the tiny Qwen-Image T2I workflow
   (workflows/api/qwen_image_t2i.json + `python -m tests.tiny_models`). Target: two finish in <= 0.6x
   the time of one. Each server gets one warm-up row (model load) before the timed rows. While that file
   is absent the same graph is built from contract.md's node ids (GentorLoadQwenImage -> GentorTextToImage
   -> SaveImage).

    COMFYUI_DIR=/path/to/ComfyUI python benchmarks/bench_headless.py [--rows 100] [--qwen-rows 8]
"""
from __future__ import annotations

import argparse
import collections
import csv
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gentor_headless.dataset import load_dataset, parse_maps  # noqa: E402
from gentor_headless.results import ResultsTable  # noqa: E402
from gentor_headless.scheduler import BatchOptions, BatchRunner, Summary  # noqa: E402
from tests.headless_helpers import ComfyProcess  # noqa: E402


def run_batch(workflow: dict, rows: list[dict], maps: list[str], servers: list[str], work: Path,
              use_websocket: bool = True, seed_policy: str = "fixed") -> Summary:
    """Run a dataset through the library API (what `gentor-headless batch` does) and return the summary."""
    work.mkdir(parents=True, exist_ok=True)
    data = work / "rows.csv"
    with data.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    ds = load_dataset(data)
    runner = BatchRunner(workflow, ds, parse_maps(workflow, ds, maps), servers,
                         ResultsTable(work / "results.csv"),
                         BatchOptions(out_dir=work / "out", retries=0, use_websocket=use_websocket,
                                      seed_policy=seed_policy))
    summary = runner.run()
    summary.rows_per_server = dict(collections.Counter(r.server for r in runner.results.rows.values()))  # type: ignore[attr-defined]
    if summary.ok != len(rows):
        failed = [r for r in runner.results.rows.values() if r.status != "ok"][:3]
        raise SystemExit(f"benchmark rows failed: {failed}")
    return summary


def overhead(comfy_dir: Path, n_rows: int, tmp: Path) -> dict:
    """Median/p90 client overhead per row on a trivial workflow, websocket and polling."""
    proc = ComfyProcess(comfy_dir, tmp / "overhead", link_pack=False).start()
    try:
        proc.wait_ready()
        wf = {"1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0}},
              "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bench"}}}
        run_batch(wf, [{"color": 1}, {"color": 2}], ["color=1.color"], [proc.url], tmp / "warm")
        report = {}
        for mode, use_ws in (("websocket", True), ("polling", False)):
            base = 1000 if use_ws else 5000
            rows = [{"color": base + i} for i in range(n_rows)]
            summary = run_batch(wf, rows, ["color=1.color"], [proc.url], tmp / mode, use_websocket=use_ws)
            over = [(wall - (exe or 0.0)) * 1000 for wall, exe in summary.timings.values()]
            walls = [wall * 1000 for wall, _ in summary.timings.values()]
            report[mode] = {"rows": len(over), "overhead_median_ms": round(statistics.median(over), 2),
                            "overhead_p90_ms": round(sorted(over)[int(0.9 * len(over)) - 1], 2),
                            "row_wall_median_ms": round(statistics.median(walls), 2),
                            "total_s": round(summary.seconds, 2)}
        return report
    finally:
        proc.stop()


def contract_t2i() -> dict:
    """The tiny T2I graph per contract.md, used while workflows/api/qwen_image_t2i.json is absent."""
    return {"1": {"class_type": "GentorLoadQwenImage", "inputs": {"model_name": "tiny-qwen-image"}},
            "2": {"class_type": "GentorTextToImage", "inputs": {
                "model": ["1", 0], "prompt": "a cat", "negative": "", "seed": 1, "steps": 8, "cfg": 0.0,
                "width": 128, "height": 128, "batch_size": 1}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "bench"}}}


def _cpu_seconds(pids: list[int]) -> tuple[float, float] | None:
    """(whole machine busy CPU seconds, CPU seconds of these pids + this process) from /proc; None off Linux."""
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields) - fields[3] - fields[4]) / hz  # all but idle and iowait
        mine = 0.0
        for pid in [*pids, os.getpid()]:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            mine += (float(stat[11]) + float(stat[12])) / hz  # utime + stime
        return busy, mine
    except (OSError, ValueError, IndexError):
        return None


def _timed(fn: Callable[[], Summary], pids: list[int]) -> tuple[float, float | None, list[int]]:
    """Run fn; return (wall seconds, CPU seconds used by OTHER processes meanwhile, rows per server)."""
    before = _cpu_seconds(pids)
    summary = fn()
    after = _cpu_seconds(pids)
    split = sorted(summary.rows_per_server.values())  # type: ignore[attr-defined]
    if before is None or after is None:
        return summary.seconds, None, split
    return summary.seconds, round((after[0] - before[0]) - (after[1] - before[1]), 2), split


def two_vs_one(comfy_dir: Path, n_rows: int, tmp: Path, workflow_path: Path, steps: int, size: int,
               repeats: int) -> dict:
    """Wall time of a tiny Qwen-Image dataset on one server vs two (each pinned to one core,
    OMP_NUM_THREADS=1), repeated; CPU time taken by other processes meanwhile is reported per run."""
    models = tmp / "models"
    subprocess.run([sys.executable, "-m", "tests.tiny_models", "--out", str(models), "--backend", "qwen_image"],
                   cwd=ROOT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wf = json.loads(workflow_path.read_text()) if workflow_path.is_file() else contract_t2i()
    by_class = {v["class_type"]: k for k, v in wf.items()}
    loader, sampler = by_class["GentorLoadQwenImage"], by_class["GentorTextToImage"]
    wf[loader]["inputs"]["model_name"] = "tiny-qwen-image"
    wf[sampler]["inputs"].update({"steps": steps, "width": size, "height": size})
    maps = [f"prompt={sampler}.prompt"]
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cores = os.cpu_count() or 1
    procs = [ComfyProcess(comfy_dir, tmp / f"q{i}", models_dir=models, env=env, cpus=str(i % cores)).start()
             for i in range(2)]
    runs = []
    try:
        for p in procs:
            p.wait_ready()
        pids = [p.proc.pid for p in procs]
        for i, p in enumerate(procs):  # warm-up: load the model once on each server
            run_batch(wf, [{"prompt": "warm up"}], maps, [p.url], tmp / f"warm{i}", seed_policy="row")
        for r in range(repeats):
            rows = [{"prompt": f"a tiny test image number {i}, run {r}"} for i in range(n_rows)]
            one = _timed(functools.partial(run_batch, wf, rows, maps, [procs[0].url], tmp / f"one{r}",
                                           seed_policy="row"), pids)
            two = _timed(functools.partial(run_batch, wf, rows, maps, [p.url for p in procs], tmp / f"two{r}",
                                           seed_policy="row"), pids)
            runs.append({"one_s": round(one[0], 2), "two_s": round(two[0], 2), "ratio": round(two[0] / one[0], 3),
                         "other_cpu_s": [one[1], two[1]], "two_rows_split": two[2]})
            print(json.dumps(runs[-1]), flush=True)
    finally:
        for p in procs:
            p.stop()
    best_one, best_two = min(r["one_s"] for r in runs), min(r["two_s"] for r in runs)
    return {"workflow": str(workflow_path) if workflow_path.is_file() else "contract_t2i() (file absent)",
            "steps": steps, "size": size, "rows": n_rows, "cpu_count": cores, "pinned": [p.cmd[:3] for p in procs],
            "runs": runs, "median_ratio": statistics.median(r["ratio"] for r in runs),
            "best_two_over_best_one": round(best_two / best_one, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui-dir", default=os.environ.get("COMFYUI_DIR"))
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--qwen-rows", type=int, default=16)
    parser.add_argument("--qwen-workflow", default=str(ROOT / "workflows" / "api" / "qwen_image_t2i.json"))
    parser.add_argument("--qwen-steps", type=int, default=20)
    parser.add_argument("--qwen-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="one-vs-two repetitions")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-two-servers", action="store_true")
    args = parser.parse_args()
    if not args.comfyui_dir:
        parser.error("set COMFYUI_DIR or --comfyui-dir to a ComfyUI checkout")
    report: dict = {"machine": {"cpu_count": os.cpu_count(), "python": sys.version.split()[0]}}
    with tempfile.TemporaryDirectory(prefix="bench-headless-") as tmp:
        if not args.skip_overhead:
            report["overhead"] = overhead(Path(args.comfyui_dir), args.rows, Path(tmp))
            print(json.dumps({"overhead": report["overhead"]}), flush=True)
        if not args.skip_two_servers:
            report["two_vs_one"] = two_vs_one(Path(args.comfyui_dir), args.qwen_rows, Path(tmp),
                                              Path(args.qwen_workflow), args.qwen_steps, args.qwen_size,
                                              args.repeats)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
