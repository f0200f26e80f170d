import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    FP32_OP,
    FP32_UNIT,
    TINY,
    assert_close,
    assert_within_reordering,
    bf16_tolerance,
    max_error,
    relative_error,
    smooth_image,
)
from PIL import Image

from latent_vae import LatentCodec, LatentNormalization, NonFiniteError, build_vae
from latent_vae.codec.latent_codec import _inplace_resnets, interpolate_latents


def codec(**kwargs) -> LatentCodec:
    return LatentCodec(build_vae(kwargs.pop("preset", TINY), seed=0), **kwargs)


def test_encode_shape_and_decode_back_to_the_input_size(tiny_codec):
    images = torch.rand(3, 3, 64, 96) * 2 - 1
    latents = tiny_codec.encode(images)
    assert latents.shape == (3, 16, 4, 6) and latents.dtype == torch.float32
    assert tiny_codec.decode(latents).shape == (3, 3, 64, 96)


@pytest.mark.numerics
def test_sizes_off_the_factor_are_padded_then_cropped_back(tiny_codec):
    image = smooth_image(50, 70)
    encoded = tiny_codec.encode(image, return_dict=True)
    assert encoded.latents.shape[-2:] == (4, 5)  # ceil(50/16), ceil(70/16)
    assert encoded.image_size == (50, 70)
    decoded = tiny_codec.decode(encoded.latents, image_size=encoded.image_size, output_type="np")
    assert decoded.shape == (1, 50, 70, 3) and decoded.dtype == np.uint8
    # padding is by reflection, not a stretch: the left/top part of the input is encoded unchanged
    padded = F.pad(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1, (0, 10, 0, 14), mode="reflect")
    assert_close(tiny_codec.encode(padded), encoded.latents)


def test_different_sizes_in_one_call_are_an_error(tiny_codec):
    with pytest.raises(ValueError, match="different sizes"):
        tiny_codec.encode([smooth_image(32, 32), smooth_image(48, 32)])


@pytest.mark.numerics
@pytest.mark.parametrize("normalization", [
    LatentNormalization(scaling_factor=0.37, shift_factor=-0.2),
    LatentNormalization(scaling_factor=1.5, latents_mean=tuple(np.linspace(-1, 1, 16)),
                        latents_std=tuple(np.linspace(0.5, 2, 16))),
], ids=["global", "per-channel"])
def test_normalisation_is_applied_on_encode_and_exactly_undone_on_decode(normalization):
    plain, scaled = codec(), codec()
    scaled.set_normalization(normalization)
    image = smooth_image(64, 64)
    raw = plain.encode(image)
    latents = scaled.encode(image)
    assert_close(latents, normalization.normalize(raw), FP32_OP)
    assert max_error(latents, raw) > 0.1
    assert_close(scaled.decode(latents), plain.decode(raw))
    assert_close(normalization.denormalize(normalization.normalize(raw)), raw, FP32_OP)


def test_diffusers_convention_for_per_channel_stats():
    # SDXL pipelines decode with z * std / scaling_factor + mean: ours must be the inverse of that
    n = LatentNormalization(scaling_factor=0.5, latents_mean=(1.0, 2.0), latents_std=(4.0, 8.0))
    z = torch.randn(1, 2, 3, 3)
    diffusers_decoded = z * torch.tensor([4.0, 8.0]).view(1, 2, 1, 1) / 0.5 + torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
    assert torch.allclose(n.denormalize(z), diffusers_decoded)


def test_sampling_uses_the_generator_and_differs_from_the_mode(tiny_codec):
    image = smooth_image(64, 64)
    a = tiny_codec.encode(image, sample=True, generator=torch.Generator().manual_seed(1))
    b = tiny_codec.encode(image, sample=True, generator=torch.Generator().manual_seed(1))
    mode = tiny_codec.encode(image, return_dict=True)
    assert torch.equal(a, b)
    assert not torch.allclose(a, mode.latents)
    # the sample is mean + std * noise: within a few standard deviations of the mean
    std = torch.exp(0.5 * mode.logvar)
    assert ((a - mode.mean).abs() / std).max() < 6


def test_every_input_type_gives_the_same_latents(tmp_path, tiny_codec):
    array = smooth_image(48, 64)
    Image.fromarray(array).save(tmp_path / "x.png")
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1
    reference = tiny_codec.encode(tensor)
    for source in [array, Image.fromarray(array), tmp_path / "x.png", str(tmp_path / "x.png"), [array], tensor[None]]:
        assert_close(tiny_codec.encode(source), reference)


def test_grayscale_rgba_palette_and_16_bit_become_rgb(tmp_path, tiny_codec):
    gray = smooth_image(32, 32)[:, :, 0]
    as_rgb = tiny_codec.encode(np.repeat(gray[:, :, None], 3, axis=2))
    assert_close(tiny_codec.encode(gray), as_rgb)
    Image.fromarray((gray.astype(np.uint16) * 257)).save(tmp_path / "g16.png")  # 16-bit grayscale PNG
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert_close(tiny_codec.encode(tmp_path / "g16.png"), as_rgb)
    rgb = smooth_image(32, 32, seed=5)
    opaque = np.concatenate([rgb, np.full((32, 32, 1), 255, np.uint8)], axis=2)
    assert_close(tiny_codec.encode(opaque), tiny_codec.encode(rgb))
    transparent = opaque.copy()
    transparent[..., 3] = 0  # fully transparent composites to white
    assert_close(tiny_codec.encode(transparent), tiny_codec.encode(np.full_like(rgb, 255)))
    palette = Image.fromarray(rgb).quantize(16)
    assert_close(tiny_codec.encode(palette), tiny_codec.encode(np.asarray(palette.convert("RGB"))))


def test_bad_inputs_are_clear_errors(tmp_path, tiny_codec):
    from latent_vae import ImageError

    with pytest.raises(ImageError, match="no such file"):
        tiny_codec.encode(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(ImageError, match="not an image"):
        tiny_codec.encode(tmp_path / "text.png")
    Image.fromarray(smooth_image(64, 64)).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:300])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        tiny_codec.encode(tmp_path / "cut.png")
    with pytest.raises(ImageError, match="uint8"):
        tiny_codec.encode(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ImageError, match="Nx3xHxW"):
        tiny_codec.encode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="5 channels but this model's latent has 16"):
        tiny_codec.decode(torch.zeros(1, 5, 4, 4))


@pytest.mark.numerics
def test_batch_size_only_changes_how_the_work_is_split():
    images = torch.rand(5, 3, 32, 48) * 2 - 1
    assert_close(codec(max_batch_size=2).encode(images), codec(max_batch_size=8).encode(images))


def test_output_types(tiny_codec):
    latents = tiny_codec.encode(smooth_image(32, 48))
    assert tiny_codec.decode(latents, output_type="np").shape == (1, 32, 48, 3)
    (image,) = tiny_codec.decode(latents, output_type="pil")
    assert image.size == (48, 32) and image.mode == "RGB"
    pt = tiny_codec.decode(latents)
    assert pt.min() >= -1 and pt.max() <= 1


@pytest.mark.numerics
def test_tiles_are_exact_where_diffusers_tiles_are_not():
    """An image spanning 3x2 tiles of 256 px: the codec's exact tiles give the whole-image latents and images
    (fp32 summation order aside); diffusers' enable_tiling() on the same weights, per-tile GroupNorm
    statistics and blending, does not."""
    torch.manual_seed(0)
    image = F.interpolate(torch.rand(1, 3, 80, 64), size=(640, 512), mode="bicubic").mul(2).sub(1).clamp(-1, 1)
    untiled, tiled = codec(), codec(tile_size=256)
    reference = untiled.encode(image)

    layout = codec(channels_last=not untiled.channels_last)  # the same function in another fp32 summation order
    exact = relative_error(tiled.encode(image), reference)
    reorder = relative_error(layout.encode(image), reference)
    assert not tiled.last_plan.whole and exact <= 2 * reorder + 16 * FP32_UNIT, (exact, reorder)
    diffusers_vae = build_vae(TINY, seed=0).eval()
    diffusers_vae.enable_tiling()
    diffusers_vae.tile_sample_min_size, diffusers_vae.tile_latent_min_size = 256, 16
    with torch.no_grad():
        approximate = relative_error(diffusers_vae.encode(image).latent_dist.mode(), reference)
    assert approximate > 1000 * max(exact, 16 * FP32_UNIT)
    decoded, tiled_decoded = untiled.decode(reference), tiled.decode(reference)
    assert decoded.shape == tiled_decoded.shape == (1, 3, 640, 512)
    assert_within_reordering(tiled_decoded, decoded, yardstick=layout.decode(reference))


@pytest.mark.numerics
def test_channels_last_and_bf16_stay_close_to_fp32(tiny_codec):
    image = smooth_image(64, 64)
    reference = tiny_codec.encode(image)
    assert tiny_codec.channels_last  # the default: faster convolutions, same numbers within rounding
    assert_close(codec(channels_last=False).encode(image), reference)
    bf16 = codec(dtype="bf16").encode(image)
    assert bf16.dtype == torch.float32
    # bf16 through the encoder's layers: measured 2.2% (relative L2) against sqrt(layers) * 2^-8 = 2.0%.
    layers = sum(isinstance(m, torch.nn.Conv2d) for m in tiny_codec.vae.encoder.modules())
    assert relative_error(bf16, reference) <= 3 * bf16_tolerance(layers)


def test_overflow_in_reduced_precision_raises_instead_of_a_black_image():
    vae = build_vae(TINY, seed=0)
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1e5)  # fp16 tops out at 65504
    half = LatentCodec(vae, dtype="fp16")
    with pytest.raises(NonFiniteError, match="fp16 overflowed: use dtype='fp32'"):
        half.encode(smooth_image(32, 32))


def test_interpolation_starts_and_ends_at_the_inputs(tiny_codec):
    a, b = tiny_codec.encode([smooth_image(32, 32, 1), smooth_image(32, 32, 2)])
    path = interpolate_latents(a, b, 5)
    assert path.shape == (5, 16, 2, 2)
    assert_close(path[0], a, FP32_OP)
    assert_close(path[-1], b, FP32_OP)
    assert max_error(path[2], a) > 0.1


def test_inplace_resnets_are_bit_exact():
    """The codec's in-place resnet blocks change memory traffic, never a number."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 48) * 2 - 1
    plain, fast = build_vae("f16c16-tiny", seed=0).eval(), build_vae("f16c16-tiny", seed=0).eval()
    assert _inplace_resnets(fast) > 0
    with torch.inference_mode():
        z_plain, z_fast = plain.encode(x).latent_dist.mode(), fast.encode(x).latent_dist.mode()
        assert torch.equal(z_plain, z_fast)
        assert torch.equal(plain.decode(z_plain).sample, fast.decode(z_fast).sample)
    # With gradients on, the original forward runs, so training through the model still works.
    fast.decode(z_fast.clone().requires_grad_()).sample.mean().backward()


def test_memory_layout_is_chosen_by_device():
    # channels_last measured faster on CPU and slower on an H100 (GroupNorm): benchmarks/codec_speed
    assert codec().channels_last
    assert not LatentCodec(build_vae(TINY), device="meta").channels_last
    assert LatentCodec(build_vae(TINY), device="meta", channels_last=True).channels_last


@pytest.mark.numerics
@pytest.mark.parametrize("tile_size", [None, 32])  # the whole-image path and exact tiles
def test_a_batch_tensor_is_encoded_as_given_and_left_unchanged(tiny_codec, tile_size):
    # A tensor batch is used without unstacking and restacking it (a copy of the whole batch): the result is
    # that of the same images given one by one, and the caller's tensor is not written to.
    codec = LatentCodec(tiny_codec.vae, tile_size=tile_size)
    batch = torch.stack([torch.from_numpy(smooth_image(48, 40, seed)).permute(2, 0, 1).float() / 127.5 - 1
                         for seed in range(3)])
    given = batch.clone()
    together = codec.encode(batch)
    assert torch.equal(batch, given)
    one_by_one = codec.encode([image for image in given])
    assert_close(together, one_by_one)
