"""The posterior q(z|x): a fixed log-variance that training keeps, its measures, and validation that reports them
(CPU, tiny, seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL

from latent_vae import build_vae
from latent_vae.images.reading import centre_square, load_image, pil_to_tensor
from training.config import load_config
from training.posterior import hold_logvar, measure_posterior, moments_conv, set_logvar
from training.train_vae import ValidationImages, main, validate, validation_lines

# Untrained, its decoder is a block code of the latent, so the PSNR of a decoded sample shows the posterior's noise
# (an untrained plain decoder hardly depends on its latent).
SHORTCUT = "f16c16-tiny-res"


def logvar_rows(vae) -> tuple[torch.Tensor, torch.Tensor]:
    conv = moments_conv(vae)
    half = conv.out_channels // 2
    return conv.weight[half:].detach().clone(), conv.bias[half:].detach().clone()


def sample_noise(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Per channel: the RMS distance of diffusers' own `latent_dist.sample()` from the posterior mean, over the
    standard deviation of the means across images and positions (the latent's own spread)."""
    torch.manual_seed(0)
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        sample, mean = posterior.sample(), posterior.mean
    return ((sample - mean).pow(2).mean(dim=(0, 2, 3)) / mean.var(dim=(0, 2, 3))).sqrt()


def squares(folder: Path, size: int) -> torch.Tensor:
    return torch.stack([pil_to_tensor(centre_square(load_image(p), size)) for p in sorted(folder.glob("*.png"))])


def test_a_held_logvar_stays_constant_through_adamw_steps_with_weight_decay():
    vae = build_vae("f16c16-tiny", seed=0)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-2, weight_decay=0.1)
    hold_logvar(vae, -10.0, optimizer)
    weight_before, bias_before = logvar_rows(vae)
    other_before = vae.decoder.conv_out.weight.detach().clone()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    for _ in range(3):
        posterior = vae.encode(images).latent_dist
        loss = (vae.decode(posterior.sample()).sample - images).pow(2).mean() + posterior.logvar.mean()
        loss.backward()
        assert moments_conv(vae).bias.grad[16:].abs().max() == 0  # no gradient: no part in clipping either
        optimizer.step()
        optimizer.zero_grad()
    weight_after, bias_after = logvar_rows(vae)
    assert torch.equal(weight_after, weight_before) and torch.equal(bias_after, bias_before)
    assert not torch.equal(vae.decoder.conv_out.weight, other_before)  # the rest trained
    assert torch.equal(bias_after, torch.full_like(bias_after, -10.0)) and not weight_after.any()


def test_a_fixed_logvar_saves_as_a_plain_diffusers_model_with_that_logvar_at_every_size(tmp_path):
    vae = build_vae("f16c16-tiny", seed=0)
    set_logvar(vae, -7.0)
    vae.save_pretrained(tmp_path)
    loaded = AutoencoderKL.from_pretrained(tmp_path)
    for size in (32, 128):
        logvar = loaded.encode(torch.rand(1, 3, size, size) * 2 - 1).latent_dist.logvar
        torch.testing.assert_close(logvar, torch.full_like(logvar, -7.0))


def test_measure_posterior_tells_a_sound_posterior_from_one_that_drowns_the_latent():
    vae = build_vae(SHORTCUT, seed=0).eval()
    images = [torch.rand(2, 3, 64, 64) * 2 - 1 for _ in range(2)]
    set_logvar(vae, -10.0)
    sound = measure_posterior(vae, images)
    set_logvar(vae, 4.0)
    noisy = measure_posterior(vae, images)
    assert sound.psnr_mean == pytest.approx(noisy.psnr_mean, rel=1e-4)  # the mean does not depend on the logvar
    assert abs(sound.sample_gap) < 0.05 * sound.psnr_mean
    assert noisy.sample_gap > 0.1 * noisy.psnr_mean
    assert sound.logvar_max == pytest.approx(-10.0) and noisy.logvar_max == pytest.approx(4.0)
    assert sound.noise_ratio < 0.1 and sound.worst_channel_noise_ratio < 0.25 and noisy.noise_ratio > 1
    assert noisy.kl_per_value > 2 * sound.kl_per_value


def test_a_latent_channel_whose_mean_never_varies_has_no_noise_ratio():
    vae = build_vae("f16c16-tiny", seed=0).eval()
    set_logvar(vae, -10.0)
    with torch.no_grad():  # channel 3 of the mean: a constant
        moments_conv(vae).weight[3].zero_()
    report = measure_posterior(vae, [torch.rand(2, 3, 32, 32) * 2 - 1])
    ratios = report.channel_noise_ratios
    assert ratios[3] is None and sum(r is None for r in ratios) == 1
    assert report.worst_channel_noise_ratio == max(r for r in ratios if r is not None)


@pytest.mark.usefixtures("fresh_accelerator")
def test_training_with_the_recipes_posterior_samples_close_to_the_mean_at_four_times_the_crop_side(
        training_images, tmp_path):
    recipe = load_config("cpu_demo")
    assert recipe.posterior_logvar == load_config("f16c16").posterior_logvar == "fixed"
    config = load_config("tiny_test", {
        "data": str(training_images), "output_dir": str(tmp_path / "run"), "max_steps": 12, "validate_every": 0,
        "checkpoint_every": 0, "disc_weight": 0.0, "posterior_logvar": recipe.posterior_logvar,
        "fixed_logvar": recipe.fixed_logvar})
    vae = AutoencoderKL.from_pretrained(main(config))  # plain diffusers, as a pipeline loads it
    images = squares(training_images, 4 * config.resolution)
    assert sample_noise(vae, images).max() < 0.1  # a sample lies within a tenth of the latent's spread
    # The class of fault: a posterior whose log-variance ran up (as a learned one does beyond its crop size)
    with torch.no_grad():
        moments_conv(vae).bias[vae.config.latent_channels:] += 12.0
    assert sample_noise(vae, images).max() > 1  # the same check fails: sampling drowns the latent


def test_validation_reports_a_posterior_sample_and_the_kl_at_the_validation_and_use_sizes(tmp_path):
    vae = build_vae(SHORTCUT, seed=0)
    images = ValidationImages(crops=torch.rand(2, 3, 32, 32) * 2 - 1, use=torch.rand(1, 3, 64, 64) * 2 - 1)
    accelerator = Accelerator(cpu=True)
    set_logvar(vae, -10.0)
    sound = validate(vae, None, images, accelerator, 0, tmp_path, batch_size=2)
    set_logvar(vae, 4.0)
    noisy = validate(vae, None, images, accelerator, 1, tmp_path, batch_size=2)
    for prefix in ("val", "val_use"):
        for name in ("psnr", "psnr_sample", "kl_per_value"):
            assert f"{prefix}/{name}" in sound
        assert sound[f"{prefix}/psnr"] - sound[f"{prefix}/psnr_sample"] < 0.05 * sound[f"{prefix}/psnr"]
        assert noisy[f"{prefix}/psnr"] - noisy[f"{prefix}/psnr_sample"] > 0.1 * noisy[f"{prefix}/psnr"]
        assert noisy[f"{prefix}/kl_per_value"] > 2 * sound[f"{prefix}/kl_per_value"]
    assert vae.training  # validate leaves the model as it found it


def test_a_validation_whose_sample_falls_behind_its_mean_says_so_in_one_warning_line():
    config = load_config("tiny_test", {"validation_resolution": 32, "use_resolution": 128})
    metrics = {"val/psnr": 25.0, "val/ssim": 0.8, "val/psnr_sample": 24.8, "val/kl_per_value": 4.5,
               "val_use/psnr": 28.0, "val_use/psnr_sample": 12.0, "val_use/kl_per_value": 1e5}
    first, warning = validation_lines(metrics, config, 7)
    assert "at 32 px: mean 25.00 dB, sample 24.80 dB" in first and "at 128 px" in first
    assert first.startswith("step 7: ") and warning.startswith("warning: step 7:") and "16.0 dB at 128 px" in warning and "32 px" not in warning
    metrics["val_use/psnr_sample"] = 27.5
    assert len(validation_lines(metrics, config, 7)) == 1
