"""A converted LDM model as a first-class citizen (codec, calibrate, precompute, training), and `--freeze_encoder`:
the decoder learns, the latent space does not move, and latents precomputed before still decode."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_close
from safetensors.torch import load_file
from test_convert import LDMAutoencoder, lightning_checkpoint

from latent_vae import LatentCodec, load_latents, load_vae
from latent_vae.cli import main as cli
from training.config import load_config, parse_args
from training.frozen_encoder import encoder_digest
from training.train_vae import main as train

# Every test here runs training in this process: each starts from a fresh Accelerate state.
pytestmark = pytest.mark.usefixtures("fresh_accelerator")


@pytest.fixture
def ldm_model() -> LDMAutoencoder:
    """kl-f16's layout (attention at the last level) at 1/4 width and one res block per level: seconds to train."""
    torch.manual_seed(0)
    model = LDMAutoencoder(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(16,), z_channels=16)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


@pytest.mark.slow
@pytest.mark.numerics
def test_converted_model_codes_calibrates_precomputes_and_fine_tunes_with_a_frozen_encoder(
        ldm_model, image_folder, tmp_path, capsys):
    torch.save(lightning_checkpoint(ldm_model), tmp_path / "kl-f16.ckpt")
    source = tmp_path / "kl-f16"
    assert cli(["convert", str(tmp_path / "kl-f16.ckpt"), "--out", str(source)]) == 0

    # LatentCodec: with the neutral normalisation of a fresh conversion, its latents are LDM's posterior means.
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    codec = LatentCodec.from_pretrained(source)
    with torch.no_grad():
        mean, _ = ldm_model.encode(pixels)
        assert_close(codec.encode(pixels), mean)
        assert_close(codec.decode(mean), ldm_model.decode(mean).clamp(-1, 1))

    # kl-f16 and VA-VAE come without scale/shift: `latent-vae calibrate` measures them into the folder.
    assert cli(["calibrate", "--model", str(source), "--data", str(image_folder), "--resolution", "32",
                "--device", "cpu"]) == 0
    calibrated = json.loads((source / "config.json").read_text())
    assert calibrated["scaling_factor"] != 1.0 and calibrated["shift_factor"] != 0.0

    # Latents precomputed with the source model, before any fine-tuning.
    latents_dir = tmp_path / "latents"
    assert cli(["precompute", "--model", str(source), "--data", str(image_folder), "--out", str(latents_dir),
                "--resolution", "32", "--dtype", "fp32", "--num-workers", "0", "--no-progress"]) == 0
    before = {item["key"]: item["latents"] for item in load_latents(latents_dir, model=str(source), sample=False)}

    config = load_config("tiny_test", {"data": str(image_folder), "output_dir": str(tmp_path / "run"),
                                       "model": str(source), "freeze_encoder": True, "max_steps": 3,
                                       "weight_decay": 0.01, "validate_every": 0,
                                       # the f16c16 recipe's: a frozen encoder keeps its own posterior
                                       "posterior_logvar": "fixed"})
    exported = train(config)
    capsys.readouterr()

    old, new = load_file(str(source / "diffusion_pytorch_model.safetensors")), load_file(
        str(exported / "diffusion_pytorch_model.safetensors"))
    encoder_keys = [k for k in old if k.startswith(("encoder.", "quant_conv."))]
    assert encoder_keys and all(torch.equal(old[k], new[k]) for k in encoder_keys)  # bit-identical
    assert any(not torch.equal(old[k], new[k]) for k in old if k.startswith("decoder."))  # the decoder learned
    fine_tuned = load_vae(exported)
    assert encoder_digest(fine_tuned) == encoder_digest(load_vae(source))
    for key in ("scaling_factor", "shift_factor", "latents_mean", "latents_std"):
        assert fine_tuned.config[key] == calibrated[key]  # the normalisation kept, not re-measured
    record = json.loads((tmp_path / "run" / "frozen_encoder.json").read_text())
    assert record["encoder_unchanged"] and record["normalization_unchanged"]
    assert record["source_fingerprint"] == LatentCodec.from_pretrained(source).fingerprint != record["fingerprint"]

    # The source model's latents: the fine-tuned model's fingerprint differs (its decoder changed), so load_latents names
    # the source model (or its recorded fingerprint); the fine-tuned codec decodes them and re-encodes to them.
    with pytest.raises(ValueError, match="not by the given model"):
        load_latents(latents_dir, model=str(exported))
    dataset = load_latents(latents_dir, model=record["source_fingerprint"], sample=False)
    source_codec = LatentCodec.from_pretrained(source)
    new_codec = LatentCodec.from_pretrained(exported)
    for item in dataset:
        torch.testing.assert_close(item["latents"], before[item["key"]], atol=0, rtol=0)
        decoded = new_codec.decode(item["latents"][None])
        assert decoded.shape == (1, 3, 32, 32) and torch.isfinite(decoded).all()
        assert not torch.equal(decoded, source_codec.decode(item["latents"][None]))  # a different decoder ...
    # ... on the same latent space: both models encode any image to the same normalised latents, bit for bit.
    assert torch.equal(new_codec.encode(pixels), source_codec.encode(pixels))


def test_freeze_encoder_is_a_flag_and_needs_a_trained_model(image_folder):
    args = ["--config", "tiny_test", "--data", "x", "--model", "some/folder"]
    assert parse_args([*args, "--freeze_encoder"]).freeze_encoder
    assert not parse_args([*args, "--freeze_encoder", "false"]).freeze_encoder
    with pytest.raises(ValueError, match="preset"):
        load_config("tiny_test", {"data": str(image_folder), "freeze_encoder": True}).validate()
