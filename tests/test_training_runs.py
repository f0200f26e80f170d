"""Whole training runs of the tiny preset on CPU: output, exact resume, crash safety, NaN handling, precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

import training.checkpoint as checkpoint_module
import training.train_vae as train_module
from latent_vae import LatentCodec
from training.config import load_config
from training.data import ImageSource
from training.losses import AutoencoderWithLoss
from training.train_vae import main

# Every test here runs training in this process: each starts from a fresh Accelerate state.
pytestmark = pytest.mark.usefixtures("fresh_accelerator")


@pytest.fixture(scope="module")
def training_images(training_images: Path) -> Path:
    """The shared training images plus a corrupt JPEG, which every run must skip and count."""
    (training_images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff broken jpeg")
    return training_images


def tiny(training_images: Path, out: Path, **overrides):
    return load_config("tiny_test", {"data": str(training_images), "output_dir": str(out), **overrides})


def weights(folder: Path, name: str = "vae.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


STEP = load_config("tiny_test").learning_rate
"""The scale of weight differences between runs: Adam moves every weight by about the learning rate each step,
whatever the size of its gradient, so rounding noise in a small gradient shows at this scale, not the weights'."""


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], steps: float = 1e-3) -> None:
    """The same weights up to `steps` learning-rate steps (default: the same computation, rounding aside)."""
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= steps * STEP, f"weights differ by up to {worst / STEP:.3g} learning-rate steps"


def test_a_run_leaves_a_calibrated_diffusers_model_checkpoints_logs_and_grids(training_images, tmp_path):
    out = tmp_path / "run"
    exported = main(tiny(training_images, out, report_to="tensorboard", max_steps=4, keep_checkpoints=1))
    assert exported == out / "vae"
    codec = LatentCodec.from_pretrained(exported)
    vae = AutoencoderKL.from_pretrained(exported)
    assert vae.config.scaling_factor != 1.0  # calibrated from data, not the neutral default
    latents = codec.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert latents.shape == (2, 16, 2, 2)
    # The exported weights are the EMA's, not the raw ones.
    ckpt = out / "checkpoint-0000004"
    assert_same({k: v for k, v in vae.state_dict().items()}, weights(ckpt, "ema.safetensors"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-0000004"]  # keep_checkpoints=1
    assert (out / "latest").read_text() == "checkpoint-0000004"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["samples_seen"] == 8 and state["images_skipped"] >= 1
    assert (out / "samples" / "step-0000004.png").is_file()
    assert list((out / "logs").rglob("events.out.tfevents.*"))


def test_resume_continues_exactly(training_images, tmp_path):
    # GAN on from step 2, so the resumed half also exercises the discriminator's restored state.
    main(tiny(training_images, tmp_path / "straight", max_steps=4, checkpoint_every=0))
    main(tiny(training_images, tmp_path / "split", max_steps=2, checkpoint_every=0))
    main(tiny(training_images, tmp_path / "split", max_steps=4, checkpoint_every=0, resume="latest"))
    straight, split = tmp_path / "straight" / "checkpoint-0000004", tmp_path / "split" / "checkpoint-0000004"
    for name in ("vae.safetensors", "ema.safetensors", "discriminator.safetensors"):
        assert_same(weights(straight, name), weights(split, name))
    state = json.loads((split / "trainer_state.json").read_text())
    assert state["scheduler"]["last_epoch"] == 4


def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(training_images, tmp_path, monkeypatch):
    real_save_file = checkpoint_module.save_file

    def dies_in_second_checkpoint(tensors, path, *args, **kwargs):
        if "checkpoint-0000004.tmp" in str(path) and Path(path).name == "vae.safetensors":
            Path(path).write_bytes(b"half a file")
            raise KeyboardInterrupt("killed")
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", dies_in_second_checkpoint)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        main(tiny(training_images, out, max_steps=6))
    assert (out / "latest").read_text() == "checkpoint-0000002"
    assert (out / ".checkpoint-0000004.tmp").exists() and not (out / "checkpoint-0000004").exists()

    monkeypatch.setattr(checkpoint_module, "save_file", real_save_file)
    main(tiny(training_images, out, max_steps=6, resume="latest"))
    assert not list(out.glob(".checkpoint-*.tmp"))  # the half-written one is cleaned up
    main(tiny(training_images, tmp_path / "straight", max_steps=6))
    assert_same(weights(out / "checkpoint-0000006"), weights(tmp_path / "straight" / "checkpoint-0000006"))


def test_nonfinite_losses_are_skipped_counted_and_stop_the_run_when_they_persist(training_images, tmp_path, monkeypatch):
    real_forward = AutoencoderWithLoss.forward
    calls = {"n": 0, "poison": {2}}

    def sometimes_nan(self, pixels, sample=True):
        out = real_forward(self, pixels, sample)
        calls["n"] += 1
        if calls["n"] in calls["poison"]:
            out["nll"] = out["nll"] * float("nan")
        return out

    monkeypatch.setattr(AutoencoderWithLoss, "forward", sometimes_nan)
    out = tmp_path / "one"
    main(tiny(training_images, out, max_steps=3, disc_weight=0.0, validate_every=0, checkpoint_every=0))
    state = json.loads((out / "checkpoint-0000003" / "trainer_state.json").read_text())
    assert state["nonfinite_skipped"] == 1 and state["nonfinite_in_a_row"] == 0
    assert all(torch.isfinite(v).all() for v in weights(out / "checkpoint-0000003").values())

    calls.update(n=0, poison=set(range(1, 100)))
    with pytest.raises(RuntimeError, match="NaN or inf 3 times in a row"):
        main(tiny(training_images, tmp_path / "many", max_steps=10, max_nonfinite_steps=3, disc_weight=0.0))


@pytest.mark.numerics
def test_gradient_accumulation_matches_the_larger_batch(training_images, tmp_path):
    # Same images in the same order, same noise stream: 2 x 2 accumulated == one batch of 4.
    common = {"max_steps": 2, "disc_weight": 0.0, "validate_every": 0, "checkpoint_every": 0, "max_grad_norm": 0.0}
    main(tiny(training_images, tmp_path / "big", batch_size=4, **common))
    main(tiny(training_images, tmp_path / "accum", batch_size=2, gradient_accumulation_steps=2, gradient_checkpointing=True,
              **common))
    # Other batch splits sum in another order; Adam grows that noise to a fraction of a step (see below).
    assert_same(weights(tmp_path / "big" / "checkpoint-0000002"), weights(tmp_path / "accum" / "checkpoint-0000002"),
                steps=0.1)


@pytest.mark.numerics
def test_gan_with_gradient_accumulation_matches_the_larger_batch(training_images, tmp_path):
    """GAN on from the first step, its adaptive weight at the clamp (so it does not depend on the batch): 2 x 2
    accumulated images (with gradient checkpointing, which the adaptive weight's autograd.grad must go through) give
    the generator and the discriminator the same steps as one batch of 4. (Unclamped, the
    weight is LDM's per micro-batch, as in LDM, and the weights differ by about 1e-3 after 2 steps, as much as
    without the GAN.)"""
    common = {"max_steps": 2, "disc_start": 0, "adaptive_weight_max": 100.0, "validate_every": 0,
              "checkpoint_every": 0, "max_grad_norm": 0.0}
    main(tiny(training_images, tmp_path / "big", batch_size=4, **common))
    main(tiny(training_images, tmp_path / "accum", batch_size=2, gradient_accumulation_steps=2, gradient_checkpointing=True,
              **common))
    big, accum = tmp_path / "big" / "checkpoint-0000002", tmp_path / "accum" / "checkpoint-0000002"
    for name in ("vae.safetensors", "discriminator.safetensors", "ema.safetensors"):
        assert_same(weights(big, name), weights(accum, name), steps=0.1)  # float noise grown by Adam: up to 0.03 steps
    main(tiny(training_images, tmp_path / "no_gan", batch_size=4, **{**common, "disc_weight": 0.0}))
    with pytest.raises(AssertionError):  # the GAN term did move the generator
        assert_same(weights(big), weights(tmp_path / "no_gan" / "checkpoint-0000002"), steps=0.1)


def test_without_validation_data_the_run_validates_on_held_out_images_it_never_trains_on(training_images, tmp_path,
                                                                                        monkeypatch):
    real_load, real_validation_images = ImageSource.load, train_module.validation_images
    loaded, phase = [], {"training": False}

    def recording_load(self, index):
        if phase["training"]:
            loaded.append(self.describe(index))
        return real_load(self, index)

    def validation_then_training(*args, **kwargs):
        images = real_validation_images(*args, **kwargs)  # the crops, and the same images at use_resolution
        phase["training"] = True  # every image read from here on is for training (or calibration)
        return images

    monkeypatch.setattr(ImageSource, "load", recording_load)
    monkeypatch.setattr(train_module, "validation_images", validation_then_training)
    out = tmp_path / "run"
    main(tiny(training_images, out, max_steps=6, disc_weight=0.0, checkpoint_every=0))
    held_out = json.loads((out / "checkpoint-0000006" / "trainer_state.json").read_text())["validation_held_out"]
    everything = {str(p) for p in training_images.iterdir()}
    assert len(held_out) == 2 and set(held_out) < everything
    assert set(loaded) == everything - set(held_out)  # 12 training samples read all the others, never these


def test_bf16_autocast_trains_with_fp32_master_weights_and_fp16_on_cpu_is_refused(training_images, tmp_path):
    out = tmp_path / "bf16"
    main(tiny(training_images, out, max_steps=2, mixed_precision="bf16", validate_every=0))
    saved = weights(out / "checkpoint-0000002")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in saved.values())
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        main(tiny(training_images, tmp_path / "fp16", mixed_precision="fp16"))


@pytest.mark.slow
def test_the_readme_demo_trains_then_scores_the_held_out_photo(tmp_path):
    """The main job end to end, for 3 steps: training on the shipped photos, the 1024x1024 evaluation, its images."""
    pytest.importorskip("skimage")
    from latent_vae import load_vae
    from training.demo import main as demo

    results = demo(["--out", str(tmp_path), "--set", "max_steps=3", "calibration_images=4", "report_to=none"])
    assert results["train_steps"] == 3 and results["model"] == "f16c16-small-thumb"
    assert results["latent_shape"] == [16, 64, 64] and results["eval_size"] == 1024
    # 3 steps from the thumbnail code: far from noise (about 10 dB) on the photo it never saw
    assert results["vae_psnr"] > 20 and results["native_vae_psnr"] > 18 and results["bicubic_psnr"] > 20
    # what training started from, scored beside it: after 3 steps the model is still close to its code
    assert abs(results["vae_psnr"] - results["code_psnr"]) < 1.5 and "native_code_ssim" in results
    # the recipe's posterior: a sample decodes as its mean does at 1024
    assert results["posterior_psnr_mean"] - results["posterior_psnr_sample"] < 0.02 * results["posterior_psnr_mean"]
    assert results["posterior_psnr_mean"] == pytest.approx(results["vae_psnr"], rel=0.01)
    for name in ("heldout_comparison.png", "heldout_detail.png", "interpolation.png", "demo_results.json"):
        assert (tmp_path / name).is_file()
    assert load_vae(results["model_dir"]).config.shortcut == "thumbnail"
