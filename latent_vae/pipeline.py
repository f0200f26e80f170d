"""Diffusion in latent space: a diffusers pipeline (UNet2DModel + scheduler + our VAE) and a small trainer.

The pipeline samples normalised latents with the UNet, undoes the VAE's normalisation (scale, shift or
per-channel mean/std, read from the VAE config exactly as `LatentCodec` does) and decodes once:

    pipe = LatentDiffusionPipeline.from_vae(load_vae("my-vae"), image_size=256)
    train_unet(pipe, latents, steps=1000)          # normalised latents, e.g. LatentCodec.encode output
    images = pipe(batch_size=4, num_inference_steps=50).images
    pipe.save_pretrained("my-pipe"); LatentDiffusionPipeline.from_pretrained("my-pipe")
"""

from __future__ import annotations

import inspect
import math
from typing import Iterable, Iterator, Sequence, Union

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from .codec.latent_codec import NonFiniteError
from .models.loading import fp16_advice
from .models.normalization import LatentNormalization
from .models.presets import downsampling_factor

# The UNet of the latent-vs-pixel benchmark (`benchmarks/latent_vs_pixel.py`).
DEFAULT_UNET_CHANNELS: tuple[int, ...] = (128, 256, 256, 512)
DEFAULT_ATTENTION_LEVELS = 2  # self-attention in the two lowest-resolution levels only

# What `train_unet` accepts: a tensor of normalised latents (N x C x h x w), or an iterable of batches:
# tensors, (latents, class_labels) pairs, or dicts with "latents" and optionally "class_labels".
LatentBatch = Union[torch.Tensor, tuple, list, dict]
LatentData = Union[torch.Tensor, Iterable[LatentBatch]]


def build_unet(
    channels: int,
    sample_size: int,
    *,
    block_out_channels: Sequence[int] = DEFAULT_UNET_CHANNELS,
    attention_levels: int = DEFAULT_ATTENTION_LEVELS,
    layers_per_block: int = 2,
    norm_num_groups: int = 32,
    attention_head_dim: int = 8,
    num_class_embeds: int | None = None,
    seed: int | None = None,
) -> UNet2DModel:
    """A diffusers UNet2DModel for `channels`-channel inputs of side `sample_size` (latents or pixels).

    Attention sits in the `attention_levels` lowest-resolution levels; `num_class_embeds` makes it
    class-conditional (labels 0..num_class_embeds-1, added to the timestep embedding).
    """
    levels = len(block_out_channels)
    if not 0 <= attention_levels <= levels:
        raise ValueError(f"attention_levels must be between 0 and {levels}, got {attention_levels}")
    down = ["DownBlock2D"] * (levels - attention_levels) + ["AttnDownBlock2D"] * attention_levels
    up = ["AttnUpBlock2D"] * attention_levels + ["UpBlock2D"] * (levels - attention_levels)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return UNet2DModel(
            sample_size=sample_size,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=tuple(block_out_channels),
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            attention_head_dim=attention_head_dim,
            num_class_embeds=num_class_embeds,
        )


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent side, as every diffusers pipeline derives it."""
    return downsampling_factor(vae.config.block_out_channels)


class LatentDiffusionPipeline(DiffusionPipeline):
    """Unconditional or class-conditional image generation in the latent space of a KL-VAE.

    Args:
        unet: a `UNet2DModel` whose in/out channels are the VAE's latent channels; class-conditional
            when built with `num_class_embeds`.
        scheduler: any diffusers scheduler (DDPM, DDIM, ...); its training configuration
            (`num_train_timesteps`, betas, `prediction_type`) is also what `train_unet` trains for.
        vae: the `AutoencoderKL`; its config's `scaling_factor`, `shift_factor`, `latents_mean` and
            `latents_std` are undone before decoding.
    """

    model_cpu_offload_seq = "unet->vae"

    def __init__(self, unet: UNet2DModel, scheduler, vae: AutoencoderKL) -> None:
        super().__init__()
        if unet.config.in_channels != vae.config.latent_channels:
            raise ValueError(
                f"the UNet takes {unet.config.in_channels} channels but the VAE's latents have "
                f"{vae.config.latent_channels}: build the UNet with channels=vae.config.latent_channels"
            )
        # Inference modules, as DiffusionPipeline.from_pretrained leaves them: a pipeline built in memory
        # must sample exactly what its saved-and-loaded copy samples (train_unet switches to train() and back).
        unet.eval()
        vae.eval()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)
        self.vae_scale_factor = vae_scale_factor(vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_vae(
        cls,
        vae: AutoencoderKL,
        *,
        image_size: int = 256,
        scheduler=None,
        **unet_kwargs,
    ) -> "LatentDiffusionPipeline":
        """A pipeline with a fresh UNet (`build_unet` keyword arguments) sized for `image_size` images
        and, unless given, a DDPM scheduler with 1000 training steps."""
        factor = vae_scale_factor(vae)
        if image_size % factor:
            raise ValueError(f"image_size must be a multiple of the VAE's factor {factor}, got {image_size}")
        unet = build_unet(int(vae.config.latent_channels), image_size // factor, **unet_kwargs)
        return cls(unet=unet, scheduler=scheduler or DDPMScheduler(num_train_timesteps=1000), vae=vae)

    @property
    def normalization(self) -> LatentNormalization:
        """Read from the VAE config on every use, so a changed config can never be stale here."""
        return LatentNormalization.from_config(self.vae.config)

    @property
    def is_class_conditional(self) -> bool:
        return self.unet.config.num_class_embeds is not None or self.unet.config.class_embed_type is not None

    def _latent_side(self, pixels: int, name: str) -> int:
        # The UNet halves the latent len(block_out_channels) - 1 times, so the latent side must divide.
        multiple = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if pixels % multiple:
            raise ValueError(f"{name} must be a multiple of {multiple} (VAE factor x UNet downsampling), got {pixels}")
        return pixels // self.vae_scale_factor

    def _class_labels(self, class_labels, batch_size: int, device: torch.device) -> torch.Tensor | None:
        if not self.is_class_conditional:
            if class_labels is not None:
                raise ValueError("class_labels given, but this pipeline's UNet is unconditional")
            return None
        if class_labels is None:
            raise ValueError("this pipeline's UNet is class-conditional: pass class_labels (one int per image)")
        labels = torch.as_tensor(class_labels, device=device, dtype=torch.long).reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(batch_size)
        if labels.numel() != batch_size:
            raise ValueError(f"{labels.numel()} class_labels for a batch of {batch_size} images")
        num_classes = self.unet.config.num_class_embeds
        if num_classes is not None and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"class_labels must be in [0, {num_classes}), got {labels.tolist()}")
        return labels

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """normalised latents -> float images Nx3xHxW in [-1, 1], the VAE's normalisation undone."""
        raw = self.normalization.denormalize(latents.float()).to(self.vae.dtype)
        images = self.vae.decode(raw).sample.float()
        if not torch.isfinite(images).all():
            fix = f", or {fp16_advice(self.vae)}" if self.vae.dtype == torch.float16 else ""
            raise NonFiniteError(f"NaN or inf in the decoded images: run the VAE in fp32 (or bf16){fix}")
        return images.clamp(-1.0, 1.0)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        class_labels: int | Sequence[int] | torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate `batch_size` images.

        Args:
            batch_size: images to generate (the length of `class_labels` when those are a sequence).
            class_labels: for a class-conditional UNet: one label, or one per image.
            height, width: image size in pixels; default `unet.config.sample_size * vae_scale_factor`.
            num_inference_steps: scheduler steps.
            generator: makes the initial noise (and stochastic scheduler steps) reproducible.
            latents: initial noise (normalised latent space) instead of drawing it.
            output_type: "pil", "np" (float HxWx3 in [0, 1]), "pt" (float Nx3xHxW in [0, 1]) or "latent"
                (the normalised latents, not decoded).
            return_dict: an `ImagePipelineOutput` rather than a tuple.
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"unknown output_type {output_type!r}; choose pil, np, pt or latent")
        if class_labels is not None and not isinstance(class_labels, int):
            batch_size = len(class_labels)
        device = self._execution_device
        default_side = self.unet.config.sample_size * self.vae_scale_factor
        h = self._latent_side(height or default_side, "height")
        w = self._latent_side(width or default_side, "width")
        labels = self._class_labels(class_labels, batch_size, device)

        shape = (batch_size, self.unet.config.in_channels, h, w)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents of shape {tuple(latents.shape)}, expected {shape}")
        latents = latents.to(device, self.unet.dtype) * self.scheduler.init_noise_sigma

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        # Only stochastic schedulers (DDPM, DDIM with eta > 0, ...) take a generator in step().
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(latents, t)
            prediction = self.unet(model_input, t, class_labels=labels).sample
            latents = self.scheduler.step(prediction, t, latents, **step_kwargs).prev_sample

        if output_type == "latent":
            images = latents
        else:
            decoded = self.decode_latents(latents)
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


# -- training ------------------------------------------------------------------------------------------


def denoising_loss(
    unet: UNet2DModel,
    scheduler,
    latents: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The DDPM training loss: noise `latents` at uniform random timesteps, MSE to the scheduler's target.

    Works on any NxCxhxw input (latents or pixels), so one function serves both sides of a comparison.
    """
    if not hasattr(scheduler, "add_noise") or not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(f"{type(scheduler).__name__} has no DDPM-style add_noise: train with DDPMScheduler or DDIMScheduler")
    noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
        device=generator.device if generator is not None else "cpu",
    ).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    elif prediction_type == "sample":
        target = latents
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}; use epsilon, v_prediction or sample")
    prediction = unet(noisy, timesteps, class_labels=class_labels).sample
    return F.mse_loss(prediction.float(), target.float())


def denoising_step(
    unet: UNet2DModel,
    scheduler,
    optimizer: torch.optim.Optimizer,
    latents: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """One optimiser step on one batch; returns the loss. `autocast_dtype` (bf16/fp16) keeps fp32 weights."""
    unet.train()
    with torch.autocast(latents.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = denoising_loss(unet, scheduler, latents, class_labels, generator)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def _unpack(batch: LatentBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, dict):
        if "latents" not in batch:
            raise ValueError(f"a batch dict needs a 'latents' key, got keys {sorted(batch)}")
        latents, labels = batch["latents"], batch.get("class_labels")
    elif isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise ValueError(f"a batch tuple must be (latents, class_labels), got {len(batch)} items")
        latents, labels = batch
    else:
        latents, labels = batch, None
    latents = torch.as_tensor(latents)
    if latents.ndim != 4:
        raise ValueError(
            f"latent batches must be NxCxhxw, got shape {tuple(latents.shape)}: batch single latents with "
            "torch.utils.data.DataLoader(dataset, batch_size=...)"
        )
    return latents, None if labels is None else torch.as_tensor(labels).long().reshape(-1)


def iterate_batches(
    data: LatentData,
    batch_size: int,
    class_labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Endless (latents, class_labels) batches: a tensor is reshuffled every epoch; an iterable is re-iterated."""
    if isinstance(data, torch.Tensor):
        if data.ndim != 4:
            raise ValueError(f"latents must be NxCxhxw, got shape {tuple(data.shape)}")
        if class_labels is not None and len(class_labels) != len(data):
            raise ValueError(f"{len(class_labels)} class_labels for {len(data)} latents")
        while True:
            order = torch.randperm(len(data), generator=generator)
            for start in range(0, len(data), batch_size):
                index = order[start : start + batch_size]
                yield data[index], None if class_labels is None else class_labels[index]
    if class_labels is not None:
        raise ValueError("class_labels go with a latents tensor; an iterable carries them in its batches")
    while True:
        empty = True
        for batch in data:
            empty = False
            yield _unpack(batch)
        if empty:
            raise ValueError("the latent data yielded no batches")


def train_unet(
    pipeline: LatentDiffusionPipeline,
    data: LatentData,
    *,
    steps: int,
    batch_size: int = 16,
    learning_rate: float = 1e-4,
    class_labels: torch.Tensor | None = None,
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> list[float]:
    """Train `pipeline.unet` for `steps` AdamW steps on normalised latents; returns the loss of every step.

    `data` is a NxCxhxw tensor of normalised latents (e.g. `LatentCodec.encode` output; `class_labels` N
    ints for a class-conditional UNet), or an iterable of batches (a DataLoader): tensors,
    (latents, class_labels) pairs, or dicts with "latents" and optionally "class_labels". Batches are moved
    to the UNet's device. For multi-GPU training, use the `training/` program instead.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    unet, scheduler = pipeline.unet, pipeline.scheduler
    device = unet.device
    generator = torch.Generator("cpu").manual_seed(seed)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate, weight_decay=0.0)
    losses: list[float] = []
    for latents, labels in iterate_batches(data, batch_size, class_labels, generator):
        if latents.shape[1] != unet.config.in_channels:
            raise ValueError(f"latents have {latents.shape[1]} channels, the UNet takes {unet.config.in_channels}")
        if not torch.isfinite(latents).all():
            raise NonFiniteError("NaN or inf in the training latents")
        if pipeline.is_class_conditional and labels is None:
            raise ValueError("this UNet is class-conditional: give class_labels with the latents")
        latents = latents.to(device, torch.float32)
        labels = None if labels is None else labels.to(device)
        losses.append(denoising_step(unet, scheduler, optimizer, latents, labels, generator, autocast_dtype))
        if len(losses) == steps:
            break
    unet.eval()
    if not all(math.isfinite(loss) for loss in losses):
        raise NonFiniteError("the training loss became NaN or inf: lower the learning rate")
    return losses
