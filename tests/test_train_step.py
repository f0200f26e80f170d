"""training.step.train_step called alone on the tiny model: losses, skipped steps, the GAN, the fp16 loss scaler."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

import training.losses as losses_module
from latent_vae import load_vae
from training.config import load_config
from training.losses import AutoencoderWithLoss, PatchDiscriminator
from training.step import StepResult, TrainState, train_step
from training.train_vae import loss_weights

pytestmark = pytest.mark.usefixtures("fresh_accelerator")  # Accelerate's state is one per process

FP32_EPS = torch.finfo(torch.float32).eps


def tiny_config(**overrides):
    # tiny_test: the tiny f16c16 preset, its GAN switched on from step 2 (disc_start), lr 1e-3, clipping at 1.
    return load_config("tiny_test", {"data": "unused", **overrides})


def make_state(config, accelerator: Accelerator | None = None, gan: bool = True) -> TrainState:
    """The models and optimisers as the run builds them, prepared by `accelerator` (CPU, fp32 by default)."""
    accelerator = accelerator or Accelerator(cpu=True, gradient_accumulation_steps=config.gradient_accumulation_steps)
    vae = load_vae(config.model, seed=0).float().train()
    model = AutoencoderWithLoss(vae, loss_weights(config))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2))
    model, optimizer = accelerator.prepare(model, optimizer)
    disc = disc_optimizer = None
    if gan:
        torch.manual_seed(1)
        disc = PatchDiscriminator(config.disc_layers, config.disc_channels)
        disc_optimizer = torch.optim.AdamW(disc.parameters(), lr=config.disc_learning_rate)
        disc, disc_optimizer = accelerator.prepare(disc, disc_optimizer)
    return TrainState(accelerator, model, optimizer, disc, disc_optimizer)


def fp16_accelerator(**scaler_options) -> Accelerator:
    """fp16 autocast with a real GradScaler on CPU, as Accelerate sets them up on a GPU (it gives none on CPU)."""
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu", **scaler_options)
    return accelerator


def images(batch: int = 2, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def unchanged(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(value, before[name]) for name, value in module.state_dict().items())


def sum_tolerance(*terms: float) -> float:
    """What fp32 rounding allows between a sum taken in fp32 and the same terms added in float64: a few ulps of
    the terms' magnitudes."""
    return 8 * FP32_EPS * sum(abs(t) for t in terms)


def test_a_step_updates_the_vae_lowers_its_loss_and_reports_every_term_as_a_finite_float():
    config = tiny_config()
    state = make_state(config, gan=False)
    pixels = images()
    vae_before = snapshot(state.vae)
    with torch.no_grad():
        nll_before = state.model(pixels, sample=False)["nll"].item()

    result = train_step(state, pixels, step=0, config=config)

    assert isinstance(result, StepResult) and result.stepped and not result.nonfinite and not result.overflow
    for value in (result.loss, result.pixel_loss, result.kl, result.grad_norm):
        assert type(value) is float and math.isfinite(value)
    assert result.grad_norm > 0
    # No LPIPS, sharpness or GAN in this config: those terms are not measured, and not logged.
    assert result.lpips is result.sharpness is result.g_loss is result.d_weight is result.d_loss is None
    assert result.logs() == {"loss": result.loss, "pixel_loss": result.pixel_loss, "kl": result.kl,
                             "grad_norm": result.grad_norm}
    kl_term = config.kl_weight * result.kl
    assert result.loss == pytest.approx(result.pixel_loss + kl_term, abs=sum_tolerance(result.pixel_loss, kl_term))
    assert not unchanged(state.vae, vae_before)
    assert all(p.grad is None for p in state.vae.parameters())  # nothing left to leak into the next step
    with torch.no_grad():
        assert state.model(pixels, sample=False)["nll"].item() < nll_before


@pytest.mark.parametrize("gan_on", [False, True], ids=["before_disc_start", "gan_on"])
def test_a_nan_image_skips_the_step_and_leaves_every_weight_unchanged(gan_on):
    config = tiny_config()
    state = make_state(config)  # with the GAN on, the discriminator's step must be skipped as well
    step = config.disc_start if gan_on else 0
    pixels = images()
    pixels[1, 0, 5, 7] = float("nan")
    vae_before, disc_before = snapshot(state.vae), snapshot(state.raw_discriminator)

    result = train_step(state, pixels, step=step, config=config)

    assert result.nonfinite and not result.stepped and not result.overflow
    assert math.isnan(result.loss)
    assert result.grad_norm is None and result.d_loss is None  # no optimiser ran
    assert unchanged(state.vae, vae_before) and unchanged(state.raw_discriminator, disc_before)
    assert not state.optimizer.state and not state.disc_optimizer.state  # Adam took no step either
    assert all(p.grad is None for p in state.vae.parameters())

    after = train_step(state, images(), step=step, config=config)  # the next good batch trains
    assert after.stepped and not unchanged(state.vae, vae_before)


def test_from_disc_start_the_discriminator_steps_and_the_adaptive_weight_is_reported():
    config = tiny_config()
    state = make_state(config)
    pixels = images()
    disc_before = snapshot(state.raw_discriminator)

    before_start = train_step(state, pixels, step=config.disc_start - 1, config=config)
    assert before_start.stepped and before_start.d_weight is None and before_start.d_loss is None
    assert unchanged(state.raw_discriminator, disc_before)

    result = train_step(state, pixels, step=config.disc_start, config=config)
    assert result.stepped
    for value in (result.d_weight, result.g_loss, result.d_loss):
        assert type(value) is float and math.isfinite(value)
    assert result.d_weight > 0 and result.d_loss > 0  # the hinge loss of an untrained discriminator is about 1
    assert {"d_weight", "g_loss", "d_loss"} <= result.logs().keys()
    assert not unchanged(state.raw_discriminator, disc_before)
    # The generator's loss carries the weighted GAN term.
    kl_term, gan_term = config.kl_weight * result.kl, result.d_weight * result.g_loss
    assert result.loss == pytest.approx(result.pixel_loss + kl_term + gan_term,
                                        abs=sum_tolerance(result.pixel_loss, kl_term, gan_term))


def test_the_adaptive_weight_is_clamped_at_adaptive_weight_max_times_disc_weight():
    """In LDM's units: clamp(ratio, 0, max) * disc_weight, divided by one image's pixel values (3 * 32 * 32)."""
    config = tiny_config(adaptive_weight_max=1e-3, disc_weight=0.25)
    result = train_step(make_state(config), images(), step=config.disc_start, config=config)
    assert result.d_weight == pytest.approx(0.25 * 1e-3 / (3 * 32 * 32), rel=4 * FP32_EPS)


def nan_adaptive_weight(monkeypatch) -> None:
    real = losses_module.adaptive_weight
    monkeypatch.setattr(losses_module, "adaptive_weight", lambda *a, **k: real(*a, **k) * float("nan"))


def test_a_nonfinite_adaptive_weight_without_a_scaler_skips_the_step_as_a_nonfinite_loss(monkeypatch):
    nan_adaptive_weight(monkeypatch)
    config = tiny_config()
    state = make_state(config)
    vae_before, disc_before = snapshot(state.vae), snapshot(state.raw_discriminator)
    result = train_step(state, images(), step=config.disc_start, config=config)
    assert result.nonfinite and not result.overflow and math.isfinite(result.pixel_loss)
    assert unchanged(state.vae, vae_before) and unchanged(state.raw_discriminator, disc_before)


# -- fp16 with a loss scaler (torch's CPU GradScaler under CPU fp16 autocast) -----------------------------------


def test_fp16_step_unscales_the_gradients_and_updates_the_scale_once_for_both_optimisers():
    config = tiny_config(mixed_precision="fp16")
    state = make_state(config, fp16_accelerator(init_scale=2.0**8, growth_interval=1))
    vae_before = snapshot(state.vae)
    torch.manual_seed(0)  # the posterior's noise, as in the fp32 step below
    result = train_step(state, images(), step=config.disc_start, config=config)
    assert result.stepped and math.isfinite(result.grad_norm) and math.isfinite(result.d_weight)
    assert result.loss_scale == 2.0**9  # grown once (growth_interval 1), although two optimisers stepped
    assert not unchanged(state.vae, vae_before)
    assert all(v.dtype == torch.float32 for v in state.vae.state_dict().values())  # fp32 master weights
    # The norm is the unscaled gradient's: that of the same step in fp32, up to fp16 rounding (a norm of the scaled
    # gradients would be 2**8 times larger).
    AcceleratorState._reset_state(True)  # another precision: another Accelerate state
    fp32_state = make_state(tiny_config())
    torch.manual_seed(0)
    fp32 = train_step(fp32_state, images(), step=config.disc_start, config=config)
    assert 0.5 < result.grad_norm / fp32.grad_norm < 2, (result.grad_norm, fp32.grad_norm)


def test_fp16_gradient_overflow_is_skipped_by_the_scaler_which_backs_off():
    # At a loss scale of 2**40 every fp16 gradient overflows; the loss itself (fp32) stays finite.
    config = tiny_config(mixed_precision="fp16")
    state = make_state(config, fp16_accelerator(init_scale=2.0**40), gan=False)
    vae_before = snapshot(state.vae)
    result = train_step(state, images(), step=0, config=config)
    assert result.overflow and not result.nonfinite and not result.stepped
    assert math.isfinite(result.loss) and not math.isfinite(result.grad_norm)
    assert result.loss_scale == 2.0**39  # backoff factor 0.5
    assert unchanged(state.vae, vae_before)


def test_fp16_nonfinite_adaptive_weight_is_an_overflow_for_the_scaler(monkeypatch):
    nan_adaptive_weight(monkeypatch)
    config = tiny_config(mixed_precision="fp16")
    state = make_state(config, fp16_accelerator(init_scale=2.0**8))
    vae_before = snapshot(state.vae)
    result = train_step(state, images(), step=config.disc_start, config=config)
    assert result.overflow and not result.nonfinite and result.loss_scale == 2.0**7
    assert unchanged(state.vae, vae_before)


def test_gradient_accumulation_steps_the_optimiser_on_the_last_micro_batch_only():
    config = tiny_config(gradient_accumulation_steps=2)
    state = make_state(config, gan=False)
    vae_before = snapshot(state.vae)
    first = train_step(state, images(), step=0, config=config)
    assert not state.accelerator.sync_gradients and first.grad_norm is None
    assert unchanged(state.vae, vae_before)
    second = train_step(state, images(), step=0, config=config)
    assert state.accelerator.sync_gradients and second.grad_norm is not None
    assert not unchanged(state.vae, vae_before)


def test_a_nan_on_the_micro_batch_that_steps_drops_the_gradients_accumulated_for_the_step():
    config = tiny_config(gradient_accumulation_steps=2)
    state = make_state(config, gan=False)
    vae_before = snapshot(state.vae)
    train_step(state, images(), step=0, config=config)  # accumulates
    assert all(p.grad is not None for p in state.vae.parameters())
    poisoned = images()
    poisoned[0, 2, 3, 4] = float("nan")
    result = train_step(state, poisoned, step=0, config=config)
    assert state.accelerator.sync_gradients and result.nonfinite
    assert all(p.grad is None for p in state.vae.parameters())  # not carried into the next step
    assert unchanged(state.vae, vae_before)
