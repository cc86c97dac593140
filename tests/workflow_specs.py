"""Node schemas as the workflow checks see them (``NodeSpec``), from a live server's ``/object_info`` or
from the pack's node files (tests/workflow_static.py), plus the core nodes the examples may use."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})


class Unknown:
    """A value the static parser cannot know (e.g. a dropdown filled at run time)."""

    def __repr__(self) -> str:
        return "<unknown>"


UNKNOWN = Unknown()


@dataclass(frozen=True)
class InputSpec:
    name: str
    type: str
    optional: bool = False
    control_after_generate: bool = False
    image_upload: bool = False
    force_input: bool = False
    options: Any = None  # tuple of allowed COMBO values, UNKNOWN, or None (not a combo)
    min: Any = None
    max: Any = None

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.force_input


@dataclass
class NodeSpec:
    node_id: str
    display_name: str
    category: str
    inputs: list[InputSpec]
    outputs: list[tuple[str, str]]  # (slot name as ComfyUI 0.3.64's UI shows it: display name or type, type)
    output_node: bool = False
    source: str = ""
    output_ids: list[str] = field(default_factory=list)  # the V3 output ids (ComfyUI 0.8.0 shows these)

    def input(self, name: str) -> InputSpec | None:
        return next((i for i in self.inputs if i.name == name), None)

    def sockets(self) -> list[InputSpec]:
        """Inputs the UI shows as sockets, in the order the frontend lists them."""
        return [i for i in self.inputs if not i.is_widget]

    def widget_slots(self) -> list[tuple[str, str]]:
        """(input name, kind) per ``widgets_values`` entry; kind: value | control | upload."""
        slots = []
        for i in self.inputs:
            if not i.is_widget:
                continue
            slots.append((i.name, "value"))
            if i.control_after_generate:
                slots.append((i.name, "control"))
            if i.image_upload:
                slots.append((i.name, "upload"))
        return slots

    def signature(self) -> dict:
        """What must agree between the static parse and a live server."""
        return {"node_id": self.node_id, "display_name": self.display_name, "category": self.category,
                "inputs": [(i.name, i.type, i.optional) for i in self.inputs],
                # Output TYPES: the names differ between ComfyUI versions (0.3.64 shows the type, 0.8.0 the id).
                "widgets": self.widget_slots(), "outputs": [t for _, t in self.outputs],
                "output_node": self.output_node}

    def output_names(self, slot: int) -> set[str]:
        """Names a saved UI workflow may give output ``slot`` (whichever ComfyUI version saved it)."""
        shown, typ = self.outputs[slot]
        return {shown, typ} | ({self.output_ids[slot]} if slot < len(self.output_ids) else set())


# The only core nodes the examples may use (explicit allow-list; schemas as ComfyUI 0.3.64 reports them).
CORE_SPECS: dict[str, NodeSpec] = {
    "LoadImage": NodeSpec("LoadImage", "Load Image", "image",
                          [InputSpec("image", "COMBO", image_upload=True, options=UNKNOWN)],
                          [("IMAGE", "IMAGE"), ("MASK", "MASK")], source="core"),
    "SaveImage": NodeSpec("SaveImage", "Save Image", "image",
                          [InputSpec("images", "IMAGE"), InputSpec("filename_prefix", "STRING")], [],
                          output_node=True, source="core"),
    "PreviewImage": NodeSpec("PreviewImage", "Preview Image", "image", [InputSpec("images", "IMAGE")], [],
                             output_node=True, source="core"),
}



def specs_from_object_info(object_info: dict, names: list[str] | None = None) -> dict[str, NodeSpec]:
    specs = {}
    for node_id in names if names is not None else list(object_info):
        info = object_info[node_id]
        inputs = []
        for section in ("required", "optional"):
            for name in info.get("input_order", {}).get(section, list(info["input"].get(section, {}))):
                raw = info["input"][section][name]
                kind, opts = raw[0], (raw[1] if len(raw) > 1 and isinstance(raw[1], dict) else {})
                options = None
                if isinstance(kind, list):
                    kind, options = "COMBO", tuple(kind)
                elif kind == "COMBO":
                    options = tuple(opts.get("options", ()))
                inputs.append(InputSpec(name, kind, optional=section == "optional",
                                        control_after_generate=bool(opts.get("control_after_generate")),
                                        image_upload=bool(opts.get("image_upload")),
                                        force_input=bool(opts.get("forceInput")), options=options,
                                        min=opts.get("min"), max=opts.get("max")))
        outputs = list(zip(info.get("output_name") or info["output"], info["output"]))
        specs[node_id] = NodeSpec(node_id, info.get("display_name") or node_id, info.get("category", ""), inputs,
                                  outputs, bool(info.get("output_node")), source="object_info",
                                  output_ids=[name for name, _ in outputs])
    return specs


def allowed_specs(gentor: dict[str, NodeSpec]) -> dict[str, NodeSpec]:
    """Gentor nodes plus the allow-listed core nodes."""
    clash = set(gentor) & set(CORE_SPECS)
    if clash:
        raise ValueError(f"Gentor node ids collide with core ids: {sorted(clash)}")
    return {**CORE_SPECS, **gentor}

def object_info_from_specs(specs: dict[str, NodeSpec]) -> dict[str, dict]:
    """The ``/object_info`` entries a server would report for ``specs`` (what the converter reads)."""
    info: dict[str, dict] = {}
    for node_id, spec in specs.items():
        sections: dict[str, dict] = {"required": {}, "optional": {}}
        for i in spec.inputs:
            opts: dict[str, Any] = {}
            if i.control_after_generate:
                opts["control_after_generate"] = True
            if i.image_upload:
                opts["image_upload"] = True
            if i.force_input:
                opts["forceInput"] = True
            if i.type == "COMBO":
                opts["options"] = list(i.options) if isinstance(i.options, tuple) else []
            sections["optional" if i.optional else "required"][i.name] = [i.type, opts]
        info[node_id] = {"input": sections, "input_order": {k: list(v) for k, v in sections.items()},
                         "output": [t for _, t in spec.outputs], "output_name": [n for n, _ in spec.outputs],
                         "name": node_id, "display_name": spec.display_name, "category": spec.category,
                         "output_node": spec.output_node}
    return info
