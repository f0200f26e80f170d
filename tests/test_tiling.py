"""Exact tiling (`latent_vae.codec.tiling`): tiled coding is whole-image coding up to fp32 summation order."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import FP32_REORDER, assert_within_reordering, bf16_tolerance, relative_error
from torch import nn

from latent_vae import LatentCodec, build_vae, get_preset
from latent_vae.codec.tiling import (
    decode_exact,
    enable_exact_tiling,
    encode_exact,
    parse_memory,
    plan_coding,
    tile_regions,
)
from latent_vae.models.residual import ResidualAutoencoderKL

pytestmark = pytest.mark.numerics  # tiled against whole: equal up to fp32 summation order throughout

# What fp32 reordering can do across these networks, as a fraction of the output's range (tests/helpers.py: measured
# on several kernel sets); 500x below the error diffusers' per-tile GroupNorm statistics make (test_codec measures
# it on the same tiny models).
REORDER = FP32_REORDER


def model(name: str) -> nn.Module:
    """Tiny presets of every family; residual shortcuts with live (not zeroed) branches."""
    if name in ("global", "stage", "thumbnail"):
        torch.manual_seed(0)
        config = get_preset("f16c16-tiny").diffusers_config()
        return ResidualAutoencoderKL(**config, shortcut=name, zero_init=False).eval()
    return build_vae(name, seed=0).eval()


def assert_same(tiled: torch.Tensor, whole: torch.Tensor) -> None:
    assert tiled.shape == whole.shape
    error = (tiled - whole).abs().max().item()
    assert error <= REORDER * whole.abs().max().item(), f"max |tiled - whole| = {error:.3g}"


def smooth(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """An image with structure at several scales (in [-1, 1])."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, max(2, height // 16), max(2, width // 16), generator=generator)
    image = nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    return (image + 0.1 * torch.rand(batch, 3, height, width, generator=generator)).clamp(0, 1) * 2 - 1


FAMILIES = ["f16c16-tiny", "f8c4-tiny", "f8c16-tiny", "global", "stage", "thumbnail"]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("strategy", ["keep", "recompute"])
def test_tiled_encode_and_decode_equal_whole(name, strategy):
    """Batch 2, tiles of 24 px that divide no level of a 80x112 image (nor of a 5x7 or 10x14 latent)."""
    vae = model(name)
    x = smooth(2, 80, 112)
    with torch.inference_mode():
        moments = vae._encode(x)
        image = vae._decode(moments[:, : vae.config.latent_channels]).sample
    plan = plan_coding(vae, "encode", tuple(x.shape), tile_size=24, strategy=strategy)
    assert not plan.whole and strategy in plan.strategies
    assert_same(encode_exact(vae, x, plan), moments)
    z = moments[:, : vae.config.latent_channels]
    plan = plan_coding(vae, "decode", tuple(z.shape), tile_size=24, strategy=strategy)
    assert_same(decode_exact(vae, z, plan), image)


def test_tile_regions_cover_the_image_once():
    regions = tile_regions((50, 37), 16)
    covered = torch.zeros(50, 37, dtype=torch.int)
    for top, bottom, left, right in regions:
        covered[top:bottom, left:right] += 1
    assert bool((covered == 1).all()) and len(regions) == 4 * 3


def test_codec_odd_sizes_batches_and_tiles_match_whole():
    """Through LatentCodec: an odd size (padded to the factor, cropped back), batch 3 split into passes of 2.
    The yardstick is the codec itself: its channels_last and contiguous layouts differ by fp32 reordering only."""
    images = smooth(3, 75, 101, seed=1)
    whole = LatentCodec(build_vae("f16c16-tiny", seed=0), max_batch_size=2)
    layout = LatentCodec(build_vae("f16c16-tiny", seed=0), max_batch_size=2, channels_last=not whole.channels_last)
    tiled = LatentCodec(build_vae("f16c16-tiny", seed=0), max_batch_size=2, tile_size=40)
    encoded, tiled_encoded = whole.encode(images, return_dict=True), tiled.encode(images, return_dict=True)
    assert whole.last_plan.whole and not tiled.last_plan.whole
    assert_same(tiled_encoded.latents, encoded.latents)
    decoded = whole.decode(encoded.latents, image_size=encoded.image_size)
    assert decoded.shape == (3, 3, 75, 101)
    assert_within_reordering(tiled.decode(encoded.latents, image_size=encoded.image_size), decoded,
                             yardstick=layout.decode(encoded.latents, image_size=encoded.image_size))


def test_policy_whole_when_it_fits_tiles_when_not_same_result():
    vae = build_vae("f8c4-tiny", seed=0)
    shape = (1, 3, 512, 384)
    roomy = plan_coding(vae, "encode", shape, max_memory="64GB")
    assert roomy.whole and roomy.estimated_bytes <= roomy.budget_bytes
    tight = plan_coding(vae, "encode", shape, max_memory=roomy.estimated_bytes - 1)
    assert not tight.whole and tight.estimated_bytes < roomy.estimated_bytes
    with pytest.raises(ValueError, match="too small"):
        plan_coding(vae, "encode", shape, max_memory="1MB")
    image = smooth(1, 512, 384)
    budgeted = LatentCodec(build_vae("f8c4-tiny", seed=0), max_memory=roomy.estimated_bytes - 1)
    whole = LatentCodec(build_vae("f8c4-tiny", seed=0))
    layout = LatentCodec(build_vae("f8c4-tiny", seed=0), channels_last=not whole.channels_last)
    reference = whole.encode(image)
    assert_within_reordering(budgeted.encode(image), reference, yardstick=layout.encode(image))
    assert not budgeted.last_plan.whole and whole.last_plan.whole


def test_parse_memory():
    assert parse_memory("4GB") == 4 * 10**9
    assert parse_memory("512MiB") == 512 * 2**20
    assert parse_memory("1.5 GiB") == 3 * 2**29
    assert parse_memory(1000) == 1000 and parse_memory(None) is None
    for bad in ("four GB", "4XB", "-1GB", 0):
        with pytest.raises(ValueError, match="max_memory"):
            parse_memory(bad)


def test_unsupported_layers_are_refused_by_name():
    vae = build_vae("f16c16-tiny", seed=0)
    vae.decoder.conv_norm_out = nn.LayerNorm(16)
    with pytest.raises(ValueError, match="LayerNorm"):
        plan_coding(vae, "decode", (1, 16, 4, 4), tile_size=32)


def test_enable_exact_tiling_inside_a_diffusers_pipeline():
    """DiTPipeline with a tiny budget forcing tiles produces the images it makes untiled; its VAE's decode equals
    the codec's decode of the same latents."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=16, out_channels=32, num_layers=1,
        sample_size=6, patch_size=2, norm_num_groups=4, num_embeds_ada_norm=1000,
    )
    pipe = DiTPipeline(transformer=transformer, vae=build_vae("f16c16-tiny", seed=0), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(class_labels=[1, 7], num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images

    whole = run()
    seen = []
    enable_exact_tiling(pipe.vae, tile_size=32, strategy="recompute")
    decode = pipe.vae._decode
    pipe.vae._decode = lambda z, return_dict=True: seen.append(z.clone()) or decode(z, return_dict)
    tiled = run()
    assert whole.shape == tiled.shape == (2, 96, 96, 3) and len(seen) == 1
    assert abs(tiled - whole).max() <= REORDER * 2  # images in [0, 1]
    codec = LatentCodec(build_vae("f16c16-tiny", seed=0), channels_last=False)
    codec_images = codec.decode_raw(seen[0]).div(2).add(0.5)  # the pipeline's latent, un-normalised already
    with torch.inference_mode():
        pipe_images = pipe.vae.decode(seen[0]).sample.clamp(-1, 1).div(2).add(0.5)
    assert_same(pipe_images, codec_images)


def test_cli_encode_equals_precompute_and_a_pipeline_decode_equals_cli_decode(tmp_path):
    """The same photo: `latent-vae encode` in forced exact tiles and `precompute` (whole, at the photo's own size,
    so nothing is resized) give the same latent; `latent-vae decode` of it equals a diffusers-style
    `vae.decode` with enable_exact_tiling."""
    from PIL import Image

    from latent_vae import load_vae, precompute_latents, save_vae
    from latent_vae.cli import main
    from latent_vae.latents.readers import load_latents
    from latent_vae.latents.single_file import load_latent_file

    side = 128
    vae = build_vae("f16c16-tiny", seed=0)
    vae.register_to_config(scaling_factor=2.5, shift_factor=0.1)
    model_dir = save_vae(vae, tmp_path / "model")
    photos = tmp_path / "photos"
    photos.mkdir()
    pixels = ((smooth(1, side, side, seed=3)[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
    Image.fromarray(pixels).save(photos / "photo.png")
    assert main(["encode", str(photos / "photo.png"), "--model", str(model_dir), "--out", str(tmp_path / "enc"),
                 "--tile-size", "48", "--device", "cpu"]) == 0
    cli_latent = load_latent_file(tmp_path / "enc" / "photo.safetensors").latents
    precompute_latents(str(model_dir), photos, tmp_path / "pre", resolution=side, dtype="fp32", num_workers=0,
                       progress=False)
    pre_latent = load_latents(tmp_path / "pre", model=str(model_dir), resolution=side, sample=False)[0]["latents"]
    assert cli_latent.shape == pre_latent.shape == (16, side // 16, side // 16)
    assert_same(cli_latent, pre_latent)
    # `precompute --max-memory` just below what the whole image needs: exact tiles, the same latent.
    batch = (8, 3, side, side)  # precompute's default batch
    budget = plan_coding(load_vae(model_dir), "encode", batch).estimated_bytes - 1
    assert not plan_coding(load_vae(model_dir), "encode", batch, max_memory=budget).whole
    assert main(["precompute", "--model", str(model_dir), "--data", str(photos), "--out", str(tmp_path / "pre_tiled"),
                 "--resolution", str(side), "--dtype", "fp32", "--num-workers", "0", "--no-progress",
                 "--max-memory", str(budget)]) == 0
    assert json.loads((tmp_path / "pre_tiled" / "summary.json").read_text())["failures"] == 0
    tiled_latent = load_latents(tmp_path / "pre_tiled", model=str(model_dir), sample=False)[0]["latents"]
    assert_same(tiled_latent, pre_latent)

    assert main(["decode", str(tmp_path / "enc" / "photo.safetensors"), "--model", str(model_dir), "--out",
                 str(tmp_path / "dec"), "--device", "cpu"]) == 0
    cli_image = torch.from_numpy(np.array(Image.open(tmp_path / "dec" / "photo.png"))).float()
    pipe_vae = enable_exact_tiling(load_vae(model_dir), tile_size=48, strategy="keep")
    with torch.inference_mode():  # as diffusers pipelines decode: latents / scaling_factor + shift_factor
        raw = cli_latent[None] / 2.5 + 0.1
        image = pipe_vae.decode(raw).sample.clamp(-1, 1)
    pipe_image = ((image[0].permute(1, 2, 0) + 1) * 127.5).round()
    assert (pipe_image - cli_image).abs().max().item() <= 1  # the same image, up to 8-bit rounding


def test_default_cuda_budget_counts_the_allocators_cached_memory(monkeypatch):
    """Memory the caching allocator keeps after a batch is still this process's to use: the budget must not
    shrink from one batch to the next (simulated: no GPU is needed)."""
    from latent_vae.codec.tiling import default_budget

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 6 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * gib)
    assert default_budget(torch.device("cuda")) == int(0.9 * 14 * gib)


def test_cuda_plans_tile_levels_too_big_for_fast_kernels_and_recompute_rather_than_copy_to_host():
    """Planned for CUDA (arithmetic only: no GPU is needed). A decoder level whose tensor of one image has 2**31
    elements or more is tiled even when memory is plentiful; automatic CUDA plans never keep tiles in host
    memory; a batch of small images stays whole (a batch can be split under 32-bit indexing)."""
    from latent_vae.codec.tiling import CUDA_TILE_FROM_ELEMENTS, program_for

    vae = build_vae("f16c16-tiny", seed=0)
    program = program_for(vae, "decode")
    latent = (1, vae.config.latent_channels, 1024, 1024)  # a 16384x16384 image
    sizes, channels = program.sizes(*latent[-2:]), program.channels()
    huge = [any(channels[op.dst] * sizes[op.dst][0] * sizes[op.dst][1] >= CUDA_TILE_FROM_ELEMENTS for op in level.ops)
            for level in program.levels]
    assert any(huge) and not all(huge)
    plentiful = "1000TB"
    on_cpu = plan_coding(vae, "decode", latent, max_memory=plentiful, device="cpu")
    on_cuda = plan_coding(vae, "decode", latent, max_memory=plentiful, device="cuda")
    assert on_cpu.whole
    assert not on_cuda.whole and "keep" not in on_cuda.strategies
    assert [s != "untiled" for s in on_cuda.strategies] == huge
    recomputed = plan_coding(vae, "decode", latent, max_memory=plentiful, device="cuda", strategy="recompute",
                             tile_size=512)
    tight = plan_coding(vae, "decode", latent, max_memory=recomputed.estimated_bytes, device="cuda")
    assert "keep" not in tight.strategies and "recompute" in tight.strategies
    assert tight.estimated_bytes <= recomputed.estimated_bytes
    forced = plan_coding(vae, "decode", latent, max_memory=plentiful, device="cuda", strategy="keep")
    assert "keep" in forced.strategies
    batch = plan_coding(vae, "decode", (64, vae.config.latent_channels, 64, 64), max_memory=plentiful, device="cuda")
    assert batch.whole


def test_cpu_policy_keeps_a_level_that_fits_kept_but_not_untiled_rather_than_recomputing_it():
    """A budget between the peak of an untiled top level and that of a kept one: the CPU plan keeps that level,
    although recomputing it would fit too (keep is measured faster than recompute on CPU)."""
    from latent_vae.codec.tiling import estimate_bytes, program_for

    vae = build_vae("f16c16-tiny", seed=0)
    shape = (1, vae.config.latent_channels, 128, 128)  # a 2048x2048 image
    program = program_for(vae, "decode")
    weights = sum(p.numel() * p.element_size() for p in vae.parameters())

    def estimate(last_level: str) -> int:
        strategies = ("untiled",) * (len(program.levels) - 1) + (last_level,)
        return estimate_bytes(program, shape[-2:], 1, 4, strategies, 512, weights, False)

    budget = estimate("keep")
    assert estimate("recompute") <= budget < estimate("untiled")  # the premise: the top level does not fit untiled
    plan = plan_coding(vae, "decode", shape, max_memory=budget)
    assert not plan.whole and plan.estimated_bytes <= budget
    assert plan.strategies[-1] == "keep" and "recompute" not in plan.strategies, plan.describe()


def test_bf16_tiles_normalise_a_few_groups_at_a_time_with_the_same_result(monkeypatch):
    """bf16/fp16 GroupNorm runs in fp32 in slices of channels (so that untiled levels hold no fp32 copy of the
    tensor): the slices must give exactly what one pass gives, batches included, and stay close to the whole
    image in bf16 (how close fp32 reordering allows after bf16 rounding)."""
    from latent_vae.codec.tiling import ops

    vae = build_vae("f8c4-tiny", seed=0).to(torch.bfloat16)
    image = smooth(2, 64, 48).to(torch.bfloat16)
    plan = plan_coding(vae, "encode", tuple(image.shape), dtype=torch.bfloat16, tile_size=32, strategy="keep")
    one_pass = encode_exact(vae, image, plan)
    monkeypatch.setattr(ops, "HALF_NORM_CHUNK", 1)  # one group per slice
    sliced = encode_exact(vae, image, plan)
    assert torch.equal(sliced, one_pass)
    with torch.inference_mode():
        whole = vae._encode(image)
    # bf16 through the encoder's layers: identical here on AVX-512 and AVX2 kernels, 0.6% (relative L2) on the
    # baseline set, against sqrt(layers) * 2^-8 = 1.7%.
    layers = sum(isinstance(m, nn.Conv2d) for m in vae.encoder.modules())
    assert relative_error(sliced.float(), whole.float()) <= 2 * bf16_tolerance(layers)
