"""ComfyUI V3 nodes: thin wiring over loaders/ and samplers/."""
from __future__ import annotations

import importlib
import logging

from comfy_api.v0_0_2 import ComfyExtension, io

from .. import glue, registry
from .common import checked

log = logging.getLogger(__name__)


def node_list() -> list[type[io.ComfyNode]]:
    from .inspection import GentorInspectModel
    from .memory import GentorMemoryOptions
    from .speed import GentorSpeedOptions
    from .tasks import GentorEditImage, GentorTextToImage
    from .text import GentorDescribeImage

    nodes: list[type[io.ComfyNode]] = [GentorMemoryOptions, GentorSpeedOptions, GentorTextToImage, GentorEditImage, GentorDescribeImage,
                                       GentorInspectModel]
    for spec in registry.available():
        for key in spec.folder_keys:
            glue.register_model_folder(key)
        try:
            nodes.extend(importlib.import_module(f".{spec.id}", __package__).NODES)
        except ImportError:
            # One broken backend must not take the whole pack (and every other backend) down with it.
            log.exception("Gentor: %s nodes disabled: nodes/%s.py failed to import", spec.display_name, spec.id)
    return [checked(node) for node in nodes]


class GentorExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_list()
