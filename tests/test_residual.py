"""ResidualAutoencoderKL: DC-AE-style parameter-free shortcuts on diffusers' AutoencoderKL."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers import AutoencoderKL
from helpers import FP32_OP, assert_close, assert_within_reordering, max_error, smooth_image

from latent_vae import LatentCodec, build_vae, get_preset, load_vae, save_vae
from latent_vae.images.metrics import psnr
from latent_vae.models.loading import MODEL_CLASSES
from latent_vae.models.residual import (
    DOWN_BLOCK,
    ResidualAutoencoderKL,
    channel_resize,
    channel_to_space,
    space_to_channel,
    thumbnail_code,
    thumbnail_image,
    untrained_code_model,
)

TINY_RES = "f16c16-tiny-res"


def tiny(shortcut: str = "stage", seed: int = 0, **kwargs) -> ResidualAutoencoderKL:
    torch.manual_seed(seed)
    return ResidualAutoencoderKL(**get_preset("f16c16-tiny").diffusers_config(), shortcut=shortcut, **kwargs).eval()


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- the parameter-free shortcut math ---------------------------------------------------------------


@pytest.mark.parametrize("c_in,c_out", [(12, 4), (32, 3), (3, 32), (8, 8), (16, 64)])
def test_channel_resize_repeat_then_average_is_identity(c_in, c_out):
    """Growing repeats channels, shrinking averages the same groups back: exact even for uneven groups."""
    x = torch.randn(2, c_in, 3, 5)
    assert channel_resize(x, c_out).shape == (2, c_out, 3, 5)
    if c_out >= c_in:
        assert_close(channel_resize(channel_resize(x, c_out), c_in), x, FP32_OP)


def test_space_to_channel_averages_pixel_blocks():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    # 4x4 blocks give 48 channels; averaging down to 3 averages each colour's whole block
    expected = torch.nn.functional.avg_pool2d(x, 4)
    assert torch.allclose(space_to_channel(x, 3, 4), expected)
    with pytest.raises(ValueError, match="divisible by 4"):
        space_to_channel(x[..., :6], 3, 4)


def test_block_code_reconstructs_a_blockwise_constant_image_exactly():
    """The decoder shortcut's images are blockwise constant; the encoder shortcut recovers their code."""
    grey_blocks = torch.randn(1, 1, 2, 3).repeat(1, 3, 1, 1)  # constant on 16x16 blocks
    image = torch.nn.functional.interpolate(grey_blocks, scale_factor=16, mode="nearest")
    assert_close(channel_to_space(space_to_channel(image, 16, 16), 3, 16), image, FP32_OP)
    code = torch.randn(1, 16, 2, 3)
    decoded = channel_to_space(code, 3, 16)
    assert_close(space_to_channel(decoded, 16, 16), code, FP32_OP)


# the encoder and decoder shortcuts of each whole-network code, for a 16-channel f16 latent
WHOLE_NETWORK_CODES = {
    "global": (lambda x: space_to_channel(x, 16, 16), lambda z: channel_to_space(z, 3, 16)),
    "thumbnail": (lambda x: thumbnail_code(x, 16, 16), lambda z: thumbnail_image(z, 16)),
}


@pytest.mark.numerics
@pytest.mark.parametrize("shortcut", sorted(WHOLE_NETWORK_CODES))
def test_untrained_whole_network_model_is_exactly_its_code(shortcut):
    encode, decode = WHOLE_NETWORK_CODES[shortcut]
    vae = tiny(shortcut)
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        decoded = vae.decode(posterior.mode()).sample
    assert_close(posterior.mean, encode(x), FP32_OP)
    assert posterior.std.max() < 0.01  # near-deterministic: sampling does not drown the code
    assert_close(decoded, decode(posterior.mean), FP32_OP)


@pytest.mark.numerics
def test_untrained_stage_model_is_a_parameter_free_code():
    """zero_init: every branch is zero, so the model is the chain of shortcuts: linear and weight-free."""
    a, b = tiny("stage", seed=0), tiny("stage", seed=1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out_a, out_b = a(x).sample, b(x).sample
        assert_close(out_a, out_b, FP32_OP)  # no random weight reaches the output
        assert_close(a(2 * x).sample, 2 * out_a)  # linear
        # a blockwise-constant grey image survives the stage code
        grey = torch.nn.functional.interpolate(torch.randn(1, 1, 2, 2), scale_factor=16).repeat(1, 3, 1, 1)
        assert_close(a(grey).sample, grey)


# -- the thumbnail shortcut -------------------------------------------------------------------------


def luma(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]


def test_thumbnail_code_is_the_block_luma_grid_and_mean_chroma():
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    code = thumbnail_code(x, 16, 16)
    assert code.shape == (1, 16, 2, 3)
    y = luma(x)
    # latent pixel (1, 2) covers rows 16..31, cols 32..47; its 3x3 luma cells are 16/3 px wide (6 px, overlapping
    # by one); channel 3*i+j is cell (i, j)
    assert_close(code[0, 0, 1, 2], y[0, 16:22, 32:38].mean(), FP32_OP)
    assert_close(code[0, 5, 1, 2], y[0, 21:27, 42:48].mean(), FP32_OP)
    cb = -0.168736 * x[:, 0] - 0.331264 * x[:, 1] + 0.5 * x[:, 2]
    assert_close(code[0, 9, 1, 2], cb[0, 16:32, 32:48].mean(), FP32_OP)
    assert torch.equal(code[:, 11:], torch.zeros_like(code[:, 11:]))  # left for the network
    # a latent pixel's code depends on its own block only
    changed = x.clone()
    changed[..., 16:, 16:32] = 1.0
    assert torch.equal(thumbnail_code(changed, 16, 16)[..., 1, 2], code[..., 1, 2])
    assert torch.equal(thumbnail_code(changed, 16, 16)[..., 0, :], code[..., 0, :])


def test_thumbnail_decoder_keeps_flat_colours_and_beats_the_block_code_on_smooth_images():
    colour = torch.tensor([0.3, -0.5, 0.8]).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    assert_close(thumbnail_image(thumbnail_code(colour, 16, 16), 16), colour, FP32_OP)
    # 4 latent channels leave a 1x1 luma grid: mean colour per block
    assert_close(thumbnail_image(thumbnail_code(colour, 4, 16), 16), colour, FP32_OP)
    image = torch.from_numpy(smooth_image(128, 128)).permute(2, 0, 1)[None].float() / 127.5 - 1
    thumbnail = thumbnail_image(thumbnail_code(image, 16, 16), 16)
    block = channel_to_space(space_to_channel(image, 16, 16), 3, 16)
    assert psnr(image, thumbnail) > psnr(image, block) + 3  # why it is the better start


@pytest.mark.numerics
def test_untrained_code_model_is_the_code_a_trained_model_started_from():
    trained = tiny("thumbnail")
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    code_model = untrained_code_model(trained).eval()
    assert code_model.config.shortcut == "thumbnail" and code_model.config.block_out_channels == (8, 8, 16, 16, 16)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = thumbnail_image(thumbnail_code(x, 16, 16), 16)
        assert_close(code_model(x).sample, expected)
        assert max_error(trained(x).sample, expected) > 1e-2
    assert untrained_code_model(build_vae("f16c16-tiny", seed=0)) is None  # no shortcut, no code


def test_thumbnail_shortcut_needs_rgb_and_three_latent_channels():
    config = get_preset("f16c16-tiny").diffusers_config()
    with pytest.raises(ValueError, match="RGB"):
        ResidualAutoencoderKL(**{**config, "in_channels": 1, "out_channels": 1}, shortcut="thumbnail")
    with pytest.raises(ValueError, match="at least 3 latent channels"):
        ResidualAutoencoderKL(**{**config, "latent_channels": 2}, shortcut="thumbnail")


def test_without_zero_init_the_branches_keep_random_weights():
    a, b = tiny("stage", seed=0, zero_init=False), tiny("stage", seed=1, zero_init=False)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert max_error(a(x).sample, b(x).sample) > 1e-2


# -- a diffusers model ------------------------------------------------------------------------------


@pytest.mark.parametrize("shortcut", ["global", "stage", "thumbnail"])
def test_shapes_and_state_dict_keys_equal_plain_autoencoderkl(shortcut):
    vae, plain = tiny(shortcut), build_vae("f16c16-tiny", seed=0)
    assert {k: v.shape for k, v in vae.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    with torch.no_grad():
        posterior = vae.encode(torch.zeros(2, 3, 64, 32)).latent_dist
        assert posterior.mean.shape == (2, 16, 4, 2)
        assert vae.decode(posterior.mode()).sample.shape == (2, 3, 64, 32)
    # plain weights load into the residual class and back (fine-tuning a plain model with shortcuts)
    vae.load_state_dict(plain.state_dict())
    assert same_weights(vae, plain)


def test_presets_build_the_residual_class():
    assert isinstance(build_vae(TINY_RES, seed=0), ResidualAutoencoderKL)
    assert type(build_vae("f16c16-tiny", seed=0)) is AutoencoderKL
    assert MODEL_CLASSES["ResidualAutoencoderKL"] is ResidualAutoencoderKL
    with pytest.raises(ValueError, match="unknown shortcut"):
        tiny("everywhere")


@pytest.mark.parametrize("name,shortcut", [("f16c16-res", "global"), ("f16c16-thumb", "thumbnail")])
def test_full_preset_shapes_on_meta_device(name, shortcut):
    with torch.device("meta"):
        vae = build_vae(name)
        assert vae.config.block_out_channels == (128, 128, 256, 256, 512) and vae.config.shortcut == shortcut
        latents = vae.encode(torch.empty(1, 3, 256, 256)).latent_dist.mode()
        assert latents.shape == (1, 16, 16, 16)
        assert vae.decode(latents).sample.shape == (1, 3, 256, 256)


@pytest.mark.parametrize("shortcut", ["global", "thumbnail"])
def test_save_load_round_trip_through_load_vae(tmp_path, shortcut):
    vae = tiny(shortcut)
    with torch.no_grad():  # weights an untrained model would not have: the load must not re-initialise them
        for p in vae.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_vae(vae, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["_class_name"] == "ResidualAutoencoderKL" and config["shortcut"] == shortcut
    loaded = load_vae(tmp_path / "model")
    assert isinstance(loaded, ResidualAutoencoderKL) and loaded.config.shortcut == shortcut
    assert same_weights(vae, loaded)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae.eval()(x).sample, loaded.eval()(x).sample)
    assert isinstance(ResidualAutoencoderKL.from_pretrained(tmp_path / "model"), ResidualAutoencoderKL)


def test_plain_autoencoderkl_refuses_a_residual_folder(tmp_path, caplog):
    """Loading with plain AutoencoderKL would drop the shortcut silently: it must fail instead."""
    save_vae(build_vae(TINY_RES, seed=0), tmp_path / "model")
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match=DOWN_BLOCK):
        AutoencoderKL.from_pretrained(tmp_path / "model")


def test_single_file_round_trip(tmp_path):
    from latent_vae import save_single_file

    vae = build_vae(TINY_RES, seed=0)
    loaded = load_vae(save_single_file(vae, tmp_path / "model.safetensors"))
    assert isinstance(loaded, ResidualAutoencoderKL) and same_weights(vae, loaded)


# -- in the codec and in pipelines ------------------------------------------------------------------


@pytest.mark.numerics
@pytest.mark.parametrize("shortcut", ["global", "stage", "thumbnail"])
def test_latent_codec_round_trip_and_exact_tiles(shortcut):
    vae = tiny(shortcut, zero_init=False)  # live branches: the network's part is not zero
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8), size=(128, 128), mode="bilinear") * 2 - 1
    untiled = LatentCodec(vae)
    latents = untiled.encode(image)
    assert latents.shape == (1, 16, 8, 8) and untiled.last_plan.whole
    whole = untiled.decode(latents)
    assert whole.shape == (1, 3, 128, 128)
    with torch.no_grad():  # the codec goes through the shortcut model unchanged (neutral normalisation)
        direct = vae.decode(vae.encode(image).latent_dist.mode()).sample.clamp(-1, 1)
    assert_close(whole, direct)
    # Exact tiles of 48 px (dividing neither 128 nor any level): every shortcut, including the thumbnail's
    # bicubic enlargement that reaches across a tile edge, gives the whole-image result.
    # Yardstick: the other memory layout computes the same function in another fp32 summation order.
    tiled = LatentCodec(tiny(shortcut, zero_init=False), tile_size=48)
    layout = LatentCodec(tiny(shortcut, zero_init=False), channels_last=not untiled.channels_last)
    for run in (lambda c: c.encode(image), lambda c: c.decode(latents)):
        assert_within_reordering(run(tiled), run(untiled), yardstick=run(layout))
        assert not tiled.last_plan.whole


def test_as_the_vae_of_a_diffusers_pipeline(tmp_path):
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=16, out_channels=32, num_layers=1,
        sample_size=4, patch_size=2, norm_num_groups=4, num_embeds_ada_norm=1000,
    )
    pipe = DiTPipeline(transformer=transformer, vae=build_vae(TINY_RES, seed=0), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[1], num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (1, 64, 64, 3)
    # a saved pipeline names the class and diffusers' loader brings the shortcut model back
    pipe.save_pretrained(tmp_path / "pipe")
    reloaded = DiTPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(reloaded.vae, ResidualAutoencoderKL) and same_weights(reloaded.vae, pipe.vae)
    assert isinstance(load_vae(tmp_path / "pipe"), ResidualAutoencoderKL)  # the pipeline's vae/ subfolder


@pytest.mark.numerics
@pytest.mark.parametrize("shortcut", ["global", "stage", "thumbnail"])
def test_gradient_checkpointing_keeps_the_shortcut(shortcut):
    vae = tiny(shortcut, zero_init=False).train()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    expected = vae(x).sample
    vae.enable_gradient_checkpointing()
    out = vae(x).sample
    out.mean().backward()
    assert_close(out, expected)
    assert vae.encoder.conv_in.weight.grad is not None


def test_zorder_fold_is_pixel_unshuffle_at_factor_2_and_invertible():
    from latent_vae.models.residual import zorder_shuffle, zorder_unshuffle

    x = torch.randn(2, 3, 16, 32)
    assert torch.equal(zorder_unshuffle(x, 2), torch.nn.functional.pixel_unshuffle(x, 2))
    for factor in (2, 4, 16):
        assert torch.equal(zorder_shuffle(zorder_unshuffle(x, factor), factor), x)
    # at factor 16, 16 groups of 16 channels of one colour are the 16 4x4 patches of the block
    patches = channel_resize(zorder_unshuffle(x[:, :1], 16), 16)
    ref = torch.nn.functional.avg_pool2d(x[:, :1], 4)  # 4x4 means, laid out 4x4 per 16-block
    assert_close(patches, zorder_unshuffle(ref, 4), FP32_OP)
