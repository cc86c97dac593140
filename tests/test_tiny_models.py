"""Tests of the tiny-model kit (tests/tiny_models.py): layout, sharding, configs, tokenizer, determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACK_ROOT = Path(__file__).resolve().parents[1]
if str(PACK_ROOT) not in sys.path:
    sys.path.insert(0, str(PACK_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests import tiny_models as tm  # noqa: E402

EXPECTED_CLASS = {
    "tiny-qwen-image": "QwenImagePipeline",
    "tiny-qwen-image-edit": "QwenImageEditPipeline",
    "tiny-qwen-image-edit-2511": "QwenImageEditPlusPipeline",
    "tiny-qwen-image-sharded": "QwenImagePipeline",
    "tiny-qwen-image-2512": "QwenImagePipeline",
}
# Qwen-Image 2.1 is another architecture (Qwen3-VL encoder), written by tests/tiny_qwen21.py.
OTHER_LAYOUTS = {"tiny-qwen-image-2.1": "QwenImage21Pipeline"}
EDIT_VARIANTS = {"tiny-qwen-image-edit", "tiny-qwen-image-edit-2511"}


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "tests.tiny_models", *args],
        cwd=PACK_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_models")
    proc = _run_cli("--out", str(out), "--backend", "qwen_image")
    assert proc.returncode == 0, proc.stderr
    return out


def test_variant_names():
    assert set(tm.QWEN_IMAGE_VARIANTS) == set(EXPECTED_CLASS) | set(OTHER_LAYOUTS)


def test_cli_writes_expected_folders(models_dir):
    root = models_dir / "qwen_image"
    # no temporary folders left
    assert sorted(p.name for p in root.iterdir()) == sorted(set(EXPECTED_CLASS) | set(OTHER_LAYOUTS))
    for variant, cls in OTHER_LAYOUTS.items():
        index = json.loads((root / variant / "model_index.json").read_text())
        assert index["_class_name"] == cls and (root / variant / tm.COMPLETE_MARKER).is_file()
    assert sorted(p.suffix for p in (models_dir / "loras").iterdir()) and all(
        p.suffix == ".safetensors" for p in (models_dir / "loras").iterdir()), "tiny LoRAs in every layout"
    for variant in EXPECTED_CLASS:
        folder = root / variant
        subs = {"scheduler", "text_encoder", "tokenizer", "transformer", "vae"}
        if variant in EDIT_VARIANTS:
            subs.add("processor")
        assert {p.name for p in folder.iterdir() if p.is_dir()} == subs, variant
        assert (folder / tm.COMPLETE_MARKER).is_file()
        for sub in ("transformer", "vae", "text_encoder"):
            assert list((folder / sub).glob("*.safetensors")), (variant, sub)
            assert (folder / sub / "config.json").is_file()
        assert (folder / "scheduler" / "scheduler_config.json").is_file()
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
            assert (folder / "tokenizer" / name).is_file(), (variant, name)


def test_model_index(models_dir):
    for variant, cls in EXPECTED_CLASS.items():
        index = json.loads((models_dir / "qwen_image" / variant / "model_index.json").read_text())
        assert index["_class_name"] == cls
        assert index["transformer"] == ["diffusers", "QwenImageTransformer2DModel"]
        assert index["vae"] == ["diffusers", "AutoencoderKLQwenImage"]
        assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
        assert index["text_encoder"] == ["transformers", "Qwen2_5_VLForConditionalGeneration"]
        assert index["tokenizer"] == ["transformers", "Qwen2Tokenizer"]
        if variant in EDIT_VARIANTS:
            assert index["processor"] == ["transformers", "Qwen2VLProcessor"]
        else:
            assert "processor" not in index


@pytest.mark.parametrize(
    "sub,index_name,single",
    [
        ("transformer", "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors.index.json", "model.safetensors"),
    ],
)
def test_sharded_variant(models_dir, sub, index_name, single):
    folder = models_dir / "qwen_image" / "tiny-qwen-image-sharded" / sub
    stem = single.removesuffix(".safetensors")
    shards = sorted(p.name for p in folder.glob(f"{stem}-*-of-*.safetensors"))
    assert len(shards) >= 2
    assert shards[0] == f"{stem}-00001-of-{len(shards):05d}.safetensors"
    assert not (folder / single).exists()
    index = json.loads((folder / index_name).read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    from safetensors import safe_open

    keys = set()
    for shard in shards:
        with safe_open(folder / shard, "pt") as f:
            keys |= set(f.keys())
    assert keys == set(index["weight_map"])


def test_transformer_configs(models_dir):
    for variant in EXPECTED_CLASS:
        cfg = json.loads((models_dir / "qwen_image" / variant / "transformer" / "config.json").read_text())
        assert cfg["zero_cond_t"] is (variant == "tiny-qwen-image-edit-2511")
        assert (cfg["patch_size"], cfg["in_channels"], cfg["out_channels"]) == (2, 64, 16)
        assert sum(cfg["axes_dims_rope"]) == cfg["attention_head_dim"]
    sched_path = models_dir / "qwen_image" / "tiny-qwen-image" / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_path.read_text())
    for key, value in tm.QWEN_IMAGE_SCHEDULER_CONFIG.items():
        assert sched[key] == value, key


def test_tokenizer_and_token_ids(models_dir):
    from transformers import AutoTokenizer

    folder = models_dir / "qwen_image" / "tiny-qwen-image-edit"
    te_cfg = json.loads((folder / "text_encoder" / "config.json").read_text())
    for sub in ("tokenizer", "processor"):
        tok = AutoTokenizer.from_pretrained(folder / sub)
        for special in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|endoftext|>"):
            assert len(tok(special).input_ids) == 1, (sub, special)
        assert tok.convert_tokens_to_ids("<|image_pad|>") == te_cfg["image_token_id"]
        assert tok.convert_tokens_to_ids("<|video_pad|>") == te_cfg["video_token_id"]
        assert tok.convert_tokens_to_ids("<|vision_start|>") == te_cfg["vision_start_token_id"]
        assert tok.convert_tokens_to_ids("<|vision_end|>") == te_cfg["vision_end_token_id"]
        assert len(tok) <= te_cfg["text_config"]["vocab_size"]
    # the system prefixes are as long as with the real tokenizer; user text stays ~1 token per character
    t2i = f"<|im_start|>system\n{tm.QWEN_IMAGE_T2I_SYSTEM}<|im_end|>\n<|im_start|>user\n"
    edit = f"<|im_start|>system\n{tm.QWEN_IMAGE_EDIT_SYSTEM}<|im_end|>\n<|im_start|>user\n"
    assert len(tok(t2i).input_ids) == 34
    assert len(tok(edit).input_ids) == 64
    assert len(tok("zyzzyva").input_ids) == 7


def test_complete_folders_are_skipped(models_dir):
    marker = models_dir / "qwen_image" / "tiny-qwen-image" / tm.COMPLETE_MARKER
    before = marker.stat().st_mtime_ns
    paths = tm.write_all(models_dir, ["qwen_image"])
    assert {v: paths[v] for v in tm.QWEN_IMAGE_VARIANTS} == {v: models_dir / "qwen_image" / v
                                                             for v in tm.QWEN_IMAGE_VARIANTS}
    assert marker.stat().st_mtime_ns == before


def test_unknown_backend_is_a_clear_error(tmp_path):
    proc = _run_cli("--out", str(tmp_path), "--backend", "nope")
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "qwen_image" in proc.stderr
    with pytest.raises(ValueError, match="qwen_image"):
        tm.write_all(tmp_path, ["nope"])
    with pytest.raises(ValueError, match="tiny-qwen-image"):
        tm.write_qwen_image(tmp_path, ["tiny-nope"])


def test_deterministic_and_loadable(models_dir, tmp_path):
    import torch

    written = tm.write_qwen_image(tmp_path, ["tiny-qwen-image"])
    ours, ref = written["tiny-qwen-image"], models_dir / "qwen_image" / "tiny-qwen-image"
    files = sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(ours) for p in ours.rglob("*") if p.is_file())
    for rel in files:
        assert (ours / rel).read_bytes() == (ref / rel).read_bytes(), rel

    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(ref, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt="a red cube",
        negative_prompt=" ",
        true_cfg_scale=4.0,
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (1, 32, 32, 3)
    assert (out == out).all() and abs(out).max() <= 1.0


# ----------------------------------------------------------------------------- the kit as a new user runs it
# The README sends users to `python -m tests.tiny_models` with ComfyUI's Python, which has the pack's
# requirements but not the test tools: the kit must not import pytest (tests/conftest.py does).
NO_PYTEST = ("import runpy, sys\n"
             "sys.modules['pytest'] = sys.modules['_pytest'] = None  # import pytest -> ImportError\n"
             "sys.argv = ['tests.tiny_models', *sys.argv[1:]]\n"
             "runpy.run_module('tests.tiny_models', run_name='__main__', alter_sys=True)\n")
# The kits that build their weights with the pack's own modules (they once imported tests.conftest).
PACK_BUILT = ("bagel", "emu35")


def _run_without_pytest(python: str, out: Path, *backends: str) -> subprocess.CompletedProcess:
    args = [a for b in backends for a in ("--backend", b)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([python, "-c", NO_PYTEST, "--out", str(out), *args], cwd=PACK_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir())


def test_kit_runs_without_pytest(tmp_path):
    proc = _run_without_pytest(sys.executable, tmp_path, *PACK_BUILT)
    assert proc.returncode == 0, proc.stderr
    assert _listing(tmp_path) == ["bagel", "bagel/tiny-bagel", "emu35", "emu35/tiny-emu35-image", "emu35/tiny-ibq"]
    assert (tmp_path / "bagel" / "tiny-bagel" / "ema.safetensors").is_file()


def test_kit_runs_with_comfyuis_python(tmp_path):
    """The README's path exactly: ComfyUI's own Python (its venv), with pytest unimportable there too."""
    from tests.comfy_server import comfy_dir_or_skip, comfy_python

    python = comfy_python(comfy_dir_or_skip())
    proc = _run_without_pytest(python, tmp_path, *PACK_BUILT)
    assert proc.returncode == 0, proc.stderr
    for folder in ("bagel/tiny-bagel", "emu35/tiny-emu35-image", "emu35/tiny-ibq"):
        assert (tmp_path / folder / ".complete").is_file(), _listing(tmp_path)


@pytest.mark.parametrize("backend, module, builder, folder", [
    ("bagel", "tiny_bagel", "_save", "bagel/tiny-bagel"),
    ("emu35", "tiny_emu35", "ibq_state_dict", "emu35/tiny-ibq"),
    ("vlm", "tiny_vlm", "build_processor", "vlm/tiny-qwen2-vl"),
])
def test_a_failed_write_leaves_nothing_partial(tmp_path, monkeypatch, backend, module, builder, folder):
    """A kit that fails half-way (here: its weights or processor cannot be written) leaves no half-written
    model folder and no temporary sibling where a loader would list it; the next run writes it whole."""
    import importlib

    kit = importlib.import_module(f"tests.{module}")

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(kit, builder, broken)
    with pytest.raises(OSError, match="No space left"):
        tm.write_all(tmp_path, [backend])
    parent = (tmp_path / folder).parent
    assert not (tmp_path / folder).exists()
    assert [p.name for p in parent.iterdir() if p.name.startswith(".")] == []
    monkeypatch.undo()
    tm.write_all(tmp_path, [backend])
    assert (tmp_path / folder / ".complete").is_file()


def test_a_killed_writers_leftovers_are_removed(tmp_path):
    """A temporary folder whose writer died (SIGKILL: no cleanup ran) is removed by the next run; a live
    writer's is left alone."""
    from tests.tiny_common import TMP_INFIX, atomic_folder

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".tiny-x{TMP_INFIX}{dead}"
    live = tmp_path / f".tiny-x{TMP_INFIX}{os.getppid()}"
    for leftover in (stale, live):
        leftover.mkdir()
        (leftover / "half.safetensors").write_bytes(b"\0" * 8)
    atomic_folder(tmp_path / "tiny-x", lambda tmp: (tmp / "whole.bin").write_bytes(b"1"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "tiny-x"])
    assert sorted(p.name for p in (tmp_path / "tiny-x").iterdir()) == [".complete", "whole.bin"]
