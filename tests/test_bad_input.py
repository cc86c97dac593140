"""Bad input through the shared helpers: symlinked model folders, non-finite outputs and numbers, extreme
aspect ratios, too many references, libraries' bare errors. No ComfyUI needed (the node-level twins of
these run in tests/test_server.py)."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from gentor import glue
from gentor.errors import GenerationError, GentorError, GentorInterrupted, InputError
from gentor.loaders.files import resolve_model_folder
from gentor.samplers.common import (LibraryError, check_aspect, check_finite, check_number, collect_references,
                                    library_errors)

KEY = "gentor_test_models"


# ----------------------------------------------------------------------------- symlinked model folders
@pytest.fixture()
def linked_root(tmp_path):
    """A registered root holding a real folder, a symlink to a folder on "another disk", and a link out."""
    root, elsewhere = tmp_path / "models" / KEY, tmp_path / "other-disk"
    (root / "plain").mkdir(parents=True)
    (elsewhere / "big-model").mkdir(parents=True)
    (root / "linked").symlink_to(elsewhere / "big-model", target_is_directory=True)
    (root / "org").mkdir()
    (root / "org" / "nested-link").symlink_to(elsewhere / "big-model", target_is_directory=True)
    glue.set_fallback_roots(KEY, [str(root)])
    yield root, elsewhere
    glue.set_fallback_roots(KEY, [])


def test_symlinked_folder_inside_a_root_is_followed(linked_root):
    root, elsewhere = linked_root
    target = (elsewhere / "big-model").resolve()
    assert resolve_model_folder("Test", "model_name", "linked", (KEY,)) == target
    assert resolve_model_folder("Test", "model_name", "org/nested-link", (KEY,)) == target
    assert resolve_model_folder("Test", "model_name", "plain", (KEY,)) == (root / "plain").resolve()


@pytest.mark.parametrize("name", ["../other-disk/big-model", "linked/../../other-disk", "/etc", "org//x",
                                  "./plain", "C:/Windows", "..\\other-disk", "plain\x00"])
def test_names_that_could_leave_the_root_are_refused(linked_root, name):
    with pytest.raises(InputError) as info:
        resolve_model_folder("Test", "model_name", name, (KEY,))
    message = str(info.value)
    assert message.startswith("Test model_name: ") and "refused" in message and "(got " in message


def test_symlink_model_folder_through_the_real_loader(qwen_roots, tmp_path):
    """A Qwen-Image pipeline kept elsewhere and linked into models/qwen_image/ is listed AND loads."""
    from gentor.loaders import qwen_image as loader
    from tests.qwen_helpers import EDIT_PLUS

    link = qwen_roots / "linked-from-another-disk"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to((qwen_roots / EDIT_PLUS).resolve(), target_is_directory=True)
    try:
        assert link.name in loader.list_models()
        handle = loader.load_handle(link.name, None)
        assert handle.variant == "qwen-image-edit-2511"
    finally:
        link.unlink()


# ----------------------------------------------------------------------------- non-finite results
def test_check_finite_fails_with_the_count_and_the_hint():
    image = torch.rand(2, 8, 8, 3)
    check_finite(image, "Qwen-Image", "try compute_dtype bf16")  # finite: nothing raised
    image[0, 1, 2, 0] = float("nan")
    image[1, 3, 3, :] = float("inf")
    expected_bad = int((~np.isfinite(image.numpy())).sum())  # counted independently, with numpy
    assert expected_bad == 4
    with pytest.raises(GenerationError) as info:
        check_finite(image, "Qwen-Image", "try compute_dtype bf16")
    message = str(info.value)
    assert message.startswith("Qwen-Image output: ") and f"got {expected_bad} NaN/inf" in message
    assert "try compute_dtype bf16" in message and isinstance(info.value, GentorError)


@pytest.mark.parametrize("value, problem", [
    (float("nan"), "not a finite number"), (float("inf"), "not a finite number"),
    (-math.inf, "not a finite number"), (30.5, "out of range"), (-0.1, "out of range"),
    (True, "not a number"), ("4.0", "not a number")])
def test_check_number_refuses(value, problem):
    with pytest.raises(InputError) as info:
        check_number(value, "cfg", "Qwen-Image (Gentor Text to Image)", 0.0, 30.0)
    message = str(info.value)
    assert message.startswith("Qwen-Image (Gentor Text to Image) cfg: " + problem), message
    assert "expected a finite number in [0.0, 30.0]" in message


@pytest.mark.parametrize("value", [0.0, 4.0, 30.0, 7])
def test_check_number_accepts(value):
    assert check_number(value, "cfg", "X", 0.0, 30.0) == value


# ----------------------------------------------------------------------------- sizes and references
@pytest.mark.parametrize("width, height, problem", [(1, 4000, "a side is too small"),
                                                    (16, 4000, "aspect ratio too extreme"),
                                                    (4000, 256, "aspect ratio too extreme")])
def test_check_aspect_refuses_with_limit_and_rule(width, height, problem):
    with pytest.raises(InputError) as info:
        check_aspect(width, height, "Qwen-Image", "image_1", max_ratio=8.0)
    message = str(info.value)
    assert message.startswith(f"Qwen-Image image_1: {problem}") and f"got {width}x{height}" in message
    assert ("at most 8:1" in message) or (">= 16 px" in message)


@pytest.mark.parametrize("width, height", [(16, 128), (1328, 1328), (2048, 256)])
def test_check_aspect_accepts_up_to_the_limit(width, height):
    check_aspect(width, height, "Qwen-Image", "width/height", max_ratio=8.0)


def _image(batch: int, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, h, w, 3, generator=torch.Generator().manual_seed(seed))


def test_references_one_per_input_in_order():
    inputs = [("image_1", _image(1, 8, 8, 1)), ("image_2", None), ("image_3", _image(1, 6, 10, 3))]
    pils = collect_references(inputs, "Qwen-Image (Gentor Edit Image)", 4)
    assert [p.size for p in pils] == [(8, 8), (10, 6)]
    want = (inputs[2][1][0].numpy() * 255 + 0.5).astype(np.uint8)  # ComfyUI IMAGE -> 8-bit, independently
    assert np.array_equal(np.asarray(pils[1]), want)


def test_a_batch_on_one_reference_input_is_refused():
    with pytest.raises(InputError) as info:
        collect_references([("image_1", _image(1)), ("image_2", _image(3))], "Qwen-Image (Gentor Edit Image)", 4)
    message = str(info.value)
    assert message.startswith("Qwen-Image (Gentor Edit Image) image_2: a batch of 3 images")
    assert "expected 1 per input" in message


def test_more_references_than_the_model_takes_are_refused():
    inputs = [(f"image_{i}", _image(1, seed=i)) for i in range(1, 5)]
    assert len(collect_references(inputs, "X", 4)) == 4
    with pytest.raises(InputError) as info:
        collect_references(inputs, "Qwen-Image (Gentor Edit Image)", 3)
    assert "too many reference images for this model (got 4, expected at most 3)" in str(info.value)


# ----------------------------------------------------------------------------- libraries' bare errors
def _wrapped(exc_factory):
    with library_errors("Qwen-Image", "model_name", "a readable model folder", "Check the files."):
        exc_factory()


def test_file_system_error_is_wrapped(tmp_path):
    locked = tmp_path / "locked.json"
    locked.write_text("{}")
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):  # root reads anything: fall back to a missing file
            locked = tmp_path / "missing.json"
        with pytest.raises(LibraryError) as info:
            _wrapped(lambda: locked.read_text())
    finally:
        if locked.exists():
            locked.chmod(0o600)
    message = str(info.value)
    assert message.startswith("Qwen-Image model_name: a library failed on it (got ")
    assert ("PermissionError" in message or "FileNotFoundError" in message) and message.endswith("Check the files.")
    assert isinstance(info.value.__cause__, OSError)


def test_pil_error_is_wrapped(tmp_path):
    junk = tmp_path / "not-an-image.png"
    junk.write_bytes(b"definitely not a png")
    with pytest.raises(LibraryError) as info:
        _wrapped(lambda: Image.open(junk))
    assert "UnidentifiedImageError" in str(info.value)


def test_tokenizers_error_is_wrapped(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"type": "NoSuchModel"}}')
    with pytest.raises(LibraryError) as info:
        _wrapped(lambda: tokenizers.Tokenizer.from_file(str(bad)))
    assert info.value.__cause__ is not None


@pytest.mark.parametrize("exc", [KeyError("bug"), TypeError("bug"), InputError("ours"),
                                 GentorInterrupted("cancel"), torch.OutOfMemoryError("oom")])
def test_our_errors_cancel_oom_and_bugs_pass_through(exc):
    def boom():
        raise exc

    with pytest.raises(type(exc)) as info:
        _wrapped(boom)
    assert info.value is exc
