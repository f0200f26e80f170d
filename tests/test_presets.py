import pytest
import torch

from latent_vae import PRESETS, build_vae, get_preset

# The published widths the presets must keep (LDM kl-f16, SD/SDXL VAE, SD3/FLUX VAE).
PUBLISHED = {
    "f16c16": ((128, 128, 256, 256, 512), 16, 16),
    "f8c4": ((128, 256, 512, 512), 4, 8),
    "f8c16": ((128, 256, 512, 512), 16, 8),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_presets_match_published_layouts(name):
    widths, channels, factor = PUBLISHED[name]
    preset = get_preset(name)
    assert preset.block_out_channels == widths
    assert preset.latent_channels == channels
    assert preset.layers_per_block == 2
    assert preset.downsampling_factor == factor


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_maps_1024_to_its_latent_on_meta(name):
    """A full 1024x1024 forward pass, shapes only: the meta device does no arithmetic."""
    preset = get_preset(name)
    with torch.device("meta"):
        vae = build_vae(name)
        latents = vae.encode(torch.empty(1, 3, 1024, 1024)).latent_dist.mode()
        images = vae.decode(latents).sample
    side = 1024 // preset.downsampling_factor
    assert tuple(latents.shape) == (1, preset.latent_channels, side, side)
    assert tuple(images.shape) == (1, 3, 1024, 1024)
    # what diffusers pipelines derive from the config
    assert 2 ** (len(vae.config.block_out_channels) - 1) == preset.downsampling_factor


def test_default_preset_is_f16c16_with_48x_compression():
    preset = get_preset("f16c16")
    assert preset.latent_shape(1024, 1024) == (16, 64, 64)
    assert 3 * 1024 * 1024 / (16 * 64 * 64) == 48
    assert preset.latent_shape(1000, 1030) == (16, 63, 65)  # padded up to the factor


def test_narrow_presets_keep_the_depth_of_their_full_preset():
    for narrow, full in [("f16c16-narrow", "f16c16"), ("f16c16-tiny", "f16c16"), ("f8c4-tiny", "f8c4"),
                         ("f8c16-tiny", "f8c16")]:
        assert get_preset(narrow).downsampling_factor == get_preset(full).downsampling_factor
        assert get_preset(narrow).latent_channels == get_preset(full).latent_channels


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown preset 'f32'.*f16c16.*f8c4"):
        get_preset("f32")


def test_tiny_preset_runs_for_real():
    vae = build_vae("f16c16-tiny", seed=0)
    with torch.no_grad():
        latents = vae.encode(torch.zeros(2, 3, 64, 96)).latent_dist.mode()
    assert latents.shape == (2, 16, 4, 6)
