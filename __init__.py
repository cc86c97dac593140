"""Gentor: unified multimodal image generation and editing models for ComfyUI.

Importing the pack is cheap: ComfyUI calls comfy_entrypoint(), which imports the nodes.
"""
WEB_DIRECTORY = "web"


async def comfy_entrypoint():  # noqa: ANN201 - ComfyUI's V3 entry point
    from .nodes import GentorExtension

    return GentorExtension()
