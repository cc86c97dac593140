"""Write / upgrade example workflows from the node schemas (the static parse of nodes/*.py).

    python -m tests.qwen_workflows upgrade workflows/a.json [...]   # sockets/outputs/widgets to the schema
    python -m tests.qwen_workflows write                              # (re)write the Qwen-Image LoRA / 2.1 examples

``upgrade`` brings a saved UI workflow to the current schemas the way the ComfyUI frontend does when it loads
one: input sockets in schema order (new optional sockets unlinked, link target slots renumbered), outputs
appended (unlinked), missing widget values filled with their defaults; then the API copy is regenerated
with the pack's converter. ``write`` builds the examples below from a compact description.
"""
from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

from tests import workflow_check as wc
from tests import workflow_files as wf
from tests import workflow_specs as wspec
from tests import workflow_static as wstatic

NOTE_SIZE = [420, 260]
NODE_SIZE = [320, 200]
COLUMN = 380
# Sizes measured in both frontends (tests/test_frontend_layout.py): widgets inside, no overlaps.
SIZES = {"GentorLoadQwenImageFiles": [327, 200], "GentorTextToImage": [320, 350], "GentorEditImage": [320, 406],
         "LoadImage": [320, 314]}
ROW_Y, GAP = 340, 60
VIEW_OFFSET = [100, 140]  # the canvas view: right of the sidebar, below the menu (as the other examples)  # the nodes' row below the Note; the space between columns and stacked images
# Widgets added to a node after workflows were saved -> the value the frontend fills in (the schema default).
NEW_WIDGET_DEFAULTS = {("GentorQwenImageSettings", "schedule"): "model",
                       ("GentorQwenImageSettings", "vae_tiling"): "auto"}


def _socket(spec_input, link=None) -> dict:
    out = {"name": spec_input.name, "type": spec_input.type, "link": link}
    if spec_input.optional:
        out["shape"] = wc.OPTIONAL_SHAPE
    return out


def upgrade(ui: dict, specs: dict) -> dict:
    """Bring every Gentor node of ``ui`` to its current schema (in place); returns ``ui``."""
    links = {link[0]: link for link in ui["links"]}
    for node in ui["nodes"]:
        spec = specs.get(node["type"])
        if spec is None:
            continue
        by_name = {i["name"]: i for i in node["inputs"] if "widget" not in i}
        widget_inputs = [i for i in node["inputs"] if "widget" in i]
        node["inputs"] = [dict(by_name.get(s.name) or _socket(s)) for s in spec.sockets()] + widget_inputs
        for slot, inp in enumerate(node["inputs"]):
            if inp.get("link") is not None:
                links[inp["link"]][4] = slot
        outputs = node["outputs"]
        for slot in range(len(outputs), len(spec.outputs)):
            shown, typ = spec.outputs[slot]
            outputs.append({"name": shown, "type": typ, "links": None})
        values = node.get("widgets_values") or []
        slots = spec.widget_slots()
        for name, kind in slots[len(values):]:
            values.append(NEW_WIDGET_DEFAULTS[(node["type"], name)] if kind == "value" else "fixed")
        node["widgets_values"] = values
    return ui


def save_pair(name: str, ui: dict, specs: dict) -> None:
    (wf.WORKFLOWS_DIR / f"{name}.json").write_text(wf.dump_json(ui))
    api_path = wf.WORKFLOWS_DIR / "api" / f"{name}.json"
    api = wc.ui_to_api(ui, specs)
    if not api_path.is_file() or wf.load_json(api_path) != api:  # same graph: keep the file as it was
        api_path.write_text(wf.dump_json(api))


def build(nodes: list[tuple], edges: list[tuple], note: str, specs: dict) -> dict:
    """nodes: (type, widgets_values); edges: (src index, src slot, dst index, input name). A Note first."""
    ui_nodes = [{"id": 1, "type": "Note", "pos": [0, 0], "size": NOTE_SIZE, "flags": {}, "order": 0, "mode": 0,
                 "inputs": [], "outputs": [], "properties": {}, "widgets_values": [note]}]
    x, y, prev = 0, ROW_Y, None
    for i, (ntype, values) in enumerate(nodes):
        spec = specs[ntype]
        size = SIZES.get(ntype, NODE_SIZE)
        if prev is not None:
            if ntype == "LoadImage" == prev["type"]:  # images stack in one column
                y = prev["pos"][1] + prev["size"][1] + GAP + 20
            else:
                x, y = x + prev["size"][0] + GAP, ROW_Y
        ui_nodes.append({"id": i + 2, "type": ntype, "pos": [x, y], "size": size, "flags": {},
                         "order": i + 1, "mode": 0, "inputs": [_socket(s) for s in spec.sockets()],
                         "outputs": [{"name": shown, "type": typ, "links": None} for shown, typ in spec.outputs],
                         "properties": {"Node name for S&R": ntype}, "widgets_values": list(values)})
        prev = ui_nodes[-1]
    links = []
    for lid, (src, slot, dst, name) in enumerate(edges, start=1):
        s_node, d_node = ui_nodes[src + 1], ui_nodes[dst + 1]
        d_slot = next(k for k, inp in enumerate(d_node["inputs"]) if inp["name"] == name)
        d_node["inputs"][d_slot]["link"] = lid
        out = s_node["outputs"][slot]
        out["links"] = (out["links"] or []) + [lid]
        out["slot_index"] = slot
        links.append([lid, s_node["id"], slot, d_node["id"], d_slot, out["type"]])
    # A workflow's own id (the frontend keys open tabs by it): derived from its note, so stable and distinct.
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "gentor-example/" + note)), "revision": 0,
            "last_node_id": len(ui_nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 1.0, "offset": VIEW_OFFSET}}, "version": 0.4}


TAIL = ("\n\nPick your real model and LoRA (the tiny-* names are the test kit's random-weight files). These run a "
        "few steps at 32-64 px so they finish in seconds on a CPU; for real use set width/height to 0 (the model's "
        "size rule).")
LORA_NOTE = ("Gentor LoRA: a style/character LoRA from models/loras/ on Qwen-Image (diffusers/PEFT, ComfyUI or "
             "kohya key layout, detected from the file). Chain several Gentor LoRA nodes for several LoRAs. The base "
             "model stays cached and shared: a graph without the LoRA switches it off per run without reloading.")
LIGHTNING_NOTE = ("Qwen-Image-Lightning 8-step (ModelTC/Qwen-Image-Lightning), as its authors publish it: 8 steps, "
                  "cfg 1.0 (no true CFG), and their scheduler: shift 3 fixed (base_shift = max_shift = ln 3, "
                  "shift_terminal off) = Gentor Qwen-Image Settings schedule 'lightning'. The 4-step LoRA: steps 4. "
                  "Published template timings (RTX 4090D, fp8, 1328x1328): 71 s -> 34 s per image after the first "
                  "run. Running it with 50 steps / cfg 4 is allowed; the text output then names this recipe.")
Q21_NOTE = ("Qwen-Image 2.1 (non-commercial licence): edit / compose with up to 10 reference images "
            "(image_1..image_10; the output is sized from the LAST image). Defaults: 40 steps, no CFG (cfg 0 = 1.0). "
            "The model outputs RGBA: 'image' is the colour, 'mask' the transparency (1 = transparent, as Load Image "
            "gives it; Join Image with Alpha rebuilds the RGBA).")


FILES_NOTE = ("Qwen-Image from the files ComfyUI's own templates download (Gentor Load Qwen-Image (ComfyUI files)): "
              "models/diffusion_models/qwen_image_fp8_e4m3fn.safetensors (or _bf16, _fp8mixed, the 2512 / Edit / "
              "Edit-2509 / Edit-2511 files), models/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors, "
              "models/vae/qwen_image_vae.safetensors. No second download: the tokenizer is ComfyUI's own. variant "
              "auto: Text to Image runs Qwen-Image, Edit Image runs Edit-2509 (the weights cannot tell them apart); "
              "Edit-2511 files are recognised.")
GGUF_NOTE = ("Qwen-Image from a GGUF transformer (city96/Qwen-Image-gguf, QuantStack's Edit / Edit-2509, unsloth's "
             "Edit-2511; Q8_0 ... Q4_0) in models/unet/ or models/diffusion_models/, with ComfyUI's text encoder and "
             "VAE files. The weights stay quantised in memory (about the file's size) and are dequantised layer by "
             "layer while computing.")
FILES21_NOTE = ("Qwen-Image 2.1 from Comfy-Org's files (Comfy-Org/Qwen-Image-2.1): models/diffusion_models/"
                "qwen_image_2.1_bf16.safetensors (or a qwen-image-2.1 GGUF in models/unet/), models/text_encoders/"
                "qwen3vl_8b_bf16.safetensors (or _fp8_scaled), models/vae/qwen_image_2.1_vae_bf16.safetensors. "
                "Detected from the tensors; sampled as ComfyUI samples 2.1 (shift 0.69), 40 steps by default, RGBA "
                "output (IMAGE + MASK).")
GGUF21_NOTE = ("Qwen-Image 2.1 editing from a GGUF transformer (qwen-image-2.1-Q8_0.gguf ... Q4_K_M in models/unet/) "
               "with Comfy-Org's Qwen3-VL text encoder and 2.1 VAE: up to 10 reference images; the weights stay "
               "quantised in memory and are dequantised layer by layer.")
FILES21 = ("qwen3vl_8b_bf16.safetensors", "qwen_image_2.1_vae_bf16.safetensors", "diffusers", "auto")


def write_examples() -> None:
    specs = wspec.allowed_specs(wstatic.static_specs())
    t2i_w = ["a red fox sitting in fresh snow, watercolor", "", 7, "fixed", 2, 0.0, 32, 32, 1]
    save_pair("qwen_image_lora", build(
        [("GentorLoadQwenImage", ["tiny-qwen-image"]),
         ("GentorLoRA", ["tiny-qwen-image-lora-kohya.safetensors", 0.8]),
         ("GentorTextToImage", t2i_w), ("SaveImage", ["gentor/qwen_image_lora"])],
        [(0, 0, 1, "model"), (1, 0, 2, "model"), (2, 0, 3, "images")], LORA_NOTE + TAIL, specs), specs)
    light_w = ["a bookstore window with a sign reading 'New Arrivals'", "", 7, "fixed", 8, 1.0, 32, 32, 1]
    save_pair("qwen_image_lightning_8step", build(
        [("GentorLoadQwenImage", ["tiny-qwen-image"]),
         ("GentorLoRA", ["tiny-qwen-image-Lightning-8steps-lora.safetensors", 1.0]),
         ("GentorQwenImageSettings", [512, 0, "lightning", "auto"]),
         ("GentorTextToImage", light_w), ("SaveImage", ["gentor/qwen_image_lightning_8step"])],
        [(0, 0, 1, "model"), (1, 0, 3, "model"), (2, 0, 3, "settings"), (3, 0, 4, "images")],
        LIGHTNING_NOTE + TAIL, specs), specs)
    edit_w = ["Put the object of picture 1 on the background of picture 2 in the style of picture 3", "", 7, "fixed",
              2, 0.0, 64, 64]
    inputs = sorted(p.name for p in wf.INPUTS_DIR.glob("*.png"))[:3]
    nodes = [("GentorLoadQwenImage", ["tiny-qwen-image-2.1"])] + [("LoadImage", [n, "image"]) for n in inputs]
    nodes += [("GentorEditImage", edit_w), ("SaveImage", ["gentor/qwen_image21_multiref"])]
    edit = len(inputs) + 1
    edges = [(0, 0, edit, "model")] + [(k + 1, 0, edit, f"image_{k + 1}") for k in range(len(inputs))]
    edges += [(edit, 0, edit + 1, "images")]
    save_pair("qwen_image21_multiref", build(nodes, edges, Q21_NOTE + TAIL, specs), specs)
    for name, dm, note in (("qwen_image_comfy_files_t2i", "qwen_image_fp8_e4m3fn.safetensors", FILES_NOTE),
                           ("qwen_image_comfy_gguf_t2i", "qwen_image-Q4_K_M.gguf", GGUF_NOTE)):
        loader = ("GentorLoadQwenImageFiles", [dm, "qwen_2.5_vl_7b_fp8_scaled.safetensors", "qwen_image_vae.safetensors",
                                               "diffusers", "auto"])
        save_pair(name, build([loader, ("GentorTextToImage", t2i_w), ("SaveImage", [f"gentor/{name}"])],
                              [(0, 0, 1, "model"), (1, 0, 2, "images")], note + TAIL, specs), specs)
    name = "qwen_image_comfy_files_21_t2i"
    loader = ("GentorLoadQwenImageFiles", ["qwen_image_2.1_bf16.safetensors", *FILES21])
    save_pair(name, build([loader, ("GentorTextToImage", t2i_w), ("SaveImage", [f"gentor/{name}"])],
                          [(0, 0, 1, "model"), (1, 0, 2, "images")], FILES21_NOTE + TAIL, specs), specs)
    name = "qwen_image_comfy_gguf_21_edit"
    nodes = [("GentorLoadQwenImageFiles", ["qwen-image-2.1-Q8_0.gguf", *FILES21]), ("LoadImage", [inputs[0], "image"]),
             ("GentorEditImage", ["Turn the scene into a snowy evening", "", 7, "fixed", 2, 0.0, 32, 32]),
             ("SaveImage", [f"gentor/{name}"])]
    save_pair(name, build(nodes, [(0, 0, 2, "model"), (1, 0, 2, "image_1"), (2, 0, 3, "images")],
                          GGUF21_NOTE + TAIL, specs), specs)


def main(argv: list[str]) -> int:
    specs = wspec.allowed_specs(wstatic.static_specs())
    if argv[:1] == ["upgrade"]:
        for path in argv[1:]:
            ui = upgrade(json.loads(Path(path).read_text()), specs)
            save_pair(Path(path).stem, ui, specs)
        return 0
    if argv[:1] == ["write"]:
        write_examples()
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
