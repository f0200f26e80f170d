"""An f16c16 VAE made here inside real diffusers pipelines: DiT, and (with transformers installed) SD and FLUX.

Each test checks the image size (latent side x vae_scale_factor 16) and that the pipeline applies the
model's normalisation before decoding: the same run with two different configs must hand the decoder
latents that differ exactly by that normalisation.
"""

from __future__ import annotations

import pytest
import torch
from helpers import FP32_OP, assert_close

from latent_vae import LatentNormalization, build_vae
from latent_vae.models.normalization import write_normalization

LATENT = 4  # latent side: 64x64 images


def decode_inputs(pipe, run, normalizations: list[LatentNormalization]) -> tuple[list[torch.Tensor], list]:
    """`run(pipe)` once per normalisation in the VAE config: the latents the decoder received, and the outputs."""
    seen: list[torch.Tensor] = []
    decode = pipe.vae.decode

    def spy(z, *args, **kwargs):
        seen.append(z.detach().clone())
        return decode(z, *args, **kwargs)

    pipe.vae.decode = spy
    outputs = []
    for normalization in normalizations:
        write_normalization(pipe.vae, normalization)
        outputs.append(run(pipe))
    assert len(seen) == len(normalizations)
    return seen, outputs


def test_dit_pipeline_with_f16_vae():
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=16, out_channels=32, num_layers=1,
        sample_size=LATENT, patch_size=2, norm_num_groups=4,
        num_embeds_ada_norm=1000,  # DiTPipeline's guidance uses class 1000 as the null class
    )
    pipe = DiTPipeline(transformer=transformer, vae=build_vae("f16c16-tiny", seed=0), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)

    def run(p):
        return p(class_labels=[1, 7], num_inference_steps=2, guidance_scale=2.0, generator=torch.manual_seed(0)).images

    seen, outputs = decode_inputs(pipe, run, [LatentNormalization(1.0), LatentNormalization(0.25)])
    assert [im.size for im in outputs[0]] == [(LATENT * 16, LATENT * 16)] * 2
    assert seen[0].shape == (2, 16, LATENT, LATENT)
    # DiT applies the scale (latents / scaling_factor) and ignores shift_factor.
    assert_close(seen[1], seen[0] * 4, FP32_OP)


def test_stable_diffusion_pipeline_with_f16_vae():
    pytest.importorskip("transformers", reason="StableDiffusionPipeline needs transformers even with prompt_embeds")
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=LATENT, in_channels=16, out_channels=16, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    pipe = StableDiffusionPipeline(
        vae=build_vae("f16c16-tiny", seed=0), text_encoder=None, tokenizer=None, unet=unet, scheduler=DDIMScheduler(clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 16
    prompt_embeds = torch.randn(2, 7, 32, generator=torch.manual_seed(1))  # stands in for a text encoder

    def run(p):
        return p(prompt_embeds=prompt_embeds, num_inference_steps=2, guidance_scale=1.0,
                 generator=torch.manual_seed(0)).images

    seen, outputs = decode_inputs(pipe, run, [LatentNormalization(1.0), LatentNormalization(0.5)])
    assert [im.size for im in outputs[0]] == [(LATENT * 16, LATENT * 16)] * 2
    assert_close(seen[1], seen[0] * 2, FP32_OP)  # SD applies the scale, not the shift


def test_flux_pipeline_applies_scale_and_shift():
    pytest.importorskip("transformers", reason="FluxPipeline needs transformers even with prompt_embeds")
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16 * 4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=build_vae("f16c16-tiny", seed=0), text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    side = LATENT * 16  # FLUX packs 2x2 latent patches, so sizes are multiples of 2 x 16

    def run(p):
        return p(prompt_embeds=torch.randn(1, 5, 32, generator=torch.manual_seed(1)),
                 pooled_prompt_embeds=torch.randn(1, 16, generator=torch.manual_seed(2)),
                 height=side, width=side, num_inference_steps=2, generator=torch.manual_seed(0)).images

    normalizations = [LatentNormalization(1.0, 0.0), LatentNormalization(scaling_factor=0.5, shift_factor=0.3)]
    seen, outputs = decode_inputs(pipe, run, normalizations)
    assert outputs[0][0].size == (side, side)
    assert seen[0].shape == (1, 16, LATENT, LATENT)
    assert_close(seen[1], seen[0] * 2 + 0.3, FP32_OP)  # FLUX: latents / scaling_factor + shift_factor
