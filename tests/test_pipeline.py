"""LatentDiffusionPipeline and the training helper: sampling, normalisation, save/load, classes, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from helpers import FP32_OP, assert_close

from latent_vae import LatentCodec, LatentNormalization, build_vae
from latent_vae.codec.latent_codec import NonFiniteError
from latent_vae.models.normalization import write_normalization
from latent_vae.pipeline import (
    LatentDiffusionPipeline,
    build_unet,
    denoising_loss,
    iterate_batches,
    train_unet,
)

IMAGE = 64  # pixels: a 16x4x4 latent for the f16 VAE
TINY_UNET = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, attention_levels=1)


def make_pipeline(num_class_embeds: int | None = None, scheduler=None) -> LatentDiffusionPipeline:
    vae = build_vae("f16c16-tiny", seed=0)
    pipe = LatentDiffusionPipeline.from_vae(
        vae, image_size=IMAGE, num_class_embeds=num_class_embeds, scheduler=scheduler, seed=0, **TINY_UNET
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def record_decode_inputs(vae) -> list[torch.Tensor]:
    """Wrap vae.decode so that every latent it receives is kept."""
    seen: list[torch.Tensor] = []
    decode = vae.decode

    def spy(z, *args, **kwargs):
        seen.append(z.detach().clone())
        return decode(z, *args, **kwargs)

    vae.decode = spy
    return seen


def generator() -> torch.Generator:
    return torch.Generator("cpu").manual_seed(0)


def test_sample_size_and_output_types():
    pipe = make_pipeline()
    images = pipe(batch_size=2, num_inference_steps=2, generator=generator()).images
    assert [im.size for im in images] == [(IMAGE, IMAGE)] * 2  # latent 4x4 x vae_scale_factor 16
    pt = pipe(num_inference_steps=2, height=96 + 32, width=64, generator=generator(), output_type="pt").images
    assert pt.shape == (1, 3, 128, 64) and pt.min() >= 0 and pt.max() <= 1
    latents = pipe(num_inference_steps=2, generator=generator(), output_type="latent").images
    assert latents.shape == (1, 16, 4, 4)
    with pytest.raises(ValueError, match="multiple of 32"):
        pipe(num_inference_steps=1, height=48)


@pytest.mark.numerics
def test_decoder_receives_denormalised_latents_like_the_codec():
    """The pipeline undoes scale, shift and per-channel statistics exactly as LatentCodec.decode does."""
    pipe = make_pipeline()
    mean = tuple(float(v) for v in torch.linspace(-1, 1, 16))
    std = tuple(float(v) for v in torch.linspace(0.5, 2, 16))
    for normalization in (
        LatentNormalization(scaling_factor=0.25, shift_factor=0.5),
        LatentNormalization(scaling_factor=2.0, latents_mean=mean, latents_std=std),
    ):
        write_normalization(pipe.vae, normalization)
        latents = pipe(num_inference_steps=2, generator=generator(), output_type="latent").images
        seen = record_decode_inputs(pipe.vae)
        images = pipe(num_inference_steps=2, generator=generator(), output_type="pt").images
        del pipe.vae.decode  # drop the spy
        assert_close(seen[0], normalization.denormalize(latents), FP32_OP)
        codec = LatentCodec(pipe.vae)
        assert_close(images * 2 - 1, codec.decode(latents))


def test_save_and_load_round_trip(tmp_path):
    pipe = make_pipeline(scheduler=DDIMScheduler(num_train_timesteps=1000))
    write_normalization(pipe.vae, LatentNormalization(scaling_factor=0.7, shift_factor=0.1))
    before = pipe(batch_size=2, num_inference_steps=3, generator=generator(), output_type="np").images
    pipe.save_pretrained(tmp_path)
    loaded = LatentDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, DDIMScheduler)
    assert (loaded.vae.config.scaling_factor, loaded.vae.config.shift_factor) == (0.7, 0.1)
    after = loaded(batch_size=2, num_inference_steps=3, generator=generator(), output_type="np").images
    np.testing.assert_array_equal(before, after)


def test_class_conditional():
    pipe = make_pipeline(num_class_embeds=3)
    # A fresh UNet's class embeddings are random, so different labels give different samples.
    a = pipe(class_labels=[0, 2], num_inference_steps=2, generator=generator(), output_type="latent").images
    b = pipe(class_labels=[1, 1], num_inference_steps=2, generator=generator(), output_type="latent").images
    c = pipe(class_labels=[0, 2], num_inference_steps=2, generator=generator(), output_type="latent").images
    assert a.shape[0] == 2 and not torch.allclose(a, b)
    assert_close(a, c)
    with pytest.raises(ValueError, match="pass class_labels"):
        pipe(num_inference_steps=1)
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        pipe(class_labels=[3], num_inference_steps=1)
    with pytest.raises(ValueError, match="unconditional"):
        make_pipeline()(class_labels=[0], num_inference_steps=1)


def test_unet_must_match_latent_channels():
    with pytest.raises(ValueError, match="latent_channels"):
        LatentDiffusionPipeline(build_unet(4, 4, **TINY_UNET), DDPMScheduler(), build_vae("f16c16-tiny"))


def _held_out_loss(pipe, latents, labels=None) -> float:
    """The loss on fixed noise and timesteps, so that before/after differ only by the weights."""
    with torch.no_grad():
        return float(denoising_loss(pipe.unet.eval(), pipe.scheduler, latents, labels, generator().manual_seed(123)))


def test_training_reduces_the_loss():
    # A tiny problem the UNet can learn in a few steps: every latent is one fixed pattern.
    pattern = torch.randn(1, 16, 4, 4, generator=generator())
    latents = pattern.expand(64, -1, -1, -1).clone()
    pipe = make_pipeline()
    before = _held_out_loss(pipe, latents)
    losses = train_unet(pipe, latents, steps=60, batch_size=16, learning_rate=3e-3, seed=0)
    after = _held_out_loss(pipe, latents)
    assert len(losses) == 60 and all(np.isfinite(losses))
    print(f"held-out loss {before:.3f} -> {after:.3f}")
    assert after < 0.7 * before, (before, after)


def test_training_on_batches_with_class_labels():
    """An iterable of dict batches (what a DataLoader over a latent dataset yields) trains a conditional UNet."""
    pipe = make_pipeline(num_class_embeds=2)
    batches = [{"latents": torch.randn(4, 16, 4, 4), "class_labels": torch.tensor([0, 1, 0, 1])} for _ in range(2)]
    embedding = pipe.unet.class_embedding.weight.detach().clone()
    losses = train_unet(pipe, batches, steps=3, batch_size=4)  # re-iterates the two batches
    assert len(losses) == 3
    assert not torch.equal(pipe.unet.class_embedding.weight, embedding)  # the labels reached the UNet
    with pytest.raises(ValueError, match="class-conditional"):
        train_unet(pipe, torch.randn(4, 16, 4, 4), steps=1)


def test_batch_iteration_and_bad_data():
    data = torch.arange(10.0).view(10, 1, 1, 1)
    labels = torch.arange(10)
    seen = [next(batches) for batches in [iterate_batches(data, 4, labels, generator())] for _ in range(3)]
    assert [len(x) for x, _ in seen] == [4, 4, 2]  # one epoch, every item once
    assert sorted(torch.cat([x for x, _ in seen]).flatten().tolist()) == list(range(10))
    for x, y in seen:
        assert torch.equal(x.flatten().long(), y)  # labels travel with their latents
    pipe = make_pipeline()
    with pytest.raises(ValueError, match="DataLoader"):
        train_unet(pipe, [torch.randn(16, 4, 4)], steps=1)
    with pytest.raises(ValueError, match="channels"):
        train_unet(pipe, torch.randn(4, 3, 4, 4), steps=1)
    with pytest.raises(ValueError, match="no batches"):
        train_unet(pipe, [], steps=1)
    with pytest.raises(NonFiniteError):
        train_unet(pipe, torch.full((4, 16, 4, 4), float("nan")), steps=1)
