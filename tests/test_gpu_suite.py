"""benchmarks/gpu_suite.py --smoke: every GPU section's code path on the CPU with tiny models, so the GPU
command cannot rot between the runs on a lent device."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"qwen_image", "qwen_cache", "deepgen", "bagel", "emu35"}


def test_smoke_runs_every_section(tmp_path):
    out = tmp_path / "suite.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["section"] for r in rows} == SECTIONS
    assert all(r["value"] > 0 and r["peak_rss_gib"] > 0 for r in rows)
    cache = {r["mode"]: r for r in rows if r["section"] == "qwen_cache"}
    assert cache["off"]["latent_mean_abs_diff"] == 0.0
    assert cache["taylorseer 4"]["computed"].startswith("8 of 16")  # 3 warm-up steps, then every 4th
    assert "| section | backend | mode |" in proc.stdout
