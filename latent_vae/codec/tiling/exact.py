"""The entry points: exact tiled encode and decode, and a diffusers VAE that chooses whole-image coding or exact
tiles itself."""

from __future__ import annotations

import types

import torch
from diffusers.models.autoencoders.vae import DecoderOutput
from torch import nn

from .executor import run_program
from .policy import CodingPlan, parse_memory, plan_coding
from .program import program_for


@torch.inference_mode()
def encode_exact(vae: nn.Module, x: torch.Tensor, plan: CodingPlan) -> torch.Tensor:
    """images N x C x H x W -> posterior moments, as `vae._encode(x)` computes them on the whole image."""
    storage = torch.device("cpu") if x.device.type == "cuda" else x.device
    return run_program(program_for(vae, "encode"), x, plan.strategies, plan.tile_size, storage).to(x.device)


@torch.inference_mode()
def decode_exact(vae: nn.Module, z: torch.Tensor, plan: CodingPlan) -> torch.Tensor:
    """raw latents (before post_quant_conv) -> images, as `vae._decode(z).sample` computes them on the whole image."""
    storage = torch.device("cpu") if z.device.type == "cuda" else z.device
    return run_program(program_for(vae, "decode"), z, plan.strategies, plan.tile_size, storage).to(z.device)


def enable_exact_tiling(vae: nn.Module, max_memory: str | int | None = None, *, tile_size: int | None = None,
                        strategy: str | None = None) -> nn.Module:
    """Make a diffusers VAE's `encode`/`decode` choose whole-image or exact tiled coding from `max_memory`, so
    that pipelines (DiTPipeline, StableDiffusionPipeline, ...) code large images in bounded memory without
    seams and with the same result. Replaces diffusers' approximate tiling on this instance; returns `vae`."""
    parse_memory(max_memory)  # fail now on a malformed budget
    program_for(vae, "encode"), program_for(vae, "decode")  # fail now on an unsupported model
    vae.disable_tiling()
    cls = type(vae)

    def plan(direction, x):
        return plan_coding(vae, direction, tuple(x.shape), dtype=x.dtype, device=x.device, max_memory=max_memory,
                           tile_size=tile_size, strategy=strategy)

    def _encode(self, x):
        p = plan("encode", x)
        return cls._encode(self, x) if p.whole else encode_exact(self, x, p)

    def _decode(self, z, return_dict=True):
        p = plan("decode", z)
        if p.whole:
            return cls._decode(self, z, return_dict=return_dict)
        image = decode_exact(self, z, p)
        return DecoderOutput(sample=image) if return_dict else (image,)

    vae._encode = types.MethodType(_encode, vae)
    vae._decode = types.MethodType(_decode, vae)
    return vae
