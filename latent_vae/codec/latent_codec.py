"""`LatentCodec`: images <-> the normalised latents a diffusion model trains on."""

from __future__ import annotations

import os
import types
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.resnet import ResnetBlock2D
from PIL import Image

from ..images.reading import (
    ImageInput,
    as_image_tensors,
    check_image_tensor,
    pad_to_multiple,
    tensor_to_pil,
    tensor_to_uint8,
)
from ..models.loading import (
    apply_groupnorm_eps,
    fp16_advice,
    function_fingerprints,
    load_vae,
    model_fingerprint,
)
from ..models.normalization import LatentNormalization, write_normalization
from ..models.presets import downsampling_factor
from ..utils.dtypes import SHORT_NAMES, resolve_dtype
from ..utils.errors import NonFiniteError
from ..utils.option_values import resolve_device
from .posterior import PosteriorStats, warn_if_noisy
from .tiling import CodingPlan, decode_exact, encode_exact, parse_memory, plan_coding


@dataclass
class EncodeOutput:
    latents: torch.Tensor  # normalised latents, float32: what a diffusion model sees
    mean: torch.Tensor  # raw posterior mean, float32
    logvar: torch.Tensor  # raw posterior log-variance, float32
    image_size: tuple[int, int]  # (H, W) before padding; pass to `decode` to crop back


class LatentCodec:
    """Encode images to normalised latents and decode them back, with every normalisation applied inside.

    Args:
        vae: the AutoencoderKL (the codec moves and may cast it; it owns it from then on).
        device: "cpu", "cuda", "mps", or None/"auto" for the best available.
        dtype: "fp32" (default, the reference), "bf16" or "fp16" for the network's weights and activations.
        max_batch_size: images per forward pass; larger inputs are split.
        max_memory: memory budget per forward pass ("4GB", "512MiB" or bytes; None: most of the free device
            memory, on CPU of the available RAM). Whole-image coding where its estimate fits (diffusers' own
            untiled path), exact tiles where it does not (`latent_vae.codec.tiling`): the results are the same
            either way, up to fp32 summation order.
        tile_size: expert override: always code in exact tiles of this many pixels (the budget still chooses
            between keeping intermediates and recomputing them). None (default): the budget decides.
        channels_last: NHWC memory layout (same outputs within fp32 rounding). None (default) picks by
            device from `benchmarks/codec_speed`: on a 2-core CPU NHWC is about 1.2x faster; on an H100 in
            bf16 it is about 1.35x slower (GroupNorm), so only CPUs get it.
        compile: `torch.compile` the encoder and decoder (pays off for long runs of the same size).
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        *,
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype = "fp32",
        max_batch_size: int = 8,
        max_memory: str | int | None = None,
        tile_size: int | None = None,
        channels_last: bool | None = None,
        compile: bool = False,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        apply_groupnorm_eps(vae)  # a model rescaled for fp16 but loaded by plain diffusers gets its exact eps back
        # the latents this codec reads as its own: its model's (of the weights as given, before any cast), then
        # those of models with the same function; one hash of the weights serves both
        self.fingerprints = function_fingerprints(vae)
        self.fingerprint = self.fingerprints[0]
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.max_batch_size = max_batch_size
        self.channels_last = self.device.type == "cpu" if channels_last is None else channels_last
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        vae = vae.to(self.device, memory_format=self.memory_format)
        if vae.dtype != self.dtype:  # only cast when asked: diffusers warns on every cast
            vae = vae.to(self.dtype)
        self.vae = vae.eval().requires_grad_(False)
        _inplace_resnets(vae)
        self.downsampling_factor = downsampling_factor(vae.config.block_out_channels)
        self.latent_channels = int(vae.config.latent_channels)
        self.max_memory = parse_memory(max_memory)
        if tile_size is not None and tile_size < self.downsampling_factor:
            raise ValueError(f"tile_size must be at least {self.downsampling_factor} pixels, got {tile_size}")
        self.tile_size = tile_size
        self.last_plan: CodingPlan | None = None  # how the last forward pass was run (whole or tiled)
        self.posterior_warned = False  # a posterior that is mostly noise is reported once, at the first sample
        # Tiling is exact here (latent_vae.codec.tiling): diffusers' approximate tiles never run inside the codec.
        vae.disable_tiling()
        if compile:
            # In place, so that state-dict keys (and saving) are unchanged.
            vae.encoder.compile()
            vae.decoder.compile()
        self.normalization = LatentNormalization.from_config(vae.config)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, *, seed: int | None = 0, **kwargs) -> "LatentCodec":
        """A codec around `latent_vae.load_vae(source)`: a preset name, a model folder or a .safetensors file."""
        return cls(load_vae(source, seed=seed), **kwargs)

    @property
    def config(self):
        return self.vae.config

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.downsampling_factor
        return (self.latent_channels, -(-height // f), -(-width // f))

    def set_normalization(self, normalization: LatentNormalization) -> None:
        """Write normalisation constants into the model config (saved with it, read by pipelines)."""
        write_normalization(self.vae, normalization)
        self.normalization = normalization
        self.fingerprint = model_fingerprint(self.vae)
        self.fingerprints = (self.fingerprint,)  # another normalisation: latents of the same function no longer are

    def _plan(self, direction: str, batch: torch.Tensor) -> CodingPlan:
        """The memory policy for one forward pass (`latent_vae.codec.tiling.plan_coding`)."""
        self.last_plan = plan_coding(self.vae, direction, tuple(batch.shape), dtype=self.dtype, device=self.device,
                                     max_memory=self.max_memory, tile_size=self.tile_size)
        return self.last_plan

    # -- encoding ----------------------------------------------------------------------------------

    def _image_batch(self, images: ImageInput | Sequence[ImageInput]) -> tuple[torch.Tensor, tuple[int, int]]:
        if isinstance(images, torch.Tensor):  # a batch already: used as it is (unstacking and restacking copies it)
            batch = check_image_tensor(images)
            return batch, tuple(batch.shape[-2:])
        tensors = as_image_tensors(images)
        sizes = {tuple(t.shape[-2:]) for t in tensors}
        if len(sizes) > 1:
            raise ValueError(
                f"images of different sizes in one call {sorted(sizes)}: encode them one call each, or resize them"
            )
        return torch.stack(tensors), tensors[0].shape[-2:]

    @torch.inference_mode()
    def _moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """float Nx3xHxW in [-1, 1] -> raw posterior moments (mean, logvar stacked on channels), float32"""
        pixels = pad_to_multiple(pixels, self.downsampling_factor)
        chunks = []
        for chunk in pixels.split(self.max_batch_size):
            chunk = chunk.to(self.device, self.dtype).contiguous(memory_format=self.memory_format)
            plan = self._plan("encode", chunk)
            if plan.whole:
                moments = self.vae.encode(chunk).latent_dist.parameters
            else:
                moments = encode_exact(self.vae, chunk, plan)
            chunks.append(moments.float())
        moments = torch.cat(chunks)
        self._check_finite(moments, "encoding")
        return moments

    def encode(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
        return_dict: bool = False,
    ) -> torch.Tensor | EncodeOutput:
        """images -> normalised latents (N x C x H/f x W/f, float32 on the codec's device).

        The posterior's mode by default; `sample=True` draws from it (with `generator`), with a
        PosteriorNoiseWarning when the sample would be mostly noise (`latent_vae.codec.posterior`). Sizes that
        are not multiples of the downsampling factor are padded; keep `image_size` (`return_dict=True`) to
        crop back on decode. All images of one call must have the same size.
        """
        pixels, image_size = self._image_batch(images)
        mean, logvar = self._moments(pixels).chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)  # as diffusers' DiagonalGaussianDistribution
        raw = mean
        if sample:
            std = torch.exp(0.5 * logvar)
            self._check_posterior(mean, std)
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            raw = mean + std * noise
        latents = self.normalization.normalize(raw)
        if return_dict:
            return EncodeOutput(latents=latents, mean=mean, logvar=logvar, image_size=tuple(image_size))
        return latents

    def _check_posterior(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Warn, once per codec, when a sample of this batch's posterior would be mostly noise (one pass over the
        moments)."""
        if self.posterior_warned:
            return
        stats = PosteriorStats()
        stats.update(mean, std)
        self.posterior_warned = warn_if_noisy(
            stats.noise_ratio(), self.vae.config.get("_name_or_path") or self.fingerprint,
            advice="encode without sample=True (the posterior's mode)") is not None

    def encode_raw(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """images -> the posterior mean before normalisation (what calibration measures)."""
        pixels, _ = self._image_batch(images)
        return self._moments(pixels).chunk(2, dim=1)[0]

    # -- decoding ----------------------------------------------------------------------------------

    def _check_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor):
            raise ValueError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        if latents.ndim == 3:
            latents = latents.unsqueeze(0)
        if latents.ndim != 4:
            raise ValueError(f"latents must be NxCxhxw (or Cxhxw), got shape {tuple(latents.shape)}")
        if latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"latents have {latents.shape[1]} channels but this model's latent has {self.latent_channels}"
            )
        return latents.float()

    @torch.inference_mode()
    def decode_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """raw (un-normalised) latents -> float images Nx3xHxW in [-1, 1] (padded size)"""
        chunks = []
        for chunk in raw.split(self.max_batch_size):
            chunk = chunk.to(self.device, self.dtype).contiguous(memory_format=self.memory_format)
            plan = self._plan("decode", chunk)
            image = self.vae.decode(chunk).sample if plan.whole else decode_exact(self.vae, chunk, plan)
            chunks.append(image.float())
        images = torch.cat(chunks)
        self._check_finite(images, "decoding")
        return images.clamp(-1.0, 1.0)

    def decode(
        self,
        latents: torch.Tensor,
        *,
        image_size: tuple[int, int] | None = None,
        output_type: Literal["pt", "np", "pil"] = "pt",
    ) -> torch.Tensor | np.ndarray | list[Image.Image]:
        """normalised latents -> images: "pt" float Nx3xHxW in [-1, 1], "np" uint8 NxHxWx3, or "pil".

        `image_size` (H, W) crops the padding that `encode` added to sizes not divisible by the factor.
        """
        latents = self._check_latents(latents)
        images = self.decode_raw(self.normalization.denormalize(latents.to(self.device)))
        if image_size is not None:
            height, width = image_size
            if height > images.shape[-2] or width > images.shape[-1]:
                raise ValueError(f"image_size {tuple(image_size)} is larger than the decoded {tuple(images.shape[-2:])}")
            images = images[..., :height, :width]
        if output_type == "pt":
            return images
        if output_type == "np":
            return tensor_to_uint8(images)
        if output_type == "pil":
            return tensor_to_pil(images)
        raise ValueError(f"unknown output_type {output_type!r}; choose pt, np or pil")

    def reconstruct(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """images -> encode (mode) -> decode, cropped to the input size: float Nx3xHxW in [-1, 1]"""
        encoded = self.encode(images, return_dict=True)
        return self.decode(encoded.latents, image_size=encoded.image_size)

    def _check_finite(self, tensor: torch.Tensor, stage: str) -> None:
        if torch.isfinite(tensor).all():
            return
        name = SHORT_NAMES[self.dtype]
        advice = (
            f"{name} overflowed: use dtype='fp32' (or 'bf16', whose range is fp32's)"
            if self.dtype != torch.float32
            else "the weights or the input contain NaN/inf"
        )
        if self.dtype == torch.float16:  # fp16 overflow is a property of the weights: `latent_vae.fp16.rescale` removes it
            advice += f", or {fp16_advice(self.vae)}"
        raise NonFiniteError(f"NaN or inf while {stage} in {name}: {advice}")


def _inplace_resnet_forward(self: ResnetBlock2D, input_tensor: torch.Tensor, temb=None, *args, **kwargs):
    """ResnetBlock2D.forward for inference: the same operations in the same order (the same numbers), with
    SiLU and the residual add in place and a division by an output_scale_factor of 1 skipped; on CPU
    every fresh full-size tensor costs page faults and a pass over memory. With gradients on, the original."""
    if torch.is_grad_enabled() or temb is not None or self.upsample is not None or self.downsample is not None:
        return ResnetBlock2D.forward(self, input_tensor, temb, *args, **kwargs)
    hidden = F.silu(self.norm1(input_tensor), inplace=True)
    hidden = F.silu(self.norm2(self.conv1(hidden)), inplace=True)
    hidden = self.conv2(self.dropout(hidden))
    shortcut = self.conv_shortcut(input_tensor) if self.conv_shortcut is not None else input_tensor
    hidden = hidden.add_(shortcut)  # = input + hidden: addition is commutative, bit for bit
    return hidden if self.output_scale_factor == 1 else hidden.div_(self.output_scale_factor)


def _inplace_resnets(vae: torch.nn.Module) -> int:
    """Give the SiLU ResnetBlock2Ds of an inference-only VAE the in-place forward (weights and keys unchanged);
    returns how many."""
    count = 0
    for module in vae.modules():
        if isinstance(module, ResnetBlock2D) and isinstance(module.nonlinearity, torch.nn.SiLU):
            module.forward = types.MethodType(_inplace_resnet_forward, module)
            count += 1
    return count


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between two latents (treats each as one vector)."""
    a_flat, b_flat = a.flatten().double(), b.flatten().double()
    cos = torch.dot(a_flat, b_flat) / (a_flat.norm() * b_flat.norm()).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    if omega.abs() < 1e-4:
        return torch.lerp(a, b, t)
    so = torch.sin(omega)
    out = (torch.sin((1 - t) * omega) / so) * a_flat + (torch.sin(t * omega) / so) * b_flat
    return out.view_as(a).to(a.dtype)


def interpolate_latents(a: torch.Tensor, b: torch.Tensor, steps: int, mode: str = "slerp") -> torch.Tensor:
    """`steps` latents from a to b inclusive (a and b: Cxhxw): stacked Nxcxhxw."""
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    if a.shape != b.shape:
        raise ValueError(f"latents of different shapes {tuple(a.shape)} and {tuple(b.shape)}: use images of one size")
    mix = {"slerp": slerp, "lerp": torch.lerp}.get(mode)
    if mix is None:
        raise ValueError(f"unknown interpolation mode {mode!r}; choose slerp or lerp")
    return torch.stack([mix(a, b, i / (steps - 1)) for i in range(steps)])
