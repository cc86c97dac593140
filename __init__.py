"""Gentor: unified multimodal image generation and editing models for ComfyUI.

Importing the pack is cheap: ComfyUI calls comfy_entrypoint(), which imports the nodes and adds the
HTTP API (http_api/) to ComfyUI's server.
"""
WEB_DIRECTORY = "web"


async def comfy_entrypoint():  # noqa: ANN201 - ComfyUI's V3 entry point
    from .http_api import install_on_server
    from .loaders.cache import CACHE
    from .nodes import GentorExtension

    install_on_server(CACHE)
    return GentorExtension()
