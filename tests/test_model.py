import json

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from latent_vae import ModelLoadError, build_vae, load_vae, model_fingerprint, save_single_file, save_vae
from latent_vae.models.loading import codec_flops
from latent_vae.models.normalization import LatentNormalization, write_normalization

TINY = "f16c16-tiny"


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_seed_makes_fresh_weights_reproducible():
    assert same_weights(build_vae(TINY, seed=3), build_vae(TINY, seed=3))
    assert not same_weights(build_vae(TINY, seed=3), build_vae(TINY, seed=4))


def test_folder_round_trip_is_exact_and_loads_in_plain_diffusers(tmp_path):
    vae = build_vae(TINY, seed=1)
    vae.register_to_config(scaling_factor=0.5, shift_factor=0.1)
    save_vae(vae, tmp_path / "model")
    assert (tmp_path / "model" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_vae(tmp_path / "model")
    assert same_weights(vae, loaded)
    assert loaded.config.scaling_factor == 0.5 and loaded.config.shift_factor == 0.1
    plain = AutoencoderKL.from_pretrained(tmp_path / "model")
    assert same_weights(vae, plain)


def test_normalisation_written_after_init_survives_saving(tmp_path):
    """diffusers drops config keys recorded as 'left at default' on load unless they are cleared."""
    vae = load_vae(TINY)  # e.g. a pretrained model whose config has no latents_mean yet
    vae.register_to_config(_use_default_values=["latents_mean", "latents_std", "force_upcast"])
    write_normalization(vae, LatentNormalization(latents_mean=(0.5,) * 16, latents_std=(2.0,) * 16))
    save_vae(vae, tmp_path / "model")
    loaded = AutoencoderKL.from_pretrained(tmp_path / "model")
    assert list(loaded.config.latents_mean) == [0.5] * 16
    assert list(loaded.config.latents_std) == [2.0] * 16


def test_pipeline_folder_with_vae_subfolder_loads(tmp_path):
    vae = build_vae(TINY, seed=1)
    save_vae(vae, tmp_path / "pipeline" / "vae")
    assert same_weights(vae, load_vae(tmp_path / "pipeline"))


def test_single_file_round_trip(tmp_path):
    vae = build_vae(TINY, seed=2)
    write_normalization(vae, LatentNormalization(latents_mean=(0.0,) * 16, latents_std=(2.0,) * 16))
    loaded = load_vae(save_single_file(vae, tmp_path / "vae.safetensors"))
    assert same_weights(vae, loaded)
    assert list(loaded.config.latents_std) == [2.0] * 16


def test_fingerprint_tracks_weights_and_normalisation():
    a, b = build_vae(TINY, seed=0), build_vae(TINY, seed=0)
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.decoder.conv_out.bias[0] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)
    c = build_vae(TINY, seed=0)
    c.register_to_config(scaling_factor=2.0)
    assert model_fingerprint(a) != model_fingerprint(c)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickled_weights_are_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04 pretend pickle")
    with pytest.raises(ModelLoadError, match="refusing to unpickle"):
        load_vae(path)


def test_folder_with_only_pickled_weights_is_refused(tmp_path):
    build_vae(TINY).save_pretrained(tmp_path / "m", safe_serialization=False)
    with pytest.raises(ModelLoadError, match="no .safetensors"):
        load_vae(tmp_path / "m")


def test_missing_source_names_the_presets(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a preset.*f16c16"):
        load_vae(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_vae(tmp_path / "empty")


def test_safetensors_without_config_says_how_to_convert(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "sd_vae.safetensors"))
    with pytest.raises(ModelLoadError, match="latent-vae convert"):
        load_vae(tmp_path / "sd_vae.safetensors")


def test_unknown_model_class_is_an_error(tmp_path):
    save_vae(build_vae(TINY), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["_class_name"] = "AutoencoderTiny"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="AutoencoderTiny"):
        load_vae(tmp_path / "m")


def test_flops_match_the_reference_numbers():
    # The reference figures for the f16c16 layout: at 256x256 it costs about 136 GFLOP to encode and 250 to decode.
    encode, decode = codec_flops(build_vae("f16c16"), 256, 256)
    assert 130e9 < encode < 142e9
    assert 240e9 < decode < 260e9
