"""/gentor/generate overhead over the same graph queued through /prompt (issue 12 target: median <= 20 ms).

Starts a real ComfyUI (tests/comfy_server.py) with the tiny Qwen-Image T2I model, warms the model up, then
times N calls of each path, interleaved (A, B, A, B, ...) so machine noise hits both alike:

- A: POST /gentor/generate {model, prompt, seed, steps, width, height} -> base64 PNGs in the answer;
- B: what a client does by hand for the same graph: websocket /ws, POST /prompt (loader -> Text to Image ->
  PreviewImage), wait for the end event, GET /history/{id}, GET /view for each image.

Each call uses a new seed so ComfyUI's output cache never answers instead of running. Prints the medians,
their difference and the median of per-pair differences (the overhead), as JSON on the last line.

    COMFYUI_DIR=/path/to/ComfyUI python benchmarks/bench_generate_endpoint.py [--calls 100] [--steps 2]
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import tiny_models  # noqa: E402
from tests.comfy_server import ComfyServer  # noqa: E402

SIZE = 32
END_EVENTS = ("execution_success", "execution_error", "execution_interrupted")


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


def by_generate(srv: ComfyServer, seed: int, steps: int) -> int:
    out = post(srv.url + "/gentor/generate", {"model": tiny_models.QWEN_IMAGE_T2I, "prompt": "a red fox",
                                              "seed": seed, "steps": steps, "width": SIZE, "height": SIZE})
    return len(base64.b64decode(out["images"][0]))


def by_prompt(srv: ComfyServer, seed: int, steps: int) -> int:
    import websocket  # noqa: PLC0415 - websocket-client, a test requirement

    graph = {"1": {"class_type": "GentorLoadQwenImage", "inputs": {"model_name": tiny_models.QWEN_IMAGE_T2I}},
             "2": {"class_type": "GentorTextToImage", "inputs": {
                 "model": ["1", 0], "prompt": "a red fox", "negative": "", "seed": seed, "steps": steps, "cfg": 0.0,
                 "width": SIZE, "height": SIZE, "batch_size": 1}},
             "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(f"ws://127.0.0.1:{srv.port}/ws?clientId={client_id}", timeout=600)
    try:
        prompt_id = post(srv.url + "/prompt", {"prompt": graph, "client_id": client_id})["prompt_id"]
        while True:
            raw = ws.recv()
            if isinstance(raw, bytes):
                continue
            msg = json.loads(raw)
            data = msg.get("data") or {}
            if data.get("prompt_id") == prompt_id and (msg.get("type") in END_EVENTS or (
                    msg.get("type") == "executing" and data.get("node") is None)):
                break
    finally:
        ws.close()
    while True:  # /history is written just after the end event
        entry = srv.history(prompt_id)
        if entry is not None and entry.get("status", {}).get("status_str"):
            break
        time.sleep(0.002)
    total = 0
    for image in entry["outputs"]["3"]["images"]:
        query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
        with urllib.request.urlopen(f"{srv.url}/view?{query}", timeout=60) as resp:
            total += len(resp.read())
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        raise SystemExit("set COMFYUI_DIR to a ComfyUI checkout (see tests/comfy_server.py)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        tiny_models.write_qwen_image(models, [tiny_models.QWEN_IMAGE_T2I])
        with ComfyServer(Path(comfy_dir), Path(tmp) / "base", models) as srv:
            by_generate(srv, 0, args.steps)  # warm-up: model load, node definitions
            by_prompt(srv, 1, args.steps)
            times: dict[str, list[float]] = {"generate": [], "prompt": []}
            for i in range(args.calls):
                for name, fn in (("generate", by_generate), ("prompt", by_prompt)):
                    t0 = time.perf_counter()
                    assert fn(srv, 1000 + 2 * i + (name == "prompt"), args.steps) > 0
                    times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    pairs = statistics.median((a - b) * 1000 for a, b in zip(times["generate"], times["prompt"]))
    result = {"calls": args.calls, "steps": args.steps, "size": SIZE, "median_generate_ms": round(med["generate"], 2),
              "median_prompt_ms": round(med["prompt"], 2), "overhead_ms": round(med["generate"] - med["prompt"], 2),
              "median_pair_overhead_ms": round(pairs, 2), "target_ms": 20}
    print(f"/gentor/generate median {med['generate']:.1f} ms, same graph via /prompt {med['prompt']:.1f} ms: "
          f"overhead {result['overhead_ms']:.1f} ms (per-pair median {pairs:.1f} ms; target <= 20 ms)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
