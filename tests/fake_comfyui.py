"""A stand-in for the parts of ComfyUI's HTTP API that /gentor/generate uses, for tests without ComfyUI.

It answers /object_info/{node}, /prompt (with ComfyUI's 400 + node_errors shape for out-of-range
numbers and unknown images), /ws (the `executing` / `execution_success` events), /history/{id},
/view, /upload/image, /queue and /interrupt. "Running" a graph paints a solid PNG of the requested size
(0 = 64) whose colour comes from the seed; a task node error or an interrupt can be scripted.
The real server is exercised by tests/test_generate_endpoint.py when COMFYUI_DIR is set.
"""
from __future__ import annotations

import asyncio
import io
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from PIL import Image

DEFAULT_SIZE = 64
MAX_STEPS = 200  # GentorTextToImage's steps maximum (nodes/common.py)
COMMON = {
    "model": ["GENTOR_MODEL", {}], "prompt": ["STRING", {"multiline": True, "default": ""}],
    "negative": ["STRING", {"multiline": True, "default": ""}], "seed": ["INT", {"default": 0, "min": 0}],
    "steps": ["INT", {"default": 0, "min": 0, "max": MAX_STEPS}], "cfg": ["FLOAT", {"default": 0.0}],
    "width": ["INT", {"default": 0, "min": 0, "max": 8192}], "height": ["INT", {"default": 0, "min": 0, "max": 8192}],
}


def object_info(models: list[str]) -> dict:
    """Node definitions as ComfyUI 0.3.64 reports V3 nodes (combos as ['COMBO', {'options': [...]}])."""
    return {
        "GentorLoadQwenImage": {"input": {"required": {"model_name": ["COMBO", {"options": list(models)}]},
                                          "optional": {"memory": ["GENTOR_MEMORY", {}], "engine": [
                                              "COMBO", {"options": ["diffusers", "diffsynth-or-diffusers"],
                                                        "default": "diffusers"}]}}},
        "GentorMemoryOptions": {"input": {"required": {
            "weight_dtype": ["COMBO", {"options": ["auto", "bf16", "fp8_e4m3fn"], "default": "auto"}],
            "compute_dtype": ["COMBO", {"options": ["auto", "fp32"], "default": "auto"}],
            "offload": ["COMBO", {"options": ["none", "model", "block"], "default": "none"}],
            "vram_budget_gb": ["FLOAT", {"default": 0.0}]}}},
        "GentorTextToImage": {"input": {"required": {**COMMON, "batch_size": ["INT", {"default": 1, "min": 1}]},
                                        "optional": {"settings": ["GENTOR_SETTINGS", {}]}}},
        "GentorEditImage": {"input": {"required": dict(COMMON), "optional": {
            **{f"image_{i}": ["IMAGE", {}] for i in range(1, 5)}, "settings": ["GENTOR_SETTINGS", {}]}}},
        "GentorQwenImageSettings": {"input": {"required": {
            "max_sequence_length": ["INT", {"default": 1024, "min": 1, "max": 1024}],
            "schedule": ["COMBO", {"options": ["model", "lightning"], "default": "model"}]}}},
        "LoadImage": {"input": {"required": {"image": [["a.png"], {"image_upload": True}]}}},
        "PreviewImage": {"input": {"required": {"images": ["IMAGE", {}]}}},
        "PreviewAny": {"input": {"required": {"source": ["*", {}]}}},
    }


@dataclass
class FakeComfy:
    models: list[str] = field(default_factory=lambda: ["tiny-qwen-image"])
    fail: dict | None = None  # execution_error data to report instead of running
    interrupt: bool = False
    prompts: list[dict] = field(default_factory=list)  # every graph queued
    uploads: dict[str, bytes] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    history: dict[str, dict] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    sockets: dict[str, web.WebSocketResponse] = field(default_factory=dict)
    object_info_calls: int = 0

    def install(self, app: web.Application) -> None:
        app.router.add_get("/object_info/{node}", self.get_object_info)
        app.router.add_post("/prompt", self.post_prompt)
        app.router.add_get("/ws", self.websocket)
        app.router.add_get("/history/{pid}", self.get_history)
        app.router.add_get("/view", self.view)
        app.router.add_post("/upload/image", self.upload)
        app.router.add_post("/queue", self.post_queue)
        app.router.add_post("/interrupt", self.post_interrupt)

    async def get_object_info(self, request: web.Request) -> web.Response:
        self.object_info_calls += 1
        node = request.match_info["node"]
        info = object_info(self.models)
        return web.json_response({node: info[node]} if node in info else {})

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets[request.query.get("clientId", "")] = ws
        await ws.send_json({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}}})
        async for _msg in ws:
            pass
        return ws

    def node_errors(self, graph: dict) -> dict:
        errors = {}
        for node_id, node in graph.items():
            info = object_info(self.models).get(node["class_type"])
            if info is None:
                errors[node_id] = {"errors": [{"type": "invalid_node", "message": "unknown node"}],
                                   "class_type": node["class_type"]}
                continue
            for name, value in node["inputs"].items():
                spec = info["input"]["required"].get(name) or info["input"].get("optional", {}).get(name)
                bad = None
                if spec and isinstance(value, int) and "max" in spec[1] and value > spec[1]["max"]:
                    bad = ("value_bigger_than_max", f"Value {value} bigger than max of {spec[1]['max']}")
                if node["class_type"] == "LoadImage" and name == "image" and value.split(" [")[0] not in self.uploads:
                    bad = ("custom_validation_failed", f"Invalid image file: {value}")
                if bad:
                    errors[node_id] = {"class_type": node["class_type"], "dependent_outputs": [], "errors": [{
                        "type": bad[0], "message": "Value not valid" if "max" in bad[1] else "Custom validation failed",
                        "details": bad[1], "extra_info": {"input_name": name, "received_value": value}}]}
        return errors

    async def post_prompt(self, request: web.Request) -> web.Response:
        body = await request.json()
        graph = body["prompt"]
        errors = self.node_errors(graph)
        if errors:
            return web.json_response({"error": {"type": "prompt_outputs_failed_validation",
                                                "message": "Prompt outputs failed validation"},
                                      "node_errors": errors}, status=400)
        pid = str(uuid.uuid4())
        self.prompts.append(graph)
        asyncio.get_running_loop().create_task(self.execute(pid, graph, body.get("client_id", "")))
        return web.json_response({"prompt_id": pid, "number": len(self.prompts), "node_errors": {}})

    async def execute(self, pid: str, graph: dict, client_id: str) -> None:
        await asyncio.sleep(0.01)
        task_id = next(k for k, v in graph.items() if v["class_type"].startswith("Gentor") and "prompt" in v["inputs"])
        messages: list = [["execution_start", {"prompt_id": pid}]]
        outputs: dict[str, Any] = {}
        if self.interrupt:
            messages.append(["execution_interrupted", {"prompt_id": pid, "node_id": task_id}])
            status = "error"
        elif self.fail is not None:
            messages.append(["execution_error", {"prompt_id": pid, **self.fail}])
            status = "error"
        else:
            inputs = graph[task_id]["inputs"]
            w, h = inputs["width"] or DEFAULT_SIZE, inputs["height"] or DEFAULT_SIZE
            images = []
            for b in range(inputs.get("batch_size", 1)):
                name = f"out_{pid}_{b}.png"
                buf = io.BytesIO()
                Image.new("RGB", (w, h), color_of(inputs["seed"] + b)).save(buf, "PNG")
                self.files[name] = buf.getvalue()
                images.append({"filename": name, "subfolder": "", "type": "temp"})
            steps = inputs["steps"] or 50
            text = [f"model=tiny, size={w}x{h}, steps={steps}, seed={inputs['seed']}"]
            outputs = {"gentor_output": {"images": images}, task_id: {"text": text}}
            # Like ComfyUI 0.8.0 on a cache hit: only output nodes (PreviewAny) carry the text.
            outputs.update({k: {"text": text} for k, v in graph.items() if v["class_type"] == "PreviewAny"})
            messages.append(["execution_success", {"prompt_id": pid}])
            status = "success"
        ws = self.sockets.get(client_id)
        if ws is not None and not ws.closed:
            await ws.send_json({"type": "executing", "data": {"node": None, "prompt_id": pid}})
        await asyncio.sleep(0.005)  # like ComfyUI: history is written just after the events
        self.history[pid] = {"prompt": [0, pid, graph], "outputs": outputs,
                             "status": {"status_str": status, "completed": status == "success", "messages": messages}}

    async def get_history(self, request: web.Request) -> web.Response:
        pid = request.match_info["pid"]
        return web.json_response({pid: self.history[pid]} if pid in self.history else {})

    async def view(self, request: web.Request) -> web.Response:
        return web.Response(body=self.files[request.query["filename"]], content_type="image/png")

    async def upload(self, request: web.Request) -> web.Response:
        post = await request.post()
        part = post["image"]
        sub, kind = post.get("subfolder", ""), post.get("type", "input")
        key = f"{sub}/{part.filename}".lstrip("/") + f" [{kind}]"
        self.uploads[key.split(" [")[0]] = part.file.read()
        return web.json_response({"name": part.filename, "subfolder": sub, "type": kind})

    async def post_queue(self, request: web.Request) -> web.Response:
        self.deleted.extend((await request.json()).get("delete", []))
        return web.Response()

    async def post_interrupt(self, _request: web.Request) -> web.Response:
        return web.Response()


def color_of(seed: int) -> tuple[int, int, int]:
    return (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256)
