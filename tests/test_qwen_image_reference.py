"""Qwen-Image edits against diffusers' own pipelines, loaded independently with ``from_pretrained`` from the
same tiny folders (not through our loader or cache): same weights, prompt, images and seed must give the
same pixels (fp32 on the CPU)."""
from __future__ import annotations

import pytest
import torch

from tests.qwen_helpers import EDIT, EDIT_PLUS, STEPS, edit, picture

PROMPT = "make picture 1 look like a watercolor"  # tests.qwen_helpers.edit's default instruction
SEED = 3  # tests.qwen_helpers.edit's default seed
TRUE_CFG = 4.0
NEGATIVE = " "  # what an empty negative becomes, so true CFG runs (as diffusers needs a negative prompt)
ATOL = 1e-5  # fp32, same weights: only summation order may differ between two separate module copies


@pytest.fixture(autouse=True)
def roots(qwen_roots):
    yield qwen_roots


def _reference(pipeline_cls, folder, images, width: int, height: int) -> torch.Tensor:
    pipe = pipeline_cls.from_pretrained(folder, dtype=torch.float32)
    try:
        out = pipe(image=images, prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=TRUE_CFG,
                   num_inference_steps=STEPS, width=width, height=height, output_type="pt",
                   generator=torch.Generator("cpu").manual_seed(SEED)).images
    finally:
        del pipe
    return out.permute(0, 2, 3, 1).float()  # [B,3,H,W] -> ComfyUI's [B,H,W,3]


def _assert_same(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    diff = (ours - ref).abs().max().item()
    assert diff <= ATOL, f"max abs difference {diff:.3g} > {ATOL}"
    # Not vacuous: the reference image is not flat.
    assert ref.std() > 1e-3


def test_edit_matches_diffusers_edit_pipeline(qwen_roots):
    from diffusers import QwenImageEditPipeline

    image = picture(40, 24, 11)
    ours = edit(EDIT, [image], negative="", cfg=TRUE_CFG, width=48, height=32)
    ref = _reference(QwenImageEditPipeline, qwen_roots / EDIT, image, 48, 32)
    _assert_same(ours.image, ref)


def test_edit_plus_matches_diffusers_edit_plus_pipeline(qwen_roots):
    from diffusers import QwenImageEditPlusPipeline

    # Two references of different sizes (each is resized to ~1 MP for the VAE, so more cost minutes on a CPU;
    # sensitivity to each image and seed is tested in tests/test_qwen_image.py).
    images = [picture(40, 24, 21), picture(24, 40, 22)]
    ours = edit(EDIT_PLUS, images, negative="", cfg=TRUE_CFG, width=32, height=48)
    ref = _reference(QwenImageEditPlusPipeline, qwen_roots / EDIT_PLUS, images, 32, 48)
    _assert_same(ours.image, ref)
