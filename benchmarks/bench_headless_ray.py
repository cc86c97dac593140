"""The Ray runner (`batch --ray`) against the built-in one on the same real ComfyUI servers (issue 21 targets).

1. Per-row overhead, tiny rows: EmptyImage 16 px -> SaveImage (the server works ~ms), N rows on the same two
   servers, one prompt in flight each. Per-row time = 1 / the rows per second the servers saw (each server:
   its prompts over its own span from the first execution_start to the last end in its /history; summed):
   the rate rows flow once the pipeline runs, whatever the client buffers; Ray's fixed start (actors,
   reader) is reported apart as the time to the first row. Target: Ray's per-row time <= 1.5x the built-in's. Ray runs with one row per task and
   with --rows-per-task rows per task.
2. One -> two servers with the Ray runner, CPU-bound rows (EmptyImage 256 px -> ImageBlur radius 31 ->
   ImageScale 32 px -> SaveImage, ~0.5-1 s a row on one core), each server pinned to its own core with
   OMP_NUM_THREADS=1; the built-in runner's ratio in the same run for reference. Target: <= 0.6x. Both the
   wall time (Ray's start included) and the servers' span are compared.

    COMFYUI_DIR=/path/to/ComfyUI python benchmarks/bench_headless_ray.py [--rows 100] [--slow-rows 16]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

from gentor_headless.dataset import load_dataset, parse_maps  # noqa: E402
from gentor_headless.ray_runner import RayOptions, run_on_ray  # noqa: E402
from gentor_headless.results import ResultsTable, RowResult  # noqa: E402
from gentor_headless.rowjob import RowJob  # noqa: E402
from gentor_headless.scheduler import BatchOptions, BatchRunner  # noqa: E402
from tests.headless_helpers import ComfyProcess  # noqa: E402

TINY = {"1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "tiny"}}}
SLOW = {"1": {"class_type": "EmptyImage", "inputs": {"width": 256, "height": 256, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 31, "sigma": 10.0}},
        "3": {"class_type": "ImageScale", "inputs": {"image": ["2", 0], "upscale_method": "nearest-exact",
                                                     "width": 32, "height": 32, "crop": "disabled"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "slow"}}}
MAPS = ["color=1.color"]


def write_rows(work: Path, n: int, base: int) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    data = work / "rows.csv"
    with data.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["color"])
        writer.writerows([[base + i] for i in range(n)])
    return data


def server_rate(servers: list[ComfyProcess], prefix: str) -> tuple[float, float]:
    """(rows per second, longest span in seconds) as the servers saw the prompts whose SaveImage used
    ``prefix``: per server, its prompts over its own span (first execution_start to last execution end in
    its /history), summed over the servers. Per server, so actors that start at different times (Ray starts
    them one by one) do not count as per-row cost."""
    rate, longest = 0.0, 0.0
    for server in servers:
        starts, ends = [], []
        for entry in server.get_json("/history").values():
            if not any(n.get("inputs", {}).get("filename_prefix") == prefix for n in entry["prompt"][2].values()):
                continue
            for kind, data in entry["status"]["messages"]:
                if kind == "execution_start":
                    starts.append(data["timestamp"])
                elif kind in ("execution_success", "execution_error"):
                    ends.append(data["timestamp"])
        if starts:
            span = (max(ends) - min(starts)) / 1000.0
            rate += len(starts) / max(span, 1e-3)
            longest = max(longest, span)
    return rate, longest


def timed_run(runner: str, workflow: dict, n: int, base: int, servers: list[ComfyProcess], work: Path,
              rows_per_task: int = 1) -> dict:
    """One dataset through one runner: wall time, time to the first row, and the servers' span per row."""
    prefix = f"{work.name}-{runner}"
    workflow = json.loads(json.dumps(workflow))
    next(v for v in workflow.values() if v["class_type"] == "SaveImage")["inputs"]["filename_prefix"] = prefix
    urls = [p.url for p in servers]
    data = write_rows(work, n, base)
    ds = load_dataset(data)
    mappings = parse_maps(workflow, ds, MAPS)
    finished: list[float] = []

    def on_row(result: RowResult, done: int, total: int) -> None:
        if result.status != "ok":
            raise SystemExit(f"benchmark row failed: {result}")
        finished.append(time.perf_counter())

    t0 = time.perf_counter()
    if runner == "ray":
        job = RowJob(workflow, tuple(mappings), work, work / "out")
        summary = run_on_ray(job, RayOptions(data=str(data), out_dir=work / "out", servers=urls, retries=0,
                                             rows_per_task=rows_per_task), on_row)
    else:
        summary = BatchRunner(workflow, ds, mappings, urls, ResultsTable(work / "results.csv"),
                              BatchOptions(out_dir=work / "out", retries=0), on_row).run()
    wall = time.perf_counter() - t0
    rate, span = server_rate(servers, prefix)
    assert summary.ok == n == len(finished), (summary, len(finished))
    return {"runner": runner if rows_per_task == 1 else f"{runner}-x{rows_per_task}", "servers": len(servers),
            "rows": n, "wall_s": round(wall, 2), "first_row_s": round(finished[0] - t0, 2),
            "server_span_s": round(span, 3), "server_ms_per_row": round(1000 / rate, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui-dir", default=os.environ.get("COMFYUI_DIR"))
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--slow-rows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rows-per-task", type=int, default=8, help="the Ray runner's second tiny-row setting")
    args = parser.parse_args()
    if not args.comfyui_dir:
        parser.error("set COMFYUI_DIR or --comfyui-dir to a ComfyUI checkout")
    cores = os.cpu_count() or 1
    report: dict = {"machine": {"cpu_count": cores, "python": sys.version.split()[0], "ray": ray.__version__,
                                "load_avg_start": os.getloadavg()}, "overhead": [], "scaling": []}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"py_modules": [str(ROOT / "gentor_headless")]})
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="bench-headless-ray-") as tmp_dir:
        tmp = Path(tmp_dir)
        procs = [ComfyProcess(args.comfyui_dir, tmp / f"s{i}", link_pack=False, env=env, cpus=str(i % cores)).start()
                 for i in range(2)]
        try:
            for p in procs:
                p.wait_ready()
            for runner in ("builtin", "ray"):  # warm-up: first prompts, Ray's worker processes
                timed_run(runner, TINY, 4, 0, procs, tmp / f"warm-{runner}")
            for r in range(args.repeats):
                for runner, per_task in (("builtin", 1), ("ray", 1), ("ray", args.rows_per_task)):
                    res = timed_run(runner, TINY, args.rows, 1000 * (r + 1), procs,
                                    tmp / f"tiny-{runner}-{per_task}-{r}", per_task)
                    report["overhead"].append(res)
                    print(json.dumps(res), flush=True)
                for runner in ("builtin", "ray"):
                    for k in (1, 2):
                        res = timed_run(runner, SLOW, args.slow_rows, 100 * r + 10 * k, procs[:k],
                                        tmp / f"slow-{runner}-{k}-{r}")
                        report["scaling"].append(res)
                        print(json.dumps(res), flush=True)
        finally:
            for p in procs:
                p.stop()
            ray.shutdown()

    def med(kind: str, runner: str, key: str, servers: int = 2) -> float:
        return statistics.median(x[key] for x in report[kind] if x["runner"] == runner and x["servers"] == servers)

    report["summary"] = {
        "tiny_server_ms_per_row": {r: med("overhead", r, "server_ms_per_row")
                                 for r in ("builtin", "ray", f"ray-x{args.rows_per_task}")},
        "ray_over_builtin_per_row": {r: round(med("overhead", r, "server_ms_per_row")
                                              / med("overhead", "builtin", "server_ms_per_row"), 2)
                                     for r in ("ray", f"ray-x{args.rows_per_task}")},
        "ray_first_row_s": med("overhead", "ray", "first_row_s"),
        "two_over_one_wall": {r: round(med("scaling", r, "wall_s", 2) / med("scaling", r, "wall_s", 1), 3)
                              for r in ("builtin", "ray")},
        "two_over_one_span": {r: round(med("scaling", r, "server_span_s", 2) / med("scaling", r, "server_span_s", 1), 3)
                              for r in ("builtin", "ray")},
        "load_avg_end": os.getloadavg(),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
