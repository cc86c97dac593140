"""Streaming loads (loaders/streaming.py) against the libraries' own from_pretrained.

Every expected value comes from diffusers / transformers themselves: ``from_pretrained`` for weights
and outputs, ``apply_layerwise_casting`` on a ``from_pretrained`` model for which parameters rest in
FP8, ``/proc/self/maps`` for file mappings.
"""
from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gentor.errors import ModelFolderError
from gentor.loaders import streaming
from gentor.loaders.memory import Precision
from tests.tiny_models import (QWEN_IMAGE_TRANSFORMER_CONFIG, QWEN_IMAGE_VAE_CONFIG, QWEN_TEXT_CONFIG,
                               QWEN_VISION_CONFIG)

from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel  # noqa: E402
from diffusers.hooks import apply_layerwise_casting  # noqa: E402
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402

DISPLAY = "Qwen-Image"
SKIP = ("pos_embed", "patch_embed", "norm", "embed", "^proj_in$", "^proj_out$", "lm_head")
FP32 = Precision(torch.float32, torch.float32)
VOCAB = 300
SHARD = "250KB"  # several shards for the tiny transformer


def _text_config(tie: bool = False) -> Qwen2_5_VLConfig:
    text = dict(QWEN_TEXT_CONFIG, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, tie_word_embeddings=tie)
    return Qwen2_5_VLConfig(text_config=text, vision_config=QWEN_VISION_CONFIG, tie_word_embeddings=tie)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random models in their real layouts (+ a sharded, an old-layout and a new-layout copy)."""
    root = tmp_path_factory.mktemp("streaming")
    torch.manual_seed(0)
    out = {name: root / name for name in ("tr", "tr_sharded", "te", "te_new", "te_tied", "vae")}
    QwenImageTransformer2DModel(**QWEN_IMAGE_TRANSFORMER_CONFIG).save_pretrained(out["tr"])
    QwenImageTransformer2DModel.from_pretrained(out["tr"]).save_pretrained(out["tr_sharded"], max_shard_size=SHARD)
    AutoencoderKLQwenImage(**QWEN_IMAGE_VAE_CONFIG).save_pretrained(out["vae"])
    te = Qwen2_5_VLForConditionalGeneration(_text_config())
    te.save_pretrained(out["te"])
    # transformers 5 writes the old layout (model.layers.*, visual.*); keep a copy in the module layout
    # (model.language_model.*, model.visual.*) too, as some repositories ship it.
    out["te_new"].mkdir()
    shutil.copy(out["te"] / "config.json", out["te_new"] / "config.json")
    save_file({k: v.contiguous() for k, v in te.state_dict().items()}, out["te_new"] / "model.safetensors",
              metadata={"format": "pt"})
    Qwen2_5_VLForConditionalGeneration(_text_config(tie=True)).save_pretrained(out["te_tied"])
    return out


def _keys(folder: Path) -> set[str]:
    keys: set[str] = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            keys |= set(f.keys())
    return keys


def test_fixture_layouts(folders):
    old, new = _keys(folders["te"]), _keys(folders["te_new"])
    assert any(k.startswith("model.layers.") for k in old) and any(k.startswith("visual.") for k in old)
    assert "lm_head.weight" in old and not any(k.startswith("model.language_model.") for k in old)
    assert any(k.startswith("model.language_model.layers.") for k in new)
    assert any(k.startswith("model.visual.") for k in new)
    assert (folders["tr_sharded"] / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list(folders["tr_sharded"].glob("*.safetensors"))) >= 3
    assert "lm_head.weight" not in _keys(folders["te_tied"])


# ----------------------------------------------------------------------------- helpers
def _reference(name: str, folders, dtype=torch.float32):
    if name.startswith("tr"):
        model = QwenImageTransformer2DModel.from_pretrained(folders[name], torch_dtype=dtype)
    elif name == "vae":
        model = AutoencoderKLQwenImage.from_pretrained(folders[name], torch_dtype=dtype)
    else:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folders[name], dtype=dtype)
    return _owned(model)


def _owned(model: torch.nn.Module) -> torch.nn.Module:
    """Give the reference's tensors their own memory, keeping ties.

    diffusers' from_pretrained leaves parameters as views into the mapped file at arbitrary offsets; CPU
    matmul kernels take another path for unaligned data and differ by ~1 ulp. Same values, own memory.
    """
    for t in list(model.parameters()) + list(model.buffers()):
        t.data = t.data.clone()
    return model


def _ours(name: str, folders, precision, source=None):
    folder = folders[name]
    if name.startswith("tr"):
        return streaming.load_diffusers(QwenImageTransformer2DModel, folder, precision, SKIP, source, DISPLAY,
                                        "transformer")
    if name == "vae":
        return streaming.load_diffusers(AutoencoderKLQwenImage, folder, precision, SKIP, source, DISPLAY, "vae")
    return streaming.load_transformers(Qwen2_5_VLForConditionalGeneration, folder, precision, SKIP, source,
                                       DISPLAY, "text_encoder")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Exact comparison for any dtype (FP8 has no equality kernels on every build)."""
    return t.detach().contiguous().view(torch.uint8)


def _assert_same_tensors(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    a, b = ours.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(_bits(a[k]), _bits(b[k])), k
    bufs_a, bufs_b = dict(ours.named_buffers()), dict(ref.named_buffers())
    assert bufs_a.keys() == bufs_b.keys()
    for k in bufs_a:  # non-persistent buffers (rotary inv_freq) were computed, not read
        assert bufs_a[k].dtype == bufs_b[k].dtype and torch.equal(bufs_a[k], bufs_b[k]), k


def _run_transformer(model, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 16, 64, generator=g).to(dtype)  # 4x4 packed latent tokens
    text = torch.randn(1, 5, 64, generator=g).to(dtype)
    mask = torch.ones(1, 5, dtype=torch.long)
    with torch.no_grad():
        return model(hidden_states=hidden, encoder_hidden_states=text, encoder_hidden_states_mask=mask,
                     timestep=torch.tensor([0.5], dtype=dtype), img_shapes=[(1, 4, 4)], return_dict=False)[0]


def _run_text(model, dtype=torch.float32) -> torch.Tensor:
    ids = torch.tensor([[3, 17, 42, 99, 5, 250, 7]])
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-1]


def _run_vae(model, dtype=torch.float32) -> torch.Tensor:
    x = torch.randn(1, 3, 1, 32, 32, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.no_grad():
        return model.decode(model.encode(x).latent_dist.mode()).sample


RUN = {"tr": _run_transformer, "tr_sharded": _run_transformer, "te": _run_text, "te_new": _run_text,
       "te_tied": _run_text, "vae": _run_vae}


# ----------------------------------------------------------------------------- fp32: identical to from_pretrained
@pytest.mark.parametrize("name", ["tr", "tr_sharded", "te", "te_new", "te_tied", "vae"])
def test_fp32_weights_and_outputs_equal_from_pretrained(name, folders):
    ref = _reference(name, folders)
    ours = _ours(name, folders, FP32)
    _assert_same_tensors(ours, ref)
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    assert torch.equal(RUN[name](ours), RUN[name](ref))


def test_plain_tensor_attributes_survive_meta_build(folders):
    # Qwen-Image's rope keeps its frequencies as plain (complex) tensors, not buffers.
    ours, ref = _ours("tr", folders, FP32), _reference("tr", folders)
    for attr in ("pos_freqs", "neg_freqs"):
        a, b = getattr(ours.pos_embed, attr), getattr(ref.pos_embed, attr)
        assert not a.is_meta and a.dtype == b.dtype and torch.equal(a, b)


def test_old_and_new_text_encoder_layouts_load_the_same(folders):
    _assert_same_tensors(_ours("te", folders, FP32), _ours("te_new", folders, FP32))


def test_tied_lm_head_follows_embeddings(folders):
    ours = _ours("te_tied", folders, FP32)
    assert ours.lm_head.weight is ours.model.language_model.embed_tokens.weight


def test_precision_none_keeps_on_disk_dtypes(folders, tmp_path):
    folder = tmp_path / "bf16"
    QwenImageTransformer2DModel.from_pretrained(folders["tr"], torch_dtype=torch.bfloat16).save_pretrained(folder)
    ours = streaming.load_diffusers(QwenImageTransformer2DModel, folder, None, (), None, DISPLAY, "transformer")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    _assert_same_tensors(ours, QwenImageTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16))


def test_bf16_equals_from_pretrained_bf16(folders):
    bf16 = Precision(torch.bfloat16, torch.bfloat16)
    for name in ("tr", "te"):
        ref, ours = _reference(name, folders, torch.bfloat16), _ours(name, folders, bf16)
        _assert_same_tensors(ours, ref)
        assert torch.equal(RUN[name](ours, torch.bfloat16), RUN[name](ref, torch.bfloat16))


# ----------------------------------------------------------------------------- FP8 storage
@pytest.mark.parametrize("base", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["tr_sharded", "te"])
def test_fp8_storage_matches_layerwise_casting(name, base, folders):
    ref = _reference(name, folders, base)
    apply_layerwise_casting(ref, storage_dtype=torch.float8_e4m3fn, compute_dtype=base, skip_modules_pattern=SKIP)
    ours = _ours(name, folders, Precision(torch.float8_e4m3fn, base))
    dtypes = {k: p.dtype for k, p in ours.named_parameters()}
    assert dtypes == {k: p.dtype for k, p in ref.named_parameters()}
    assert torch.float8_e4m3fn in dtypes.values() and base in dtypes.values()
    hooked = [m for m in ours.modules() if getattr(m, "_diffusers_hook", None) is not None
              and m._diffusers_hook.get_hook("layerwise_casting") is not None]
    assert hooked, "casting hooks installed"
    _assert_same_tensors(ours, ref)
    out, expected = RUN[name](ours, base), RUN[name](ref, base)
    assert torch.equal(out, expected)
    # ...and the weights rest in FP8 again after the run.
    assert {k: p.dtype for k, p in ours.named_parameters()} == dtypes


def test_source_conversion_equals_disk_load_without_reading(folders, monkeypatch):
    wide = {name: _ours(name, folders, FP32) for name in ("tr", "te")}
    disk = {name: _ours(name, folders, Precision(torch.float8_e4m3fn, torch.bfloat16)) for name in wide}

    def no_disk(*_args, **_kwargs):
        raise AssertionError("a source conversion must not open weight files")

    monkeypatch.setattr("safetensors.safe_open", no_disk)
    for name, source in wide.items():
        converted = _ours(name, folders, Precision(torch.float8_e4m3fn, torch.bfloat16), source=source)
        _assert_same_tensors(converted, disk[name])
        assert torch.equal(RUN[name](converted, torch.bfloat16), RUN[name](disk[name], torch.bfloat16))
        # The new copy shares no storage with its source.
        ptrs = {p.data_ptr() for p in source.parameters()}
        assert not any(p.data_ptr() in ptrs for p in converted.parameters())


def test_source_conversion_keeps_ties(folders):
    source = _ours("te_tied", folders, FP32)
    converted = _ours("te_tied", folders, Precision(torch.bfloat16, torch.bfloat16), source=source)
    assert converted.lm_head.weight is converted.model.language_model.embed_tokens.weight
    assert converted.lm_head.weight.dtype == torch.bfloat16


class _TiedHead(torch.nn.Module):
    """A plain module (no library tie logic) sharing one weight between two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(5, 4)
        self.head = torch.nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight


def test_plain_module_ties_survive_file_and_source_loads(tmp_path):
    weight = torch.randn(5, 4)
    save_file({"emb.weight": weight}, tmp_path / "tied.safetensors")
    loaded = streaming.load_module(_TiedHead, FP32, (), [tmp_path / "tied.safetensors"], display="Test",
                                   component="tied")
    assert loaded.head.weight is loaded.emb.weight and torch.equal(loaded.emb.weight, weight)
    converted = streaming.load_module(_TiedHead, Precision(torch.bfloat16, torch.bfloat16), (), source=loaded)
    assert converted.head.weight is converted.emb.weight
    assert torch.equal(converted.emb.weight, weight.to(torch.bfloat16))


def test_rename_maps_and_drops_keys(folders, tmp_path):
    # One file holding two components under prefixes (as single-file checkpoints do); the text encoder's
    # part is in the old layout, so transformers' own conversion runs after our rename.
    tr = load_file(folders["tr"] / "diffusion_pytorch_model.safetensors")
    te = load_file(folders["te"] / "model.safetensors")
    mixed = {f"dit.{k}": v for k, v in tr.items()} | {f"llm.{k}": v for k, v in te.items()}
    save_file(mixed | {"other.weight": torch.zeros(3)}, tmp_path / "all.safetensors")
    builds = {"dit": streaming.diffusers_builder(QwenImageTransformer2DModel, folders["tr"], DISPLAY, "transformer"),
              "llm": streaming.transformers_builder(Qwen2_5_VLForConditionalGeneration, folders["te"])}
    for prefix, name in (("dit", "tr"), ("llm", "te")):
        def pick(key: str, p: str = f"{prefix}.") -> str | None:
            return key.removeprefix(p) if key.startswith(p) else None

        ours = streaming.load_module(builds[prefix], FP32, (), [tmp_path / "all.safetensors"], rename=pick,
                                     display=DISPLAY, component=name)
        _assert_same_tensors(ours, _reference(name, folders))


def test_same_key_in_two_files_is_an_error(folders, tmp_path):
    folder = _copy(folders, "tr", tmp_path)
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", folder / "diffusion_pytorch_model-copy.safetensors")
    with pytest.raises(ModelFolderError, match=r"Qwen-Image transformer: the same tensor is in two files"):
        _ours("tr", {"tr": folder}, FP32)


def test_reads_in_windows(folders, monkeypatch):
    # A window smaller than one tensor: every tensor is read in a mapping of its own, same result.
    monkeypatch.setattr(streaming, "READ_WINDOW_BYTES", 1)
    _assert_same_tensors(_ours("tr", folders, FP32), _reference("tr", folders))


def test_two_layouts_in_one_folder_is_an_error(folders, tmp_path):
    folder = _copy(folders, "te", tmp_path)
    new = load_file(folders["te_new"] / "model.safetensors")
    del new["lm_head.weight"]  # same name in both layouts: only the renamed keys collide
    save_file(new, folder / "model-new-layout.safetensors")
    with pytest.raises(ModelFolderError, match=r"Qwen-Image text_encoder: two tensors fill the same weight"):
        _ours("te", {"te": folder}, FP32)


# ----------------------------------------------------------------------------- no mapping stays
def _mapped(paths) -> list[str]:
    names = {str(Path(p).resolve()) for p in paths}
    with open("/proc/self/maps", encoding="utf-8") as f:
        return [line for line in f if line.split()[-1] in names]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("name", ["tr_sharded", "te"])
def test_no_safetensors_file_stays_mapped(name, folders):
    files = list(folders[name].glob("*.safetensors"))
    # The check itself can see a mapping: a tensor taken straight from safe_open keeps its file mapped.
    with safe_open(str(files[0]), "pt") as f:
        held = f.get_tensor(next(iter(f.keys())))
    assert _mapped(files[:1])
    del held
    gc.collect()
    assert not _mapped(files)
    model = _ours(name, folders, Precision(torch.float8_e4m3fn, torch.float32))
    gc.collect()
    assert not _mapped(files), "a loaded model must not keep its safetensors files mapped"
    del model


# ----------------------------------------------------------------------------- bad files
def _copy(folders, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folders[name], tmp_path / name))


def test_missing_key_names_component(folders, tmp_path):
    folder = _copy(folders, "tr", tmp_path)
    path = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    del state["img_in.weight"]
    save_file(state, path)
    with pytest.raises(ModelFolderError, match=r"Qwen-Image transformer: 1 weights missing.*img_in\.weight"):
        _ours("tr", {"tr": folder}, FP32)


def test_unexpected_key_names_component(folders, tmp_path):
    folder = _copy(folders, "te", tmp_path)
    path = folder / "model.safetensors"
    state = load_file(path)
    state["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(state, path)
    with pytest.raises(ModelFolderError, match=r"Qwen-Image text_encoder: 1 tensors do not belong.*layers\.9"):
        _ours("te", {"te": folder}, FP32)


def test_shape_mismatch_names_weight(folders, tmp_path):
    folder = _copy(folders, "tr", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["joint_attention_dim"] = 32
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match=r"Qwen-Image transformer: weight .* has the wrong shape"):
        _ours("tr", {"tr": folder}, FP32)


def test_truncated_shard_names_component(folders, tmp_path):
    folder = _copy(folders, "tr_sharded", tmp_path)
    shard = sorted(folder.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ModelFolderError, match=r"Qwen-Image transformer weights: .*truncated"):
        _ours("tr_sharded", {"tr_sharded": folder}, FP32)
    # Handed straight to load_module (no folder validation first), the header check still catches it.
    build = streaming.diffusers_builder(QwenImageTransformer2DModel, folder, DISPLAY, "transformer")
    with pytest.raises(ModelFolderError, match=r"Qwen-Image transformer weights: .*truncated"):
        streaming.load_module(build, FP32, (), sorted(folder.glob("*.safetensors")), display=DISPLAY,
                              component="transformer")


def test_missing_config_names_component(folders, tmp_path):
    folder = _copy(folders, "vae", tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(ModelFolderError, match=r"Qwen-Image vae config: file missing"):
        _ours("vae", {"vae": folder}, FP32)


def test_wrong_model_type_names_component(folders, tmp_path):
    folder = _copy(folders, "te", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "qwen2_vl"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match=r"Qwen-Image text_encoder config: another model family"):
        _ours("te", {"te": folder}, FP32)


def test_resting_bytes_fp8_smaller(folders):
    fp32 = streaming.resting_bytes(_ours("tr", folders, FP32))
    fp8 = streaming.resting_bytes(_ours("tr", folders, Precision(torch.float8_e4m3fn, torch.bfloat16)))
    weights = load_file(folders["tr"] / "diffusion_pytorch_model.safetensors")
    assert fp32 == sum(t.numel() * 4 for t in weights.values())
    assert fp8 < fp32 / 3
