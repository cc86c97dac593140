"""DeepGen modeling (pure torch) against the libraries and independent computations, fp32 on tiny weights."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from PIL import Image

from gentor.modeling.deepgen import checkpoint as ckpt
from gentor.modeling.deepgen.bridge import DeepGenBridge, selected_layers, stack_hidden_states
from gentor.modeling.deepgen.cli import main as convert_main
from gentor.modeling.deepgen.convert import ConversionRefused, convert, load_pickle
from gentor.modeling.deepgen.encode import encode
from gentor.modeling.deepgen.prompts import reference_size, to_pixels, vit_patches
from gentor.modeling.deepgen.sampling import denoise, generator, initial_noise
from gentor.modeling.deepgen.transformer import DeepGenTransformer
from tests import tiny_deepgen as tiny
from tests.deepgen_helpers import deepgen_models, naive_bridge, official_sigmas, patchify_reference, rel_err

TOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return deepgen_models(tmp_path_factory)


@pytest.fixture(scope="module")
def folder(models) -> Path:
    return models / tiny.DEEPGEN_FOLDER / tiny.CHECKPOINT_FOLDER


@pytest.fixture(scope="module")
def state(folder) -> dict:
    return ckpt.read_state(folder / tiny.CHECKPOINT_FILE)


@pytest.fixture(scope="module")
def vlm(models):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    path = models / tiny.VLM_FOLDER / tiny.VLM_NAME
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def bridge(state) -> DeepGenBridge:
    parts = ckpt.split(state)
    config = ckpt.bridge_config({k: v.shape for k, v in parts.bridge.items()}, tiny.CONNECTOR_CONFIG)
    module = DeepGenBridge(config).eval()
    module.load_state_dict(parts.bridge, strict=True)
    return module


def picture(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy(), "RGB")


# ----------------------------------------------------------------------------- strict keys, both forms
def test_checkpoint_form_loads_strictly(state, folder):
    parts = ckpt.split(state)
    assert not parts.unknown and not parts.lora
    cfg = ckpt.bridge_config({k: v.shape for k, v in parts.bridge.items()}, tiny.CONNECTOR_CONFIG)
    assert (cfg.num_queries, cfg.hidden, cfg.num_layers, cfg.intermediate) == (8, 128, 2, 96)
    assert DeepGenBridge(cfg).load_state_dict(parts.bridge, strict=True)
    dit = DeepGenTransformer.from_config(DeepGenTransformer.load_config(folder / "transformer"))
    assert dit.load_state_dict(parts.transformer, strict=True)
    keys = sorted(DeepGenBridge(cfg).state_dict())
    assert keys == sorted(parts.bridge)
    assert ckpt.key_report(keys, keys[1:] + ["bogus.weight"]) == ([keys[0]], ["bogus.weight"])


def test_lora_checkpoint_keys_and_rank(folder):
    """The SFT LoRA layout: rank 64 on every nn.Linear / nn.Embedding of the VLM (official lora_modules='auto')."""
    shapes = ckpt.read_shapes(folder / tiny.LORA_CHECKPOINT_FILE)
    assert ckpt.lora_rank(shapes) == tiny.LORA_RANK == 64
    parts = ckpt.split(ckpt.read_state(folder / tiny.LORA_CHECKPOINT_FILE))
    kinds = (torch.nn.Linear, torch.nn.Embedding)
    expected = sorted(n for n, m in tiny.build_vlm().named_modules() if type(m) in kinds)
    assert ckpt.lora_targets(parts.lora) == expected
    assert {"lm_head", "model.language_model.embed_tokens", "model.visual.merger.mlp.0"} <= set(expected)
    emb = "model.language_model.embed_tokens"
    assert parts.lora[f"{emb}.lora_embedding_A.default"].shape[0] == 64  # PEFT's embedding names (no .weight)


def test_lora_names_of_old_transformers_are_mapped():
    assert ckpt.lora_module_key("lmm.model.layers.3.self_attn.q_proj.lora_A.default.weight") == \
        "model.language_model.layers.3.self_attn.q_proj.lora_A.default.weight"
    assert ckpt.lora_module_key("lmm.visual.blocks.0.attn.qkv.lora_B.default.weight") == \
        "model.visual.blocks.0.attn.qkv.lora_B.default.weight"


def test_diffusers_form_loads_strictly_and_matches_checkpoint(models, state):
    folder = models / tiny.DEEPGEN_FOLDER / tiny.DIFFUSERS_FOLDER
    files = ckpt.bridge_files(folder)
    assert [f.relative_to(folder).as_posix() for f in files] == [tiny.CONNECTOR_FILE] == ["connector/model.safetensors"]
    assert not list(folder.rglob("*.pt")) and not list(folder.rglob("*.bin"))
    assert sorted(p.name for p in (folder / "vlm").glob("*.safetensors*")) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    from safetensors.torch import load_file

    bridge_state = load_file(str(files[0]))
    assert len(bridge_state) == 7 + 16 * 2 and all(v.dtype == torch.float32 for v in bridge_state.values())
    assert not any("lora" in k for k in bridge_state)
    cfg = ckpt.bridge_config({k: v.shape for k, v in bridge_state.items()}, tiny.CONNECTOR_CONFIG)
    DeepGenBridge(cfg).load_state_dict(bridge_state, strict=True)
    dit = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    ours = DeepGenTransformer.from_config(DeepGenTransformer.load_config(folder / "transformer"))
    ours.load_state_dict(dit, strict=True)
    parts = ckpt.split(state)
    assert all(torch.equal(dit[k], parts.transformer[k]) for k in dit)
    assert all(torch.equal(bridge_state[k], parts.bridge[k]) for k in bridge_state)


def test_released_component_sizes():
    """The released diffusers files' header counts (103 tensors / 432,449,532 values in connector/, 909 /
    2,469,663,936 in transformer/) are exactly our bridge and DiT modules at the released sizes."""
    from gentor.modeling.deepgen.bridge import BridgeConfig

    with torch.device("meta"):
        bridge = DeepGenBridge(BridgeConfig(llm_hidden=2048, num_queries=128, hidden=2048, intermediate=11946,
                                            num_layers=6, num_heads=32, pooled_dim=2048, joint_dim=4096))
        dit = DeepGenTransformer(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                                 attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                 caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                                 dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
    for module, tensors, values in ((bridge, 103, 432_449_532), (dit, 909, 2_469_663_936)):
        sd = module.state_dict()
        assert (len(sd), sum(v.numel() for v in sd.values())) == (tensors, values)


# ----------------------------------------------------------------------------- DiT
def test_dit_without_references_equals_diffusers(folder, state):
    parts = ckpt.split(state)
    ours = DeepGenTransformer.from_config(DeepGenTransformer.load_config(folder / "transformer")).eval()
    ours.load_state_dict(parts.transformer)
    ref = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(folder / "transformer")).eval()
    ref.load_state_dict(parts.transformer)
    g = torch.Generator().manual_seed(0)
    x, ctx, pooled = torch.randn(2, 16, 8, 6, generator=g), torch.randn(2, 7, 32, generator=g), torch.randn(2, 24, generator=g)
    t = torch.tensor([900.0, 35.5])
    with torch.no_grad():
        assert rel_err(ours(x, ctx, pooled, t)[0], ref(x, ctx, pooled, t, return_dict=False)[0]) < TOL


def test_dit_references_share_the_target_positions(folder, state):
    """Independent composition of diffusers' own parts: [target tokens, reference tokens] through the blocks."""
    parts = ckpt.split(state)
    ours = DeepGenTransformer.from_config(DeepGenTransformer.load_config(folder / "transformer")).eval()
    ours.load_state_dict(parts.transformer)
    ref = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(folder / "transformer")).eval()
    ref.load_state_dict(parts.transformer)
    g = torch.Generator().manual_seed(1)
    x, r1, r2 = torch.randn(1, 16, 8, 8, generator=g), torch.randn(16, 8, 8, generator=g), torch.randn(16, 4, 6, generator=g)
    ctx, pooled, t = torch.randn(1, 5, 32, generator=g), torch.randn(1, 24, generator=g), torch.tensor([500.0])
    with torch.no_grad():
        tokens = torch.cat([ref.pos_embed(x), ref.pos_embed(r1[None]), ref.pos_embed(r2[None])], dim=1)
        temb, c = ref.time_text_embed(t, pooled), ref.context_embedder(ctx)
        for block in ref.transformer_blocks:
            c, tokens = block(hidden_states=tokens, encoder_hidden_states=c, temb=temb)
        out = ref.proj_out(ref.norm_out(tokens, temb))[0, :16]  # the 4x4 target tokens
        expect = out.reshape(4, 4, 2, 2, 16).permute(4, 0, 2, 1, 3).reshape(16, 8, 8)
        got = ours(x, ctx, pooled, t, [[r1, r2]])[0][0]
        assert rel_err(got, expect) < TOL
        # padded batch (different reference sizes per sample) == each sample alone
        both = ours([x[0], x[0]], ctx.repeat(2, 1, 1), pooled.repeat(2, 1), t.repeat(2), [[r1, r2], [r2]])[0]
        alone = ours(x, ctx, pooled, t, [[r2]])[0][0]
        assert rel_err(both[0], got) < TOL and rel_err(both[1], alone) < TOL


# ----------------------------------------------------------------------------- bridge / VLM
def test_connector_matches_naive_formulas(bridge, state):
    parts = ckpt.split(state)
    stacked = torch.randn(3, 11, 6 * 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        pooled, seq = bridge(stacked)
    exp_pooled, exp_seq = naive_bridge(parts.bridge, stacked.double(), heads=tiny.BRIDGE["num_heads"])
    assert rel_err(pooled, exp_pooled) < TOL and rel_err(seq, exp_seq) < TOL


def test_connector_head_count_comes_from_a_config_or_the_released_sizes(bridge, state):
    from gentor.modeling.deepgen.bridge import OFFICIAL_CONNECTOR, ConnectorHeadsUnknown, connector_heads

    assert connector_heads(128, 96, 2, tiny.CONNECTOR_CONFIG) == (4, "connector config")
    assert connector_heads(2048, 11946, 6, None) == (32, "the official DeepGen 1.0 config")
    assert OFFICIAL_CONNECTOR["num_attention_heads"] == 32
    with pytest.raises(ConnectorHeadsUnknown, match="not stored in its weights"):
        connector_heads(128, 96, 2, None)  # never guessed from the width
    with pytest.raises(ConnectorHeadsUnknown, match="does not describe these weights"):
        connector_heads(128, 96, 2, dict(tiny.CONNECTOR_CONFIG, num_hidden_layers=6))
    # the count changes the numbers: the old width // 64 guess (2 heads) is measurably wrong here
    parts = ckpt.split(state)
    wrong = DeepGenBridge(ckpt.bridge_config({k: v.shape for k, v in parts.bridge.items()},
                                             {"num_attention_heads": 2})).eval()
    wrong.load_state_dict(parts.bridge, strict=True)
    stacked = torch.randn(2, 5, 6 * 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel_err(wrong(stacked)[1], bridge(stacked)[1]) > 1e-2


def test_six_layers_selected_from_36(vlm):
    assert selected_layers(37) == [35, 29, 23, 17, 11, 5]
    model, _ = vlm
    outputs = {}
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
               for i, layer in enumerate(model.model.language_model.layers)]
    try:
        with torch.no_grad():
            states = model.model.language_model(input_ids=torch.tensor([[5, 6, 7]]), output_hidden_states=True).hidden_states
    finally:
        for h in handles:
            h.remove()
    stacked = stack_hidden_states(states)
    expect = torch.cat([outputs[i] for i in (34, 28, 22, 16, 10, 4)], dim=-1)  # state k = output of layer k-1
    assert torch.equal(stacked, expect)
    with pytest.raises(ValueError, match="30 layers"):
        stack_hidden_states(states[:31])


def _reference_encode(model, tok, bridge_state, texts, queries, image_embeds=None, grids=None):
    """Official algorithm per sample without padding, padding rows by flash-attention's rule (attention = 0)."""
    text = model.model.language_model
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    pad_id = tok.pad_token_id
    rows = [tok(t).input_ids for t in texts]
    longest = max(len(r) for r in rows)
    stacked = []
    for n, ids in enumerate(rows):
        ids = torch.tensor([ids + [0] * len(queries)])
        types = (ids == image_id).int()
        pos, _ = model.model.get_rope_index(ids, types, image_grid_thw=grids)
        emb = text.embed_tokens(ids[:, :-len(queries)])
        if image_embeds is not None:
            emb[ids[:, :-len(queries)] == image_id] = image_embeds
        h = text(inputs_embeds=torch.cat([emb, queries[None]], 1), position_ids=pos, output_hidden_states=True).hidden_states
        real = torch.cat([h[i] for i in (35, 29, 23, 17, 11, 5)], -1)[0]
        pad = [text.embed_tokens(torch.tensor([pad_id]))]
        for layer in text.layers:  # attention output zero: only the MLP half of each layer
            x = pad[-1]
            pad.append(x + layer.mlp(layer.post_attention_layernorm(x)))
        pad_row = torch.cat([pad[i] for i in (35, 29, 23, 17, 11, 5)], -1)
        stacked.append(torch.cat([pad_row.expand(longest - len(rows[n]), -1), real]))
    return naive_bridge(bridge_state, torch.stack(stacked).double(), heads=tiny.BRIDGE["num_heads"])


def test_text_to_image_conditioning_matches_official_algorithm(vlm, bridge, state):
    model, tok = vlm
    prompts, negatives = ["a red fox sitting in fresh snow at dawn"], [""]
    with torch.no_grad():
        got = encode(model, tok, bridge, prompts, negatives)
        exp_pooled, exp_seq = _reference_encode(
            model, tok, ckpt.split(state).bridge,
            [f"<|im_start|>user\nGenerate an image: {p}<|im_end|>\n<|im_start|>assistant\n" for p in prompts + negatives],
            bridge.meta_queries)
    assert got.sequence.shape == (2, exp_seq.shape[1], 32)
    assert rel_err(got.pooled, exp_pooled) < TOL and rel_err(got.sequence, exp_seq) < TOL


def test_edit_conditioning_matches_official_algorithm(vlm, bridge, state):
    model, tok = vlm
    refs = [to_pixels(picture(96, 64, 3), (96, 64)), to_pixels(picture(64, 64, 4), (64, 64))]
    vc = model.config.vision_config
    with torch.no_grad():
        got = encode(model, tok, bridge, ["put the cat from picture 2 into picture 1"], ["blurry"], refs)
        feats, grids = [], []
        for r in refs:  # vision tower on explicitly built patch rows (loops, not the pack's reshapes)
            rows = patchify_reference(r, vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size)
            grid = torch.tensor([[1, r.shape[1] * 7 // 8 // 14, r.shape[2] * 7 // 8 // 14]])
            feats.append(model.model.visual(rows, grid_thw=grid).pooler_output)
            grids.append(grid)
        blocks = "".join("<|vision_start|>" + "<|image_pad|>" * len(f) + "<|vision_end|>" for f in feats)
        texts = [f"<|im_start|>user\n{blocks}\n{t}<|im_end|>\n<|im_start|>assistant\n"
                 for t in ("put the cat from picture 2 into picture 1", "blurry")]
        pooled, seq = [], []
        for text in texts:
            p, s = _reference_encode(model, tok, ckpt.split(state).bridge, [text], bridge.meta_queries,
                                     torch.cat(feats), torch.cat(grids))
            pooled.append(p)
            seq.append(s)
    # the prompt row has no padding; the shorter negative is checked alone (no padding) below
    assert len(feats[0]) == 6 and len(feats[1]) == 4  # 96x64 -> 84x56 ViT pixels -> 3x2 merged tokens
    assert rel_err(got.sequence[0], seq[0][0]) < TOL and rel_err(got.pooled[0], pooled[0][0]) < TOL
    with torch.no_grad():
        alone = encode(model, tok, bridge, ["blurry"], ["blurry"], refs)
    assert rel_err(alone.sequence[0], seq[1][0]) < TOL


def test_vit_patches_match_explicit_loops():
    pixels = to_pixels(picture(128, 64, 5), (128, 64))
    rows, grid = vit_patches(pixels, 14, 2, 2)
    assert grid == [1, 4, 8]
    assert rel_err(rows, patchify_reference(pixels, 14, 2, 2)) < TOL


@pytest.mark.parametrize("size,rule,target,expect", [
    ((1024, 768), "dynamic", (512, 512), (512, 384)), ((300, 500), "dynamic", (512, 512), (320, 512)),
    ((100, 70), "dynamic", (512, 512), (128, 96)), ((1000, 1000), "fix_pixels", (64, 64), (512, 512)),
    ((640, 480), "fix_pixels", (0, 0), (608, 448)), ((77, 99), "output_size", (64, 32), (64, 32))])
def test_reference_resize_rules(size, rule, target, expect):
    assert reference_size(*size, rule, target) == expect


# ----------------------------------------------------------------------------- sampling
def test_noise_is_documented_randn():
    expect = torch.randn([2, 16, 4, 6], generator=torch.Generator("cpu").manual_seed(1234))
    assert torch.equal(initial_noise(generator(1234), 2, 32, 48), expect)


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_sampling_steps_match_official_euler_cfg(folder, state, guidance):
    parts = ckpt.split(state)
    dit = DeepGenTransformer.from_config(DeepGenTransformer.load_config(folder / "transformer")).eval()
    dit.load_state_dict(parts.transformer)
    ref = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(folder / "transformer")).eval()
    ref.load_state_dict(parts.transformer)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(1, 16, 4, 4, generator=g)
    pos, neg = (torch.randn(1, 6, 32, generator=g), torch.randn(1, 24, generator=g)), \
        (torch.randn(1, 6, 32, generator=g), torch.randn(1, 24, generator=g))
    steps = 3
    with torch.no_grad():
        got = denoise(dit, scheduler, x0.clone(), pos, neg, [], steps, guidance)
        sigmas = official_sigmas(steps, shift=3.0)
        x = x0.double()
        for i in range(steps):
            t = torch.tensor([sigmas[i] * 1000.0])
            cond = ref(x.float(), pos[0], pos[1], t, return_dict=False)[0].double()
            v = cond
            if guidance > 1:
                uncond = ref(x.float(), neg[0], neg[1], t, return_dict=False)[0].double()
                v = uncond + guidance * (cond - uncond)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    assert rel_err(got, x) < TOL


# ----------------------------------------------------------------------------- conversion
class Stranger:
    """A class a weights-only unpickler refuses."""


def test_convert_round_trip_and_refusal(folder, tmp_path, state, capsys):
    out, n = convert(folder / tiny.CHECKPOINT_FILE, tmp_path / "model.safetensors")
    back = ckpt.read_state(out)
    assert n == len(state) and set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    bad = tmp_path / "wrapped.pt"
    torch.save({"state_dict": dict(state), "meta": Stranger()}, bad)
    with pytest.raises(ConversionRefused, match="weights_only=True.*Stranger.*deepgen/cli.py"):
        load_pickle(bad)
    assert convert_main([str(bad)]) == 1 and "--allow-global" in capsys.readouterr().err
    # the command works as a plain script, whatever the pack folder is called
    script = Path(ckpt.__file__).with_name("cli.py")
    wrapped = tmp_path / "ds.pt"
    torch.save({"module": {f"module.{k}": v for k, v in list(state.items())[:5]}}, wrapped)
    proc = subprocess.run([sys.executable, str(script), str(wrapped)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert set(ckpt.read_state(wrapped.with_suffix(".safetensors"))) == set(list(state)[:5])
