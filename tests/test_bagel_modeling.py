"""BAGEL modeling (pure torch) against independent computations: library classes on the same weights
(transformers' Qwen3 and SigLIP, diffusers' AutoencoderKL and embedding helpers), explicit masks, naive
formulas. Tiny random weights in the real layout (tests/tiny_bagel.py)."""
from __future__ import annotations

import math
import re
from importlib import import_module

import pytest
import torch
from PIL import Image

from tests import tiny_bagel

mb = import_module("gentor.modeling.bagel")
attn = import_module("gentor.modeling.bagel.attention")
emb = import_module("gentor.modeling.bagel.embeddings")
flow = import_module("gentor.modeling.bagel.flow")
model_mod = import_module("gentor.modeling.bagel.model")
pre = import_module("gentor.modeling.bagel.preprocess")
mot = import_module("gentor.modeling.bagel.mot")
vit_mod = import_module("gentor.modeling.bagel.vit")

TINY_RULES = (pre.ResizeRule(64, 32, 16), pre.ResizeRule(56, 28, 14))
ATOL = 1e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_bagel.session_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def parts(folder):
    return tiny_bagel.load_plain(folder)


@pytest.fixture(scope="module")
def engine(parts):
    model, ae, tok = parts
    return mb.BagelEngine(model, ae, tok, *TINY_RULES)


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return float((a - b).abs().max()) <= rel * max(1.0, float(b.abs().max()))


# --- keys and sizes -------------------------------------------------------------------------------------

REAL_LLM = {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4, "rope_theta": 1e6, "rms_norm_eps": 1e-6}
REAL_VIT = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
            "patch_size": 14, "image_size": 980}


def _patterns(names) -> set[str]:
    return {re.sub(r"layers\.\d+\.", "layers.{i}.", n) for n in names}


def _expected_patterns() -> set[str]:
    """The released key set, written out from backend_specs §1.2 (not from our module tree)."""
    lm = "language_model.model."
    out = {"language_model.lm_head.weight", lm + "embed_tokens.weight", lm + "norm.weight", lm + "norm_moe_gen.weight"}
    for sfx in ("", "_moe_gen"):
        layer = lm + "layers.{i}."
        out |= {f"{layer}self_attn.{p}_proj{sfx}.{w}" for p in "qkv" for w in ("weight", "bias")}
        out |= {f"{layer}self_attn.o_proj{sfx}.weight", f"{layer}self_attn.q_norm{sfx}.weight",
                f"{layer}self_attn.k_norm{sfx}.weight"}
        out |= {f"{layer}mlp{sfx}.{p}_proj.weight" for p in ("gate", "up", "down")}
        out |= {f"{layer}{n}{sfx}.weight" for n in ("input_layernorm", "post_attention_layernorm")}
    for m in ("time_embedder.mlp.0", "time_embedder.mlp.2", "vae2llm", "llm2vae", "connector.fc1", "connector.fc2"):
        out |= {f"{m}.weight", f"{m}.bias"}
    out |= {"latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed"}
    vm = "vit_model.vision_model."
    out |= {vm + "embeddings.patch_embedding.weight", vm + "embeddings.patch_embedding.bias",
            vm + "embeddings.position_embedding.weight", vm + "post_layernorm.weight", vm + "post_layernorm.bias"}
    for m in ("layer_norm1", "layer_norm2", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
              "self_attn.out_proj", "mlp.fc1", "mlp.fc2"):
        out |= {f"{vm}encoder.layers.{{i}}.{m}.weight", f"{vm}encoder.layers.{{i}}.{m}.bias"}
    return out


def test_real_size_keys_and_shapes_match_the_release():
    """The full-size module tree (built on meta) has the released key set and shapes (backend_specs §1.2)."""
    cfg = mb.BagelConfig(mb.LLMConfig.from_dict(REAL_LLM), mb.ViTConfig.from_dict(REAL_VIT))
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = mb.Bagel(cfg)
        ae = mb.AutoEncoder(cfg.ae)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert _patterns(shapes) == _expected_patterns()
    h = 3584
    expected = {
        "language_model.model.embed_tokens.weight": (152064, h), "language_model.lm_head.weight": (152064, h),
        "language_model.model.norm_moe_gen.weight": (h,),
        "language_model.model.layers.27.self_attn.k_proj_moe_gen.bias": (512,),
        "language_model.model.layers.0.self_attn.q_norm_moe_gen.weight": (128,),
        "language_model.model.layers.0.self_attn.o_proj.weight": (h, h),
        "language_model.model.layers.0.mlp_moe_gen.down_proj.weight": (h, 18944),
        "time_embedder.mlp.0.weight": (h, 256), "time_embedder.mlp.2.weight": (h, h),
        "vae2llm.weight": (h, 64), "llm2vae.weight": (64, h), "latent_pos_embed.pos_embed": (4096, h),
        "vit_pos_embed.pos_embed": (4900, h), "connector.fc1.weight": (h, 1152), "connector.fc2.weight": (h, h),
        "vit_model.vision_model.embeddings.patch_embedding.weight": (1152, 588),
        "vit_model.vision_model.embeddings.position_embedding.weight": (4900, 1152),
        "vit_model.vision_model.encoder.layers.25.mlp.fc1.weight": (4304, 1152),
        "vit_model.vision_model.post_layernorm.bias": (1152,),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    assert "vit_model.vision_model.encoder.layers.26.mlp.fc1.weight" not in shapes  # 27 - 1 layers used
    assert not any("o_proj.bias" in k or "o_proj_moe_gen.bias" in k or "rotary" in k for k in shapes)
    # ema.safetensors: 29.2 GB of bf16 -> ~14.6 B parameters; ae.safetensors: 335 MB of fp32 -> ~83.8 M.
    assert abs(sum(math.prod(s) for s in shapes.values()) * 2 / 29.2e9 - 1) < 0.01
    ae_shapes = {k: tuple(v.shape) for k, v in ae.state_dict().items()}
    assert abs(sum(math.prod(s) for s in ae_shapes.values()) * 4 / 335e6 - 1) < 0.01
    for key in ("encoder.down.0.block.0.norm1.weight", "encoder.mid.attn_1.q.weight",
                "decoder.up.3.upsample.conv.weight", "encoder.down.1.block.0.nin_shortcut.weight"):
        assert key in ae_shapes
    assert mb.AEConfig.from_shapes(ae_shapes) == cfg.ae


def test_tiny_files_load_strictly_with_every_key(folder):
    from safetensors import safe_open

    model, ae, _ = tiny_bagel.load_plain(folder)  # strict=True inside
    with safe_open(str(folder / "ema.safetensors"), "pt") as f:
        assert set(f.keys()) == set(model.state_dict())
    assert _patterns(model.state_dict()) == _expected_patterns()


# --- attention and the packed cache ----------------------------------------------------------------------

def split_mask(splits: list[tuple[int, str]]) -> torch.Tensor:
    """The official per-sample mask of a packed sequence: 'causal' splits see the past and themselves causally,
    'full' splits see the past and all of themselves (True = attend)."""
    n = sum(s for s, _ in splits)
    mask = torch.zeros(n, n, dtype=torch.bool)
    start = 0
    for size, mode in splits:
        block = torch.ones(size, size, dtype=torch.bool)
        mask[start:start + size, start:start + size] = block.tril() if mode == "causal" else block
        mask[start:start + size, :start] = True
        start += size
    return mask


def naive_attention(q, k, v, mask):
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(q.shape[0], -1)


@pytest.mark.parametrize("mode", ["causal", "full"])
def test_packed_attention_equals_explicit_mask(mode):
    g = torch.Generator().manual_seed(0)
    splits = [(5, "causal"), (7, "full"), (4, mode)]
    n, last = 16, 4
    q = torch.randn(n, 4, 8, generator=g)
    k = torch.randn(n, 2, 8, generator=g)
    v = torch.randn(n, 2, 8, generator=g)
    ours = attn.packed_attention(q[-last:], k, v, causal=mode == "causal")
    ref = naive_attention(q, k, v, split_mask(splits))[-last:]
    assert close(ours, ref)


def test_kv_cached_context_equals_one_packed_pass(engine):
    """Context built segment by segment (cache) == the whole packed sequence at once with the official mask;
    covers RoPE positions (one per image block), expert routing and the velocity head."""
    model = engine.model
    image = Image.new("RGB", (48, 32), (30, 200, 90))
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ctx = engine.build_contexts(["hello", image, "paint it"], torch.Generator().manual_seed(2), (32, 64))
        cached = engine.velocity(ctx.gen, x, 32, 64, 0.7)
        # the same inputs as explicit queries
        latent = engine.encode_latent(engine.vae_rule.resize(image), torch.Generator().manual_seed(2))
        queries = [engine.text_query("hello"), engine.latent_query(latent, 32, 48, 0.0),
                   engine.vit_query(image), engine.text_query("paint it"), engine.latent_query(x, 32, 64, 0.7)]
        ids, ids_at, extras, extras_at, pos, gen_idx, start, p = [], [], [], [], [], [], 0, 0
        for q in queries:
            extra, at = model.embed_extra(q, torch.device("cpu"))
            ids.append(q.text_ids)
            ids_at.append(q.text_index + start)
            if extra is not None:
                extras.append(extra)
                extras_at.append(at + start)
            pos.append(q.position_ids(p))
            p += q.positions if q.positions > 1 else 1
            if q.latent is not None:
                gen_idx.append(q.latent.index + start)
            start += q.length
        gen = torch.cat(gen_idx)
        und = torch.tensor(sorted(set(range(start)) - set(gen.tolist())))
        mask = split_mask([(q.length, "causal" if q.causal else "full") for q in queries])
        hidden, _, _ = model.language_model.model(torch.cat(ids), torch.cat(ids_at), torch.cat(extras),
                                                   torch.cat(extras_at), torch.cat(pos), mot.Route(und, gen),
                                                   mb.KVCache.empty(2), False, mask)
        one_pass = model.llm2vae(hidden[queries[-1].latent.index + start - queries[-1].length])
    assert ctx.gen.length == start - queries[-1].length
    assert close(cached, one_pass)


def _qwen3_from_und_expert(model, cfg):
    """transformers' Qwen3 (q/k norm before RoPE) carrying the understanding expert's weights."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    llm = cfg.llm
    hf_cfg = Qwen3Config(vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
                         intermediate_size=llm.intermediate_size, num_hidden_layers=llm.num_layers,
                         num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
                         head_dim=llm.head_dim, rms_norm_eps=llm.rms_norm_eps, rope_theta=llm.rope_theta,
                         attention_bias=True, tie_word_embeddings=False, attn_implementation="eager")
    hf = Qwen3ForCausalLM(hf_cfg).eval()
    sd = {k.removeprefix("language_model."): v for k, v in model.state_dict().items()
          if k.startswith("language_model.") and "moe_gen" not in k}
    for k in list(hf.state_dict()):
        if k.endswith("o_proj.bias"):
            sd[k] = torch.zeros_like(hf.state_dict()[k])  # BAGEL's o_proj has no bias
    hf.load_state_dict(sd, strict=True)
    return hf


def test_understanding_expert_and_greedy_decoding_equal_transformers_qwen3(engine):
    model = engine.model
    hf = _qwen3_from_und_expert(model, model.cfg)
    ids = engine.ids
    with torch.no_grad():
        cache = engine.add_text(engine.empty(), "a cat")
        cache = engine.add_text(cache, "on a mat")
        text, cut = engine.generate_text(cache, 6)
        prefix = engine.text_query("a cat").text_ids.tolist() + engine.text_query("on a mat").text_ids.tolist()
        out = hf.generate(torch.tensor([prefix + [ids.bos]]), max_new_tokens=5, do_sample=False,
                          eos_token_id=ids.eos, pad_token_id=ids.eos)
        ours_logits, _ = model(model_mod.Query(1, torch.tensor([ids.bos]), torch.arange(1), 1, True), cache,
                               model_mod.HEAD_LOGITS)
        hf_logits = hf(torch.tensor([prefix + [ids.bos]])).logits[0, -1:]
    assert close(ours_logits, hf_logits)
    new = out[0, len(prefix) + 1:].tolist()
    expected = engine.tokenizer.decode([t for t in new if t != ids.eos], skip_special_tokens=False)
    assert text == expected.split("<|im_end|>")[0].split("<|im_start|>")[0]
    assert cut == (ids.eos not in new)


# --- vision tower, autoencoder, embeddings ----------------------------------------------------------------

def test_vit_equals_transformers_siglip(parts):
    """Our packed ViT vs transformers' SiglipVisionModel on the tiny weights. A 56 px image (4x4 patches) keeps
    it fast: both models get the 16 position rows of that grid from the 70x70 table (rows r*70+c)."""
    from dataclasses import replace

    from transformers import SiglipVisionConfig, SiglipVisionModel

    model = parts[0]
    vc = model.cfg.vit
    side, p = 56, vc.patch_size
    grid = side // p
    hf = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size, num_hidden_layers=vc.num_layers,
        num_attention_heads=vc.num_heads, image_size=side, patch_size=p,
        layer_norm_eps=vc.layer_norm_eps, vision_use_head=False, attn_implementation="eager")).eval()
    prefix = "vit_model.vision_model."
    sd = {k.removeprefix(prefix): v for k, v in model.state_dict().items() if k.startswith(prefix)}
    rows = emb.flattened_position_ids(side, side, p, 70)  # the grid's rows in the 70x70 table
    sd["embeddings.position_embedding.weight"] = sd["embeddings.position_embedding.weight"][rows]
    ours_vit = vit_mod.SiglipNavit(replace(vc, image_size=side)).eval()
    ours_vit.load_state_dict({"vision_model." + k: v for k, v in sd.items()}, strict=True)
    w = sd["embeddings.patch_embedding.weight"]
    # Linear over (row, col, channel) -> Conv2d [out, channel, row, col]
    sd["embeddings.patch_embedding.weight"] = w.reshape(w.shape[0], p, p, 3).permute(0, 3, 1, 2)
    if any(k.startswith("vision_model.") for k in hf.state_dict()):  # transformers < 5 nests the keys
        sd = {"vision_model." + k: v for k, v in sd.items()}
    hf.load_state_dict(sd, strict=True)
    pixels = torch.rand(3, side, side, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        ref = hf(pixel_values=pixels.unsqueeze(0)).last_hidden_state[0]
        ours = ours_vit(emb.patchify(pixels, p), emb.flattened_position_ids(side, side, p, grid), [grid * grid])
        # the tiny model itself: the 70-wide ids pick the same rows, and packing two images == each alone
        full = model.vit_model(emb.patchify(pixels, p), rows, [rows.numel()])
        small = pixels[:, :28, :42]
        sid = emb.flattened_position_ids(28, 42, p, 70)
        both = model.vit_model(torch.cat([emb.patchify(small, p), emb.patchify(pixels, p)]),
                               torch.cat([sid, rows]), [sid.numel(), rows.numel()])
        alone = model.vit_model(emb.patchify(small, p), sid, [sid.numel()])
    assert close(ours, ref) and close(full, ref)
    assert close(both[sid.numel():], ref) and close(both[:sid.numel()], alone)
    assert sid.tolist() == [0, 1, 2, 70, 71, 72]


def test_autoencoder_equals_diffusers_autoencoderkl(parts):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ae = parts[1]
    c = ae.cfg
    config = {"in_channels": 3, "out_channels": 3, "latent_channels": c.z_channels,
              "block_out_channels": [c.ch * m for m in c.ch_mult], "layers_per_block": c.num_res_blocks,
              "down_block_types": ["DownEncoderBlock2D"] * len(c.ch_mult),
              "up_block_types": ["UpDecoderBlock2D"] * len(c.ch_mult), "norm_num_groups": 32,
              "use_quant_conv": False, "use_post_quant_conv": False, "act_fn": "silu"}
    ref = AutoencoderKL(**config).eval()
    ref.load_state_dict(convert_ldm_vae_checkpoint(ae.state_dict(), config), strict=True)
    x = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        mean = ref.encode(x).latent_dist.mean
        ours = ae.encode(x, sample=False)
        dec_ref = ref.decode(ours / c.scale_factor + c.shift_factor).sample
        dec = ae.decode(ours)
        sampled = ae.encode(x, generator=torch.Generator().manual_seed(5))
        again = ae.encode(x, generator=torch.Generator().manual_seed(5))
    assert close(ours, c.scale_factor * (mean - c.shift_factor))
    assert close(dec, dec_ref)
    assert torch.equal(sampled, again) and not torch.equal(sampled, ours)


def test_embeddings_equal_diffusers_formulas():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed, get_timestep_embedding

    t = torch.tensor([0.0, 0.37, 1.0])
    emb_mod = emb.TimestepEmbedder(16)
    ref = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert close(emb_mod.frequencies(t), ref)
    table = emb.sincos_2d_table(32, 7)
    ref_table = get_2d_sincos_pos_embed(32, 7, base_size=7, output_type="pt")
    assert close(table, ref_table.float())


def test_patchify_round_trip_and_order():
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(2, 4, 6)
    tokens = emb.patchify(x, 2)
    # token 0 = top-left patch, flattened (row, col, channel)
    assert tokens[0].tolist() == [x[c, r, q].item() for r in range(2) for q in range(2) for c in range(2)]
    assert torch.equal(emb.unpatchify_latent(tokens, 2, 3, 2, 2), x)


# --- flow / CFG ------------------------------------------------------------------------------------------

def test_timestep_grid_and_interval():
    grid = flow.timesteps(5, 3.0)
    t = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    assert close(grid, 3 * t / (1 + 2 * t))
    assert flow.branches(4.0, 2.0, 0.5, (0.4, 1.0)) == (True, True)
    assert flow.branches(4.0, 2.0, 0.4, (0.4, 1.0)) == (False, False)  # left end excluded
    assert flow.branches(1.0, 2.0, 0.9, (0.0, 1.0)) == (False, False)  # no text CFG -> no image CFG
    assert flow.branches(4.0, 1.0, 0.9, (0.0, 1.0)) == (True, False)


def test_renorm_types_follow_their_definitions():
    g = torch.Generator().manual_seed(6)
    v, vt, vi = (torch.randn(6, 4, generator=g) for _ in range(3))
    st, si = 4.0, 2.0
    guided_text = vt + st * (v - vt)
    full = vi + si * (guided_text - vi)
    # global: one ratio for everything
    expect_global = full * min(1.0, float(v.norm() / full.norm()))
    # channel: one ratio per token (row)
    expect_channel = torch.stack([full[i] * min(1.0, float(v[i].norm() / full[i].norm())) for i in range(6)])
    # text_channel: per-token ratio on the text-guided part only, then plain image CFG
    scaled = torch.stack([guided_text[i] * min(1.0, float(v[i].norm() / guided_text[i].norm()))
                          for i in range(6)])
    expect_tc = vi + si * (scaled - vi)
    got = {r: flow.combine(v, vt, vi, st, si, r, 0.0) for r in flow.RENORM_TYPES}
    assert close(got["global"], expect_global, 1e-6)
    assert close(got["channel"], expect_channel, 1e-6)
    assert close(got["text_channel"], expect_tc, 1e-6)
    assert not close(got["global"], got["channel"]) and not close(got["channel"], got["text_channel"])
    # renorm_min = 1 disables the rescale
    assert close(flow.combine(v, vt, vi, st, si, "global", 1.0), full, 1e-6)
    assert flow.combine(v, None, None, st, si, "global", 0.0) is v


@pytest.mark.parametrize(("cfg_text", "cfg_img", "expected"), [(4.0, 2.0, 3 + 3 + 3 + 1), (4.0, 1.0, 2 + 2 + 2 + 1),
                                                              (1.0, 2.0, 4)])
def test_forward_passes_per_step(engine, cfg_text, cfg_img, expected):
    """steps=5, shift 1: t = 1, .75, .5, .25; interval (0.4, 1] -> CFG on the first three steps only."""
    ctx = engine.build_contexts(["go"], None, (32, 32))
    calls = []
    handle = engine.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            engine.generate_image(ctx, torch.randn(4, 64), mb.FlowSettings(5, cfg_text, cfg_img, (0.4, 1.0),
                                                                              "global", 0.0, 1.0))
    finally:
        handle.remove()
    assert len(calls) == expected


def test_contexts_follow_the_reference_layout(engine):
    image = Image.new("RGB", (80, 48), (10, 20, 30))
    with torch.no_grad():
        ctx = engine.build_contexts([image, "make it blue"], torch.Generator().manual_seed(0), (1024, 1024))
    text = len(engine.text_query("make it blue").text_ids)
    vae_tokens = (32 // 16) * (64 // 16)  # 80x48 -> 64x32 by the tiny VAE rule (long <= 64, short >= 32)
    vit_tokens = (28 // 14) * (56 // 14)  # 64x32 -> 56x28 by the tiny ViT rule
    assert ctx.size == (32, 64)
    assert ctx.cfg_text.length == vae_tokens + 2 + vit_tokens + 2
    assert ctx.gen.length == ctx.cfg_text.length + text
    assert ctx.cfg_img.length == text
    assert (ctx.gen.next_position, ctx.cfg_text.next_position, ctx.cfg_img.next_position) == (2 + text, 2, text)


def test_resize_rule_matches_the_reference_examples():
    assert pre.VAE_RULE.size(1024, 1024) == (1024, 1024)
    assert pre.VIT_RULE.size(1024, 1024) == (980, 980)
    assert pre.VAE_RULE.size(300, 200) == (768, 512)  # short side raised to 512
    assert pre.VAE_RULE.size(4000, 1000) == (1024, 256)  # long side capped at 1024


BLOCKS = import_module("gentor.registry").get("bagel").block_paths("model")


def _onload_owners(module: torch.nn.Module, block_modules: set[str], prefix: str = "") -> dict[str, str]:
    """leaf name -> the module whose forward onloads it under diffusers' block-level group offloading with
    nested ``block_modules`` (its documented rule: named children recurse, ModuleList items are groups,
    everything else belongs to the enclosing module's group)."""
    owners = {}
    for name, child in module.named_children():
        full = prefix + name
        if name in block_modules:
            owners.update(_onload_owners(child, block_modules, full + "."))
        elif isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            for i, block in enumerate(child):
                owners.update({f"{full}.{i}.{n}" if n else f"{full}.{i}": f"{full}.{i}"
                               for n, _ in block.named_modules()})
        else:
            owners.update({f"{full}.{n}" if n else full: prefix.rstrip(".") for n, _ in child.named_modules()})
    return owners


def test_every_weight_is_used_inside_the_forward_that_block_offload_onloads_it_with(engine):
    """On a GPU a weight used outside its owner's forward would still sit on the CPU: check the call stack."""
    model = engine.model
    block_modules = {part for p in BLOCKS for part in p.split(".")[:-1]}
    owners = _onload_owners(model, block_modules)
    names = {m: n for n, m in model.named_modules()}
    active: list[str] = []
    bad: set[str] = set()
    handles = []

    def pre(mod, _args):
        name = names[mod]
        if any(True for _ in mod.parameters(recurse=False)):
            owner = owners.get(name, "")
            if owner and owner not in active:
                bad.add(f"{name} (owner {owner})")
        active.append(name)

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(lambda *_: (active.pop(), None)[1]))
    try:
        with torch.no_grad():
            image = Image.new("RGB", (40, 40), (1, 2, 3))
            ctx = engine.build_contexts([image, "x"], torch.Generator().manual_seed(0), (32, 32))
            engine.velocity(ctx.gen, torch.randn(4, 64), 32, 32, 0.5)
            engine.generate_text(ctx.gen, 2)
    finally:
        for h in handles:
            h.remove()
    assert not bad, sorted(bad)
    assert set(owners.values()) >= {"", "language_model", "language_model.model", "vit_model.vision_model"}
