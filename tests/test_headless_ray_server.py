"""`batch --ray ADDRESS` end to end: a `ray start --head` cluster and real ComfyUI servers (COMFYUI_DIR).

The client runs as a subprocess joining the cluster by address, as a user would; the servers are the one
launcher's (tests/comfy_server.py). Core-node workflows keep the rows fast; one run kills a server
mid-prompt, one is stopped with Ctrl-C and resumed, one has its actor start and stop its own ComfyUI.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the Ray runner needs ray[data]: pip install 'gentor[ray]'")
pytest.importorskip("ray.data", reason="the Ray runner needs ray[data]: pip install 'gentor[ray]'")
Image = pytest.importorskip("PIL.Image", reason="pixel comparison needs pillow")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gentor_headless.cli import main  # noqa: E402
from tests.comfy_server import ComfyServer, comfy_dir_or_skip, free_port  # noqa: E402
from tests.headless_helpers import png_bytes, wait_for, write_csv_rows  # noqa: E402
from tests.test_headless_server import edit_workflow, history, read_results, successes  # noqa: E402

pytestmark = pytest.mark.server
MAPS = ["--map", "ref_1=10.image", "--map", "ref_2=11.image"]
COMPARED = ["row_id", "name", "status", "output_files", "seed", "error"]
RAY_START_TIMEOUT_S = 120
SLOW_SIZE = 256  # with blur radius 31: ~0.7 s a row on one busy CPU core (long enough to kill mid-prompt)


@pytest.fixture(scope="module")
def comfy_dir() -> Path:
    return comfy_dir_or_skip()


@dataclass
class RayHead:
    """The cluster's address and the environment a client needs to join it (Ray's token auth)."""

    address: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """``ray start --head --block`` on a free port (2 CPUs, no dashboard, a token of its own); stopped with it."""
    port = free_port()
    # its own auth token (Ray's default for `ray start`); no 30 s drain at the end (nothing to hand over)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex + uuid.uuid4().hex,
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    ray_bin = Path(sys.executable).with_name("ray")
    log = tmp_path_factory.mktemp("ray-head") / "ray-start.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                                 "--include-dashboard=false", "--disable-usage-stats"],
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **auth})
    try:
        up = wait_for(lambda: proc.poll() is None and "Ray runtime started" in log.read_text(errors="replace"),
                      RAY_START_TIMEOUT_S, 0.5)
        assert up, f"ray start failed:\n{log.read_text(errors='replace')[-3000:]}"
        yield RayHead(f"127.0.0.1:{port}", {**os.environ, **auth})
    finally:
        proc.send_signal(signal.SIGTERM)  # --block: stops the processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        # `ray start` points later plain ray.init() calls on this machine at it: undo that
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


@pytest.fixture(scope="module")
def servers(comfy_dir, tmp_path_factory):
    pair = [ComfyServer(comfy_dir, tmp_path_factory.mktemp(f"comfy{i}")).launch() for i in range(2)]
    try:
        for s in pair:
            s.wait_ready()
        yield pair
    finally:
        for s in pair:
            s.stop()


def dataset(tmp_path: Path, rows: int = 12, bad: int | None = 7) -> Path:
    """Two references per row (multi-reference edit), names, one bad row (its first image is missing)."""
    (tmp_path / "img").mkdir(exist_ok=True)
    lines = []
    for i in range(rows):
        (tmp_path / "img" / f"a{i}.png").write_bytes(png_bytes(8, 8, (20 * i, 0, 0)))
        (tmp_path / "img" / f"b{i}.png").write_bytes(png_bytes(4, 6, (0, 20 * i, 0)))
        lines.append({"ref_1": "img/nowhere.png" if i == bad else f"img/a{i}.png", "ref_2": f"img/b{i}.png",
                      "name": f"item-{i}"})
    data = tmp_path / "rows.csv"
    write_csv_rows(data, lines)
    return data


def slow_rows(tmp_path: Path, prefix: str) -> tuple[Path, Path]:
    """12 good rows and a workflow slow enough (~0.7 s a row) to stop or kill mid-prompt."""
    workflow = edit_workflow(size=SLOW_SIZE, radius=31)
    workflow["13"]["inputs"]["filename_prefix"] = prefix
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(workflow))
    return wf, dataset(tmp_path, bad=None)


def command(wf: Path, data: Path, out: Path, head: RayHead, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "headless.py"), "batch", str(wf), "--data", str(data), "--out", str(out),
            "--name-column", "name", *MAPS, *extra, "--ray", head.address]


def pixels(path: Path) -> bytes:
    with Image.open(io.BytesIO(path.read_bytes())) as img:
        return img.convert("RGB").tobytes()


def test_twelve_rows_same_outputs_and_results_as_builtin(ray_head, servers, tmp_path):
    data = dataset(tmp_path)
    workflow = edit_workflow()  # + seeded noise (a core node), so seeds decide pixels
    workflow["30"] = {"class_type": "ImageAddNoise", "inputs": {"image": ["12", 0], "seed": 1000, "strength": 0.5}}
    workflow["13"]["inputs"]["images"] = ["30", 0]
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(workflow))
    extra = [*(arg for s in servers for arg in ("--server", s.url)), "--seed-policy", "row"]
    assert main(["batch", str(wf), "--data", str(data), "--out", str(tmp_path / "builtin"), "--name-column",
                 "name", *MAPS, *extra]) == 1
    done = subprocess.run(command(wf, data, tmp_path / "ray", ray_head, *extra), capture_output=True, text=True,
                          timeout=300, env=ray_head.env)
    assert done.returncode == 1 and (tmp_path / "ray" / "results.csv").is_file(), done.stdout + done.stderr
    want = [{k: r[k] for k in COMPARED} for r in read_results(tmp_path / "builtin" / "results.csv")]
    got = [{k: r[k] for k in COMPARED} for r in read_results(tmp_path / "ray" / "results.csv")]
    assert got == want and [r["status"] for r in got].count("ok") == 11
    assert [r["seed"] for r in got if r["status"] == "ok"] == [str(1000 + i) for i in range(12) if i != 7]
    assert "image file 'img/nowhere.png' not found" in got[7]["error"]
    # Every row ran on one of the given servers. Which ones is timing: an attached actor moves to the other URL
    # when its server does not answer in time (a loaded machine); the spread over servers is checked with fake
    # servers in tests/test_headless_ray.py and measured in benchmarks/bench_headless_ray.py.
    assert {r["server"] for r in read_results(tmp_path / "ray" / "results.csv")} <= {s.url for s in servers}
    names = sorted(p.name for p in (tmp_path / "ray").glob("*.png"))
    assert names == sorted(p.name for p in (tmp_path / "builtin").glob("*.png")) and len(names) == 11
    for name in names:
        assert pixels(tmp_path / "ray" / name) == pixels(tmp_path / "builtin" / name), name


def test_ctrl_c_then_resume_runs_only_missing_rows(ray_head, servers, tmp_path):
    wf, data = slow_rows(tmp_path, "rayresume")
    urls = [arg for s in servers for arg in ("--server", s.url)]
    out = tmp_path / "out"
    proc = subprocess.Popen(command(wf, data, out, ray_head, *urls), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ray_head.env)
    try:
        assert wait_for(lambda: len(list((out / ".gentor-rows").glob("*.json"))) >= 3, 180, 0.1)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stdout + stderr
    first = read_results(out / "results.csv")
    ok_first = {r["row_id"] for r in first if r["status"] == "ok"}
    assert 3 <= len(ok_first) < 12, first
    assert wait_for(lambda: all(not s.get_json("/queue")["queue_running"] for s in servers), 30)
    before = sum(successes(s.url, "rayresume") for s in servers)
    seen = {pid for s in servers for pid in history(s.url)}
    done = subprocess.run(command(wf, data, out, ray_head, *urls, "--resume"), capture_output=True, text=True,
                          timeout=300, env=ray_head.env)
    assert done.returncode == 0, done.stdout + done.stderr
    final = read_results(out / "results.csv")
    assert [(r["row_id"], r["status"]) for r in final] == [(str(i), "ok") for i in range(12)]
    after = sum(successes(s.url, "rayresume") for s in servers)
    # Which rows' prompts the servers ran after the first run (row i's first reference is a{i}.png).
    ran = sorted(f'{h["prompt"][2]["10"]["inputs"]["image"].rsplit("_", 1)[-1]}:{h["status"]["status_str"]}'
                 for s in servers for pid, h in history(s.url).items() if pid not in seen)
    assert after - before == 12 - len(ok_first), f"ok in the first run: {sorted(ok_first)}; ran since: {ran}"
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"item-{i}_0.png" for i in range(12))


def test_server_killed_mid_run_loses_and_duplicates_nothing(ray_head, servers, tmp_path):
    a, b = servers
    wf, data = slow_rows(tmp_path, "raykill")
    out = tmp_path / "out"
    queued_before = a.log_tail(10**7).count("got prompt")  # the module's servers ran earlier tests' rows
    proc = subprocess.Popen(command(wf, data, out, ray_head, "--server", a.url, "--server", b.url,
                                    "--server-wait", "10"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ray_head.env)

    def running_on_a() -> str | None:
        running = a.get_json("/queue")["queue_running"]
        return running[0][1] if running else None

    try:
        assert wait_for(lambda: len(list((out / ".gentor-rows").glob("*.json"))) >= 2, 180, 0.1)
        first = running_on_a()
        assert wait_for(lambda: running_on_a() not in (None, first), 30, 0.005)
        time.sleep(0.1)
        a.kill()  # a prompt is surely in flight on a
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout + stderr
    results = read_results(out / "results.csv")
    assert [(r["row_id"], r["status"]) for r in results] == [(str(i), "ok") for i in range(12)]
    on_a = sum(r["server"] == a.url for r in results)
    assert a.log_tail(10**7).count("got prompt") - queued_before == on_a + 1  # the one in flight re-ran on b
    assert successes(b.url, "raykill") == 12 - on_a >= 1
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"item-{i}_0.png" for i in range(12))


def test_actor_starts_and_stops_its_own_server(ray_head, comfy_dir, tmp_path):
    data = dataset(tmp_path, rows=3, bad=None)
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(edit_workflow()))
    base = tmp_path / "own"
    (base / "custom_nodes").mkdir(parents=True)
    args = f"--cpu --base-directory {base}"
    done = subprocess.run(command(wf, data, tmp_path / "out", ray_head, "--comfyui", str(comfy_dir),
                                  "--comfyui-args", args, "--actors", "1", "--gpus-per-actor", "0",
                                  "--cpus-per-actor", "0"), capture_output=True, text=True, timeout=400,
                          env=ray_head.env)
    assert done.returncode == 0, done.stdout + done.stderr
    results = read_results(tmp_path / "out" / "results.csv")
    assert [r["status"] for r in results] == ["ok"] * 3
    (url,) = {r["server"] for r in results}
    logs = list((tmp_path / "out" / ".gentor-servers").glob("comfyui-*.log"))
    assert len(logs) == 1 and str(url.rsplit(":", 1)[1]) in logs[0].name
    assert "To see the GUI go to" in logs[0].read_text(errors="replace")  # ComfyUI's own start line

    def stopped() -> bool:
        try:
            urllib.request.urlopen(url + "/queue", timeout=2)
        except (urllib.error.URLError, OSError):
            return True
        return False

    assert wait_for(stopped, 30, 0.5), f"the actor's ComfyUI at {url} still answers after the run"
