"""Model inspection from configs and headers: identification, counts, bytes and the estimates vs measurements.

Expected values come from independent sources: the library classes' own parameter counts, ``os.stat``,
the loaded modules' real resting bytes, and the peak RSS measured in a fresh process while loading.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gentor import glue
from gentor.errors import InputError, MemoryEstimateError, ModelFolderError
from gentor.loaders import estimates
from gentor.loaders import inspect as inspection
from gentor.loaders import vlm as vlm_loader
from gentor.loaders.identify import Identity, identify
from gentor.loaders.memory import MemoryOptions, Precision
from tests import tiny_vlm

ROOT = Path(__file__).resolve().parents[1]
# Host-RAM estimate vs the measured peak RSS above baseline while loading a mid-size model: the estimate
# (resting + largest file + largest tensor) must be within this share either way. Measured on CPU: 14.1M params
# bf16: estimate 44.5 MiB, measured 52.7 MiB (-16 %; the rest is a constant ~8 MiB of allocator/Python overhead).
RAM_TOLERANCE = 0.25


@pytest.fixture(scope="module")
def roots(tiny_root: Path) -> Path:
    tiny_vlm.write(tiny_root)
    for key in ("vlm", "qwen_image"):
        glue.set_fallback_roots(key, [tiny_root / key])
    glue.set_fallback_roots("diffusers", [])
    return tiny_root


def _tiny_folders(root: Path) -> list[Path]:
    return sorted(p for key in inspection.folder_keys() if (root / key).is_dir()
                  for p in (root / key).iterdir() if p.is_dir() and not p.name.startswith("."))


# ----------------------------------------------------------------------------- identification and counts
def test_every_tiny_backend_folder_is_identified(roots):
    folders = _tiny_folders(roots)
    assert len(folders) >= 7
    for folder in folders:
        report = inspection.inspect_path(folder)
        assert report.components and report.params > 0, folder
        disk = sum(f.stat().st_size for f in folder.rglob("*") if f.suffix in (".safetensors", ".ckpt", ".pt"))
        assert sum(c.disk_bytes for c in report.components) <= disk
        if folder.parent.name in ("vlm", "qwen_image"):
            assert report.backend == folder.parent.name, folder
        if folder.parent.name == "vlm":
            assert report.variant == vlm_loader.load_handle(folder.name, None).variant
        if folder.parent.name == "qwen_image":
            from gentor.loaders import qwen_image

            assert report.variant == qwen_image.inspect_folder(folder).variant


def test_a_loader_names_the_backend_of_a_folder_it_cannot_load(roots):
    """loaders/identify.py asks every backend's loader: the Qwen-VL loader refusing a Qwen-Image pipeline says
    what the folder is (identification lives outside inspection, so loaders use it without an import circle)."""
    folder = roots / "qwen_image" / "tiny-qwen-image"
    with pytest.raises(ModelFolderError, match="it looks like Qwen-Image qwen-image"):
        vlm_loader.inspect_folder(folder)
    assert identify(folder) == Identity("qwen_image", "Qwen-Image", "qwen-image")
    assert identify(roots / "vlm" / tiny_vlm.QWEN2_VL).backend == "vlm"


def test_pickle_checkpoint_counted_through_a_memory_map(tmp_path):
    state = {"state_dict": {"enc.weight": torch.zeros(8, 4), "enc.bias": torch.zeros(8), "embed.weight": torch.zeros(3, 2)}}
    torch.save(state, tmp_path / "model.ckpt")
    (comp,) = inspection.inspect_path(tmp_path).components
    assert comp.params == 8 * 4 + 8 + 3 * 2 and comp.dtypes == {"F32": 46}
    assert comp.castable == 8 * 4 + 8  # the Linear-shaped layer, not the embedding


@pytest.mark.parametrize("name", tiny_vlm.NAMES)
def test_vlm_counts_match_the_library_model(roots, name):
    report = inspection.inspect_path(roots / "vlm" / name)
    model = tiny_vlm.build_model(name)
    (comp,) = report.components
    assert comp.params == sum(t.numel() for t in model.state_dict().values())
    assert comp.dtypes == {"F32": comp.params}
    assert comp.disk_bytes == sum(f.stat().st_size for f in (roots / "vlm" / name).glob("*.safetensors"))
    layers = model.config.get_text_config().num_hidden_layers + model.config.vision_config.depth
    assert comp.blocks == layers


def test_qwen_image_components_match_diffusers(roots):
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    folder = roots / "qwen_image" / "tiny-qwen-image"
    report = inspection.inspect_path(folder)
    got = {c.role: c.params for c in report.components}
    assert got["transformer"] == sum(p.numel() for p in QwenImageTransformer2DModel.from_pretrained(
        folder / "transformer").state_dict().values())
    assert got["vae"] == sum(p.numel() for p in AutoencoderKLQwenImage.from_pretrained(folder / "vae").state_dict().values())
    assert next(c for c in report.components if c.role == "vae").castable == 0  # the VAE never rests in FP8


# ----------------------------------------------------------------------------- estimates vs measurements
@pytest.mark.parametrize("storage", ["bf16", "fp8_e4m3fn"])
def test_resting_bytes_equal_the_loaded_module(roots, storage):
    """The main VRAM term (offload none) is the resting bytes: estimated from headers, measured on the module."""
    folder = roots / "vlm" / tiny_vlm.QWEN2_5_VL
    report = inspection.inspect_path(folder)
    options = MemoryOptions(weight_dtype=storage, compute_dtype="bf16")
    est = estimates.estimate(report, options, torch.device("cpu"))
    precision = Precision(torch.float8_e4m3fn if storage.startswith("fp8") else torch.bfloat16, torch.bfloat16)
    module = vlm_loader.load_qwen_vl(folder, precision, None, vlm_loader.spec().fp8_skip)
    measured = sum(p.numel() * p.element_size() for p in module.parameters())
    assert est.resting_bytes == measured  # exact: 0 % error on parameters


def test_host_ram_estimate_vs_measured_peak(tmp_path):
    """Peak RSS above baseline while streaming a mid-size Qwen2.5-VL (fresh process) vs the estimate."""
    folder = tmp_path / "mid-qwen2.5-vl"
    _write_mid_model(folder)
    report = inspection.inspect_path(folder)
    options = MemoryOptions(weight_dtype="bf16", compute_dtype="bf16")
    est = estimates.estimate(report, options, torch.device("cpu"))
    measured = _measure_load_peak(folder)
    error = (est.peak_host_load - measured) / measured
    print(f"\nhost RAM while loading {report.params / 1e6:.1f}M params bf16: estimate {est.peak_host_load / 2**20:.1f} "
          f"MiB, measured {measured / 2**20:.1f} MiB, error {error:+.1%}")
    assert abs(error) <= RAM_TOLERANCE


def _write_mid_model(folder: Path) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8,
                     "num_key_value_heads": 2, "vocab_size": 4096,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}},
        vision_config={"depth": 2, "hidden_size": 128, "intermediate_size": 256, "num_heads": 2, "out_hidden_size": 512,
                       "fullatt_block_indexes": [1]})
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder, max_shard_size="10MB")


def _measure_load_peak(folder: Path) -> int:
    script = textwrap.dedent(f"""
        import sys, threading, time, json, psutil, torch
        sys.path.insert(0, {str(ROOT)!r})
        from tests import conftest  # the pack as 'gentor'
        from gentor.loaders import vlm, streaming
        from gentor.loaders.memory import Precision
        import transformers, diffusers.hooks  # imports before the baseline
        proc = psutil.Process()
        peak = [0]
        stop = threading.Event()
        def watch():
            while not stop.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.0005)
        base = proc.memory_info().rss
        t = threading.Thread(target=watch); t.start()
        m = vlm.load_qwen_vl({str(folder)!r}, Precision(torch.bfloat16, torch.bfloat16), None, ())
        stop.set(); t.join()
        print(json.dumps({{"peak": peak[0] - base}}))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def test_offload_modes_order_and_work_formula(roots):
    report = inspection.inspect_path(roots / "qwen_image" / "tiny-qwen-image")
    none, model, block = (estimates.estimate(report, MemoryOptions(weight_dtype="bf16", offload=o)) for o in
                          ("none", "model", "block"))
    assert none.peak_vram > model.peak_vram > block.peak_vram > 0
    fp8 = estimates.estimate(report, MemoryOptions(weight_dtype="fp8_e4m3fn"))
    assert fp8.resting_bytes < none.resting_bytes
    # Work per step: 2 FLOPs per transformer weight per token + attention 4*T^2*d*layers (naive formula here).
    t = next(c for c in report.components if c.role == "transformer")
    cfg = json.loads((roots / "qwen_image" / "tiny-qwen-image" / "transformer" / "config.json").read_text())
    d, layers = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["num_layers"]
    tokens = (1024 // 16) ** 2 + estimates.DEFAULT_TEXT_TOKENS
    assert none.flops == pytest.approx(2 * t.params * tokens + 4 * tokens**2 * d * layers)


def test_too_large_is_refused_with_a_cheaper_option(roots):
    report = inspection.inspect_path(roots / "qwen_image" / "tiny-qwen-image")
    none = estimates.estimate(report, MemoryOptions(weight_dtype="bf16"), torch.device("cuda"))
    block = estimates.estimate(report, MemoryOptions(weight_dtype="fp8_e4m3fn", offload="block"), torch.device("cuda"))
    free = (none.peak_vram + block.peak_vram) // 2
    with pytest.raises(MemoryEstimateError, match="will not fit .*Use weight_dtype="):
        estimates.check_fits(report, MemoryOptions(weight_dtype="bf16"), torch.device("cuda"), free)
    assert estimates.check_fits(report, MemoryOptions(weight_dtype="bf16"), torch.device("cuda"), none.peak_vram)


# ----------------------------------------------------------------------------- text, choices, bad input
def test_report_text_and_choices(roots):
    choices = inspection.list_inspectable()
    assert "vlm/tiny-qwen2.5-vl" in choices and "qwen_image/tiny-qwen-image" in choices
    text = inspection.inspect_text(folder="vlm/tiny-qwen2.5-vl", width=512, height=512)
    assert "Qwen2.5-VL" in text and "per token" in text and text.count(" VRAM ") == 6
    handle = vlm_loader.load_handle(tiny_vlm.QWEN2_VL, MemoryOptions(weight_dtype="fp8_e4m3fn"))
    assert "with this model's memory options (fp8_e4m3fn, offload none)" in inspection.inspect_text(model=handle)


def test_bad_paths(roots, tmp_path):
    with pytest.raises(ModelFolderError, match="nothing there"):
        inspection.inspect_path(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert inspection.inspect_path(tmp_path / "empty").notes == ["no weights found (safetensors or torch checkpoint)"]
    with pytest.raises(InputError, match="not a model folder choice"):
        inspection.resolve_inspectable("nope/x")
    with pytest.raises(InputError):
        inspection.resolve_inspectable("vlm/../../etc")


@pytest.mark.parametrize("storage", ["bf16", "fp8_e4m3fn"])
def test_qwen_image_refusal_weighs_what_loading_takes(fresh_cache, qwen_roots, storage):
    """Qwen-Image's "will not fit" check counts the weights still to read with the shared estimate: exactly
    the bytes the cache then holds for the folder, and nothing once they are cached."""
    from gentor.loaders.cache import CACHE
    from gentor.loaders.memory import resolve
    from gentor.samplers import qwen_image as qwen_sampler
    from tests.qwen_helpers import T2I, t2i

    folder = (qwen_roots / T2I).resolve()
    memory = MemoryOptions(weight_dtype=storage, compute_dtype="bf16")
    plan = resolve(memory, torch.device("cpu"))
    before = qwen_sampler.weight_bytes_to_load(folder, "t2i", plan)
    t2i(memory=memory)
    loaded = sum(e.nbytes for e in CACHE.entries() if Path(e.source).resolve().is_relative_to(folder))
    assert before == loaded > 0
    assert qwen_sampler.weight_bytes_to_load(folder, "t2i", plan) == 0
