"""The scale-equivariance regulariser (Skorokhodov et al. 2025) in training: its gradient, its zero, its config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from latent_vae import build_vae
from latent_vae.inspection.measures import downsample
from latent_vae.models.residual import ResidualAutoencoderKL
from training.config import load_config, parse_args
from training.losses import AutoencoderWithLoss, LossWeights, scale_equivariance_loss
from training.step import TrainState, train_step
from training.train_vae import loss_weights, run

FP32_EPS = torch.finfo(torch.float32).eps


def photos(batch: int = 2, size: int = 64) -> torch.Tensor:
    """Smooth random images: a 6x6 random grid enlarged bicubically, in [-1, 1]."""
    generator = torch.Generator().manual_seed(0)
    grid = torch.rand(batch, 3, 6, 6, generator=generator) * 2 - 1
    return F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def identity_vae() -> ResidualAutoencoderKL:
    """An exactly scale-equivariant KL-VAE: one level (factor 1), 3 latent channels and the zero-initialised global
    shortcut, so that its posterior mean is the image and its decoder returns the latent; averaging commutes with it."""
    torch.manual_seed(0)
    return ResidualAutoencoderKL(block_out_channels=(8,), latent_channels=3, norm_num_groups=4, layers_per_block=1,
                                 shortcut="global", zero_init=True)


def test_gradient_reaches_the_encoder_and_the_decoder():
    vae = build_vae("f16c16-tiny", seed=0).train()
    pixels = photos()
    latents = vae.encode(pixels).latent_dist.mean
    loss = scale_equivariance_loss(lambda z: vae.decode(z).sample, latents, pixels, (2,), F.mse_loss)
    loss.backward()
    for part in (vae.encoder.conv_in, vae.encoder.conv_out, vae.decoder.conv_in, vae.decoder.conv_out):
        assert part.weight.grad is not None and part.weight.grad.abs().sum() > 0


def test_it_is_zero_for_an_exactly_scale_equivariant_model_and_not_otherwise():
    vae = identity_vae().eval()
    pixels = photos(size=16)
    weights = LossWeights(reconstruction="l2", scale_equivariance=1.0, scale_equivariance_factors=(2, 4))
    with torch.no_grad():
        out = AutoencoderWithLoss(vae, weights)(pixels, sample=False)
        assert torch.equal(out["reconstruction"], pixels)  # the construction: the identity
        assert out["scale_equivariance"] == 0
        vae.decoder.conv_out.weight.normal_(0, 0.1)  # the decoder no longer commutes with averaging
        bent = AutoencoderWithLoss(vae, weights)(pixels, sample=False)["scale_equivariance"]
    assert bent > 1e-4


def test_the_term_is_the_pixel_loss_of_the_downsampled_pairs_and_adds_to_nll_by_its_weight():
    vae = build_vae("f16c16-tiny", seed=0).eval()
    pixels = photos()
    with torch.no_grad():
        out = AutoencoderWithLoss(vae, LossWeights(reconstruction="l1", scale_equivariance=0.5,
                                                   scale_equivariance_factors=(2,)))(pixels, sample=False)
        latents = vae.encode(pixels).latent_dist.mean
        expected = F.l1_loss(vae.decode(downsample(latents, 2)).sample, downsample(pixels, 2))
    assert out["scale_equivariance"].item() == pytest.approx(expected.item(), rel=16 * FP32_EPS)
    total = out["pixel_loss"].item() + 0.5 * expected.item()
    assert out["nll"].item() == pytest.approx(total, rel=16 * FP32_EPS)


def test_a_training_step_logs_the_term(fresh_accelerator):
    config = load_config("tiny_test", {"data": "unused", "resolution": 64, "scale_equivariance_weight": 1.0,
                                       "scale_equivariance_factors": "2"})
    accelerator = Accelerator(cpu=True)
    vae = build_vae(config.model, seed=0).train()
    model, optimizer = accelerator.prepare(AutoencoderWithLoss(vae, loss_weights(config)),
                                           torch.optim.AdamW(vae.parameters(), lr=config.learning_rate))
    result = train_step(TrainState(accelerator, model, optimizer), photos(), step=0, config=config)
    assert result.stepped and result.scale_equivariance > 0
    assert result.logs()["scale_equivariance"] == result.scale_equivariance


def test_config_reads_factors_from_json_and_flags_and_is_off_by_default():
    assert load_config().scale_equivariance_weight == 0
    assert load_config("cpu_demo").scale_equivariance_factors == (2,)
    assert load_config("f16c16").scale_equivariance_factors == (2, 4)
    config = parse_args(["--data", "x", "--scale_equivariance_weight", "0.5", "--scale_equivariance_factors", "2,4"])
    assert config.scale_equivariance_factors == (2, 4) and config.scale_equivariance_weight == 0.5
    with pytest.raises(ValueError, match="scale_equivariance_factors"):
        load_config(None, {"data": "x", "scale_equivariance_weight": 1.0, "scale_equivariance_factors": [1]}).validate()


def test_a_frozen_encoder_refuses_it_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        run(["--config", "tiny_test", "--data", str(tmp_path), "--freeze_encoder", "--scale_equivariance_weight", "1"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "freeze_encoder" in err[0] and "scale_equivariance_weight" in err[0]


def test_factors_that_leave_no_latent_are_refused_before_training(tmp_path, training_images, fresh_accelerator, capsys):
    with pytest.raises(SystemExit) as stopped:
        run(["--config", "tiny_test", "--data", str(training_images), "--output_dir", str(tmp_path / "run"),
             "--scale_equivariance_weight", "1", "--scale_equivariance_factors", "2,4"])  # 32 px: 2x2 latents
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "scale_equivariance_factors [2, 4] do not fit" in err and "Traceback" not in err
