"""benchmarks/bench_core_qwen_image.py --smoke: ComfyUI core's Qwen-Image and Gentor sample the same Comfy-format
file in one real ComfyUI (skipped unless COMFYUI_DIR), so the side-by-side benchmark cannot rot."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.comfy_server import comfy_dir_or_skip

pytestmark = pytest.mark.server
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_core_qwen_image.py"
TIMEOUT_S = 1200


def test_smoke_runs_both_sides_on_one_file(tmp_path):
    comfy_dir = comfy_dir_or_skip()
    out, log = tmp_path / "bench.json", tmp_path / "comfyui.log"
    env = dict(os.environ, COMFYUI_DIR=str(comfy_dir), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(BENCH), "--smoke", "--json", str(out), "--log", str(log)], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    res = json.loads(out.read_text())
    for side in ("core", "gentor"):  # every run succeeded (the benchmark raises on a failed prompt); no timing
        assert {k: len(v) for k, v in res["runs"][side].items()} == {"2": 1, "3": 1}, res["runs"]
    log_text = log.read_text()
    # core loaded its model once: the LRU cache keeps UNETLoader's output while Gentor's prompts run in between
    assert log_text.count("Requested to load QwenImage") == 1, log_text[-3000:]
    assert res["rss_peak"] >= res["rss_after_gentor_load"] > res["rss_after_core_load"] > res["rss_start"]
    assert "Gentor / core per step (cpu)" in done.stdout
