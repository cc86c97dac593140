"""Qwen-Image VAE tiling (samplers/qwen_image_vae.py): a tiled decode is the tiles' whole decodes blended linearly
over the seam (computed here independently), tiled and whole decodes agree within a stated tolerance at a size
that needs two tiles, and the memory estimate covers what a decode of the real-width VAE allocates (counted on the
meta device, nothing computed)."""
from __future__ import annotations

import pytest
import torch

from benchmarks.bench_qwen_image_vae import REAL_VAE_CONFIG, live_bytes_tracker
from gentor.modeling.qwen_image.vae import StillImageQwenImageVAE, still_image_vae21
from gentor.samplers import qwen_image_vae
from tests import tiny_models, tiny_qwen21

SPATIAL = 8  # the VAE's spatial compression
STRIDE_PX = 192  # diffusers' tile stride: 256 px tiles overlap by 64 px
SEAM_PX = qwen_image_vae.TILE_PX - STRIDE_PX
# 192 x 384 px: one tile row, two tiles across (x 0..256 and 192..384), one 64 px seam.
TWO_TILES_LATENT = (24, 48)
EXACT = 1e-5  # fp32, the same convolutions on the same latents in another order
# Tiled vs whole at two tiles, relative to the whole decode's largest |pixel| (random tiny VAE; measured here: mean
# 0.44%, max 17% inside the 64 px seam, up to 9% elsewhere). Each tile sees zero padding where the whole decode sees
# the neighbouring latents, and the random decoder's receptive field spans most of a tile.
TILED_MEAN_TOLERANCE = 0.01
TILED_MAX_TOLERANCE = 0.3
# The estimate may exceed what a Qwen-Image decode allocates (it also covers the 2.1 VAE's larger peak and the CPU's
# oneDNN copies, see samplers/qwen_image_vae.py), but by less than this, or "auto" would tile decodes that fit.
ESTIMATE_SLACK = 1.4
OUTPUT_SCALE = 0.25
STILL = "StillImageQwenImageVAE"  # the engine's classes (modeling/qwen_image/vae.py)
STILL21 = "StillImageQwenImage21VAE"
# Diffusers' whole decode keeps a frame cache at every causal conv; without them the real-size decode allocates
# 0.39x (counted: 2048 px fp32 11.3 vs 29.0 GB). Checked below with margin.
STILL_IMAGE_MAX_SHARE = 0.5
STILL21_MAX_SHARE = 0.6  # 2.1's VAE: 0.52x (counted at 512 px: 1.66 vs 3.22 GB)


@pytest.fixture(scope="module")
def vae():
    vae = tiny_models.build_qwen_vae(torch)
    # diffusers clamps a whole decode to -1..1 but not the blended tiles (the pipeline's post-processing clamps
    # both); scale the random output layer so no pixel saturates and the clamp plays no part in the comparisons.
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(OUTPUT_SCALE)
        vae.decoder.conv_out.bias.mul_(OUTPUT_SCALE)
    return vae


def two_tile_latents() -> torch.Tensor:
    return torch.randn(1, 16, 1, *TWO_TILES_LATENT, generator=torch.Generator().manual_seed(0))


def decode(vae, z: torch.Tensor, tiled: bool) -> torch.Tensor:
    qwen_image_vae.apply(vae, tiled)
    with torch.inference_mode():
        return vae.decode(z).sample[:, :, 0]


def test_vae_tiled_decode_is_two_whole_tile_decodes_blended_over_the_seam(vae):
    z = two_tile_latents()
    tiled = decode(vae, z, tiled=True)
    left_cols = qwen_image_vae.TILE_PX // SPATIAL
    left = decode(vae, z[..., :left_cols], tiled=False)  # x 0..256
    right = decode(vae, z[..., STRIDE_PX // SPATIAL:], tiled=False)  # x 192..384
    ramp = torch.arange(SEAM_PX, dtype=torch.float32) / SEAM_PX  # weight of the right tile across the seam
    seam = left[..., STRIDE_PX:] * (1 - ramp) + right[..., :SEAM_PX] * ramp
    expected = torch.cat([left[..., :STRIDE_PX], seam, right[..., SEAM_PX:]], dim=-1)
    assert tiled.shape == expected.shape == (1, 3, 192, 384)
    assert max(left.abs().max(), right.abs().max()) < 1, "no pixel clamped (else the blend of clamps differs)"
    torch.testing.assert_close(tiled, expected, rtol=EXACT, atol=EXACT)


def test_vae_tiled_and_whole_decodes_agree_within_tolerance_at_two_tiles(vae):
    z = two_tile_latents()
    whole = decode(vae, z, tiled=False)
    assert not vae.use_tiling and not vae.use_slicing
    tiled = decode(vae, z, tiled=True)
    assert vae.use_tiling and vae.use_slicing
    scale = float(whole.abs().max())
    assert scale < 1, "no pixel clamped"
    diff = (whole - tiled).abs() / scale
    assert diff.max() > 0, "the tiled path really ran (else the comparison is blind)"
    assert float(diff.mean()) < TILED_MEAN_TOLERANCE, f"mean |tiled - whole| = {float(diff.mean()):.2%} of the range"
    assert float(diff.max()) < TILED_MAX_TOLERANCE, f"max |tiled - whole| = {float(diff.max()):.2%} of the range"


def test_vae_choose_modes():
    assert qwen_image_vae.choose("on", untiled_fits=True)[0] is True
    assert qwen_image_vae.choose("off", untiled_fits=False) == (False, "")
    assert qwen_image_vae.choose("auto", untiled_fits=True) == (False, "")
    tiled, note = qwen_image_vae.choose("auto", untiled_fits=False)
    assert tiled and "would not fit" in note


# ----------------------------------------------------------------------------- the estimate vs allocations
# Counted on the meta device (nothing computed): the bytes of live tensor storages after every op, as an allocator
# without caching would hold them.
def test_vae_live_bytes_counter_counts_a_known_sequence():
    counter = live_bytes_tracker()  # the benchmark's instrument, checked here
    with counter:
        a = torch.ones(256, device="meta")  # 1 KiB
        b = a * 2  # 2 KiB live
        del a
        c = b.view(16, 16) + 1  # a view adds nothing: b + c = 2 KiB
        del b, c
        torch.empty(1024, device="meta")  # 4 KiB alone
    assert counter.peak == 4096


def allocated_peak(vae_class: str, width: int, height: int, tiled: bool) -> tuple[int, int]:
    """(peak bytes a decode allocates, the decoder's base width) for the real-size VAE of ``vae_class``."""
    import diffusers

    cls = {STILL: StillImageQwenImageVAE, STILL21: still_image_vae21()}.get(vae_class) or getattr(diffusers, vae_class)
    with torch.device("meta"):
        # Qwen-Image: the released config; 2.1: diffusers' defaults (decoder_base_dim 144, 16x compression)
        vae = (cls() if vae_class in (STILL21, "AutoencoderKLQwenImage21") else cls(**REAL_VAE_CONFIG)).eval()
    qwen_image_vae.apply(vae, tiled)
    spatial = 2 ** (len(vae.config.dim_mult) - 1)  # a 2x down/upsample between stages (the shape is checked)
    z = torch.empty(1, vae.config.z_dim, 1, height // spatial, width // spatial, device="meta")
    counter = live_bytes_tracker()
    with torch.inference_mode(), counter:
        out = vae.decode(z).sample
    assert out.shape[-2:] == (height, width)
    return counter.peak, vae.config.get("decoder_base_dim") or vae.config.base_dim


@pytest.mark.parametrize(("vae_class", "width", "height", "tiled"), [
    (STILL, 256, 256, False), (STILL, 384, 192, True), (STILL21, 256, 256, False), (STILL21, 512, 256, True)])
def test_vae_decode_estimate_covers_the_allocations_of_the_real_size_vae(vae_class, width, height, tiled):
    counted, base_dim = allocated_peak(vae_class, width, height, tiled)
    factor = {STILL: qwen_image_vae.STILL_IMAGE_DECODE_FACTOR,
              STILL21: qwen_image_vae.STILL_IMAGE21_DECODE_FACTOR}[vae_class]
    estimate = qwen_image_vae.decode_bytes(width, height, 1, base_dim, 4, tiled, factor)
    scratch = qwen_image_vae.DECODE_SCRATCH_BYTES  # CPU scratch: no tensor of the decode
    assert counted <= estimate <= counted * ESTIMATE_SLACK + scratch, (
        f"estimate {estimate / 1e9:.3f} GB, counted {counted / 1e9:.3f} GB")


# ----------------------------------------------------------------------------- still images without frame caches
def test_still_image_vae_encodes_and_decodes_exactly_as_diffusers_without_its_frame_caches(vae):
    """The engine's VAE class gives diffusers' output bit for bit on one frame (and on a video, which keeps
    diffusers' path), from the same weights."""
    still = StillImageQwenImageVAE(**vae.config).eval()
    still.load_state_dict(vae.state_dict())
    gen = torch.Generator().manual_seed(4)
    z, video = torch.randn(1, 16, 1, 12, 10, generator=gen), torch.randn(1, 16, 3, 6, 6, generator=gen)
    pixels = torch.rand(1, 3, 1, 64, 48, generator=gen) * 2 - 1
    for model in (vae, still):
        qwen_image_vae.apply(model, tiled=False)
    with torch.inference_mode():
        assert torch.equal(still.decode(z).sample, vae.decode(z).sample)
        assert torch.equal(still.decode(video).sample, vae.decode(video).sample)
        assert torch.equal(still.encode(pixels).latent_dist.mean, vae.encode(pixels).latent_dist.mean)


@pytest.mark.parametrize(("ours", "theirs", "share"), [
    (STILL, "AutoencoderKLQwenImage", STILL_IMAGE_MAX_SHARE), (STILL21, "AutoencoderKLQwenImage21", STILL21_MAX_SHARE)])
def test_still_image_vae_decode_allocates_less_than_diffusers(ours, theirs, share):
    mine, _ = allocated_peak(ours, 512, 512, tiled=False)
    diffusers_peak, _ = allocated_peak(theirs, 512, 512, tiled=False)
    assert mine < share * diffusers_peak, f"{mine / 1e9:.2f} GB vs diffusers' {diffusers_peak / 1e9:.2f} GB"


def test_still_image_vae21_encodes_and_decodes_exactly_as_diffusers():
    """2.1's VAE (RGBA, its decoder's first chunk is special) gives diffusers' output bit for bit too."""
    import diffusers

    torch.manual_seed(5)
    theirs = diffusers.AutoencoderKLQwenImage21(**tiny_qwen21.VAE_CONFIG).eval()
    ours = still_image_vae21()(**theirs.config).eval()
    ours.load_state_dict(theirs.state_dict())
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(1, theirs.config.z_dim, 1, 4, 6, generator=gen)
    pixels = torch.rand(1, 4, 1, 64, 96, generator=gen) * 2 - 1
    with torch.inference_mode():
        assert torch.equal(ours.decode(z).sample, theirs.decode(z).sample)
        assert torch.equal(ours.encode(pixels).latent_dist.mean, theirs.encode(pixels).latent_dist.mean)


def test_the_qwen_image_loader_builds_the_still_image_vae(model_roots):
    from gentor.loaders.cache import CACHE
    from tests.qwen_helpers import t2i

    CACHE.unload()
    t2i()
    assert [type(e.value) for e in CACHE.entries("autoencoder_kl_qwen_image")] == [StillImageQwenImageVAE]
    CACHE.unload()
