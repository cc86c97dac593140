"""The body of POST /gentor/generate: its fields, limits and checks, and the reference images decoded and
checked from their headers (never decompressed here) before anything is uploaded or queued."""
from __future__ import annotations

import base64
import binascii
import io
import re
import secrets
import warnings
from dataclasses import dataclass
from typing import Any

from .common import RouteError, shown

MIB = 1024 * 1024
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
MAX_JS_SEED = 2**53 - 1  # seeds we pick stay exact in JavaScript clients
EXAMPLE = '{"model": "<name in the loader list>", "prompt": "a red fox"}'
FIELDS = {  # request field -> (JSON types accepted, what it is)
    "model": ((str,), "a model name from the loader's list"),
    "backend": ((str,), "a backend id, e.g. qwen_image (default: the backend whose list holds the model)"),
    "prompt": ((str,), "the prompt or edit instruction"),
    "negative": ((str,), "the negative prompt"),
    "steps": ((int,), "an integer (0 = the backend's default)"),
    "cfg": ((int, float), "a number (0 = the backend's default)"),
    "width": ((int,), "an integer (0 = the backend's size rule)"),
    "height": ((int,), "an integer (0 = the backend's size rule)"),
    "seed": ((int,), "a non-negative integer"),
    "batch_size": ((int,), "an integer (text-to-image only)"),
    "images": ((list,), "a list of base64 images or uploaded file names"),
    "memory": ((dict,), "Gentor Memory Options inputs, e.g. {\"weight_dtype\": \"fp8_e4m3fn\"}"),
    "loader": ((dict,), "extra inputs of the backend's loader node"),
    "settings": ((dict,), "inputs of the backend's settings node (Gentor BAGEL / DeepGen / Emu3.5 / Qwen-Image "
                          "Settings), e.g. {\"think\": true} for BAGEL"),
}
SAFE_NAME = re.compile(r"^[^\\\x00]+$")


@dataclass(frozen=True)
class Limits:
    body_bytes: int = 64 * MIB  # the whole JSON body, base64 images included
    image_bytes: int = 16 * MIB  # one decoded image file
    image_pixels: int = 8192 * 8192  # one image (width x height), checked from its header before decoding
    timeout_s: float = 6 * 3600.0  # longest wait for a run (autoregressive models can take many minutes)


@dataclass
class Job:
    """A checked request."""

    body: dict
    seed: int
    images: list[str | bytes]  # uploaded/input file names, or decoded image bytes


def check_body(body: dict, max_images: int, limits: Limits) -> Job:
    """Types, unknown fields and image sizes; ranges are ComfyUI's own validation (errors are mapped back)."""
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise RouteError(400, unknown[0], f"Gentor generate {unknown[0]}: unknown field (got {shown(unknown)}, "
                                          f"expected only {sorted(FIELDS)}). Remove or rename it.")
    for name in ("model", "prompt"):
        if name not in body:
            raise RouteError(400, name, f"Gentor generate {name}: missing (got no {name}, expected {FIELDS[name][1]}; "
                                        f"e.g. {EXAMPLE}). Add it to the request.")
    for name, value in body.items():
        types, what = FIELDS[name]
        ok = isinstance(value, types) and not isinstance(value, bool)
        if not ok and int in types and isinstance(value, float) and value.is_integer():
            body[name], ok = int(value), True
        if not ok:
            raise RouteError(400, name, f"Gentor generate {name}: wrong type (got {shown(value)}, expected {what}). "
                                        f"Send {name} as {what}.")
    if not body["model"].strip():
        raise RouteError(400, "model", f"Gentor generate model: empty (got {shown(body['model'])}, expected "
                                       f"{FIELDS['model'][1]}). Name a model.")
    for name in ("memory", "loader", "settings"):
        for key, value in body.get(name, {}).items():
            if not isinstance(value, (str, int, float, bool)):
                raise RouteError(400, f"{name}.{key}", f"Gentor generate {name}.{key}: not a plain value (got "
                                                       f"{shown(value)}, expected a string, number or boolean). "
                                                       "Send a plain value.")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbelow(MAX_JS_SEED + 1)  # reported back so the image can be reproduced
    images = body.get("images", [])
    if len(images) > max_images:
        raise RouteError(413, "images", f"Gentor generate images: too many (got {len(images)}, expected at most "
                                        f"{max_images}). Send fewer reference images.")
    if images and "batch_size" in body:
        raise RouteError(400, "batch_size", "Gentor generate batch_size: applies to text-to-image only (got "
                                            f"{body['batch_size']} with {len(images)} images, expected no batch_size "
                                            "for an edit). Remove batch_size.")
    return Job(body, seed, [decode_image(v, i, limits) for i, v in enumerate(images)])


def decode_image(value: Any, index: int, limits: Limits) -> str | bytes:
    """An uploaded file name (kept) or base64 / data-URL image bytes (decoded and checked)."""
    field = f"images[{index}]"
    if not isinstance(value, str) or not value:
        raise RouteError(400, field, f"Gentor generate {field}: not an image (got {shown(value)}, expected base64 "
                                     "image data or an uploaded file name). Send a string.")
    if not value.startswith("data:") and "." in value:
        # Base64 has no '.', file names have an extension: this is a name in ComfyUI's input folder.
        parts = value.replace(" [input]", "").replace(" [temp]", "").split("/")
        if not SAFE_NAME.match(value) or value.startswith("/") or ".." in parts:
            raise RouteError(400, field, f"Gentor generate {field}: file name leaves the input folder (got "
                                         f"{shown(value)}, expected a name returned by /upload/image). Upload "
                                         "the image first or send it as base64.")
        return value
    if value.startswith("data:"):
        header, comma, data = value.partition(",")
        if not comma:
            raise RouteError(400, field, f"Gentor generate {field}: data URL without data (got {shown(value[:60])}, "
                                         "expected 'data:image/png;base64,<base64 data>'). Put a comma between the "
                                         "media type and the base64 data.")
    else:
        data = value
    if len(data) * 3 // 4 > limits.image_bytes:
        raise RouteError(413, field, f"Gentor generate {field}: image too large (got about {len(data) * 3 // 4} "
                                     f"bytes, expected at most {limits.image_bytes}). Send a smaller file.")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RouteError(400, field, f"Gentor generate {field}: not valid base64 (got "
                                     f"{shown(value[:40])}: {exc}, expected base64 PNG/JPEG/WebP data or a file "
                                     "name). Encode the image file with base64.") from exc
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    try:
        with warnings.catch_warnings():
            # Our own pixel limit below decides; PIL's bomb warning would only add noise to the log.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as img:  # reads the header only: no decompression bomb
                fmt, (w, h) = img.format, img.size
    except Image.DecompressionBombError as exc:  # PIL refuses headers claiming > 2x its MAX_IMAGE_PIXELS
        raise RouteError(413, field, f"Gentor generate {field}: too many pixels (got a header claiming more than "
                                     f"{2 * Image.MAX_IMAGE_PIXELS} pixels: {exc}, expected at most "
                                     f"{limits.image_pixels} pixels). Downscale the image.") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise RouteError(400, field, f"Gentor generate {field}: not an image file (got {len(raw)} bytes that no "
                                     f"image reader knows, expected one of {', '.join(IMAGE_FORMATS)}). Send a "
                                     "PNG, JPEG or WebP file.") from exc
    if fmt not in IMAGE_FORMATS:
        raise RouteError(400, field, f"Gentor generate {field}: unsupported format (got {fmt}, expected one of "
                                     f"{', '.join(IMAGE_FORMATS)}). Convert it to PNG.")
    if w * h > limits.image_pixels:
        raise RouteError(413, field, f"Gentor generate {field}: too many pixels (got {w}x{h}, expected at most "
                                     f"{limits.image_pixels} pixels). Downscale the image.")
    return raw
