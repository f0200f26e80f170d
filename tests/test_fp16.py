"""fp16_safe: a KL-VAE rescaled by powers of two into fp16's range computes the same function.

Each family's test model is an overflowing *source* made from a well-behaved *twin* by the inverse of the
transform (every free stage x 2**15): in fp32 the two are the same function, in fp16 the source gives inf/NaN
while the twin does not. Its GroupNorms keep the architecture's eps (the twin's are 2**-30 of it), so the source
is an ordinary diffusers model, as the published VAEs that overflow are.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL
from torch import nn

from latent_vae import LatentCodec, LatentNormalization, build_vae, load_vae, model_fingerprint
from latent_vae.fp16.rescale import (
    FP16_MAX,
    REPORT_FILE,
    Fp16FixError,
    fp16_safe,
    save_fp16_safe,
    stage_graph,
)
from latent_vae.models.convert import LDMArchitecture
from latent_vae.models.loading import GROUPNORM_EPS_KEY, function_fingerprints
from latent_vae.models.normalization import write_normalization
from latent_vae.models.presets import get_preset
from latent_vae.models.residual import ResidualAutoencoderKL

SCALE = 2.0**15  # what the source's stages are multiplied by


def smooth(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Images with structure at several scales, in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, max(2, height // 16), max(2, width // 16), generator=generator)
    image = nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    return (image + 0.1 * torch.rand(batch, 3, height, width, generator=generator)).clamp(0, 1) * 2 - 1


def residual(shortcut: str) -> ResidualAutoencoderKL:
    # zero_init=False: every branch carries signal, so every stage can overflow
    return ResidualAutoencoderKL(**get_preset("f16c16-tiny").diffusers_config(), shortcut=shortcut, zero_init=False)


def ldm_with_attention_levels() -> AutoencoderKL:
    """What `latent-vae convert` makes of an LDM autoencoder with attention at a level (Attn blocks, 32 groups)."""
    architecture = LDMArchitecture(block_out_channels=(32, 32, 32), layers_per_block=1, latent_channels=4,
                                   encoder_attention_levels=(2,), decoder_attention_levels=(2,))
    return AutoencoderKL(**architecture.diffusers_config())


# family -> (builder, calibration side); the fp16 checks run at 4x that side
FAMILIES = {
    "f16c16": (lambda: build_vae("f16c16-tiny", seed=None), 64),
    "f8c4": (lambda: build_vae("f8c4-tiny", seed=None), 32),
    "f8c16": (lambda: build_vae("f8c16-tiny", seed=None), 32),
    # FLUX's VAE has neither quant_conv nor post_quant_conv
    "flux-layout": (lambda: AutoencoderKL(**{**get_preset("f8c16-tiny").diffusers_config(), "use_quant_conv": False,
                                              "use_post_quant_conv": False}), 32),
    "ldm-attention": (ldm_with_attention_levels, 32),
    "residual-global": (lambda: residual("global"), 32),
    "residual-stage": (lambda: residual("stage"), 32),
    "residual-thumbnail": (lambda: residual("thumbnail"), 32),
}
PLAIN = ("f16c16", "f8c4", "f8c16", "flux-layout", "ldm-attention")


def overflowing_pair(vae: AutoencoderKL) -> tuple[AutoencoderKL, AutoencoderKL]:
    """(twin, source): source = twin with every free stage x SCALE, by the inverse of the transform."""
    twin = copy.deepcopy(vae).eval()
    graph = stage_graph(twin)
    for _, norm, reads in graph.norms:
        if graph.stage_of(reads).free:
            norm.eps /= SCALE**2  # the rescale below multiplies it back to the architecture's
    source = copy.deepcopy(twin)
    source_graph = stage_graph(source)
    source_graph.rescale({stage.name: SCALE for stage in source_graph.stages() if stage.free})
    return twin, source


def code(vae: AutoencoderKL, pixels: torch.Tensor, dtype: torch.dtype = torch.float32, latents=None):
    """(posterior mean, decoded image) in float32; decodes `latents` when given, else the mean."""
    vae = copy.deepcopy(vae).to(dtype).eval()
    with torch.no_grad():
        mean = vae.encode(pixels.to(dtype)).latent_dist.mean
        image = vae.decode((mean if latents is None else latents).to(dtype)).sample
    return mean.float(), image.float()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    build, side = FAMILIES[request.param]
    torch.manual_seed(0)
    twin, source = overflowing_pair(build())
    write_normalization(source, LatentNormalization(scaling_factor=0.5, shift_factor=0.25))
    calibration = smooth(2, side, side, seed=1)
    large = smooth(1, 4 * side, 4 * side, seed=2)  # 4x the side, other content
    fixed = copy.deepcopy(source)
    report = fp16_safe(fixed, calibration)
    return SimpleNamespace(name=request.param, twin=twin, source=source, fixed=fixed, report=report,
                           calibration=calibration, large=large)


# -- the test models ------------------------------------------------------------------------------------------


def test_the_source_is_its_twins_function_and_overflows_fp16(family):
    source_eps = {m.eps for m in family.source.modules() if isinstance(m, nn.GroupNorm)}
    assert source_eps == {1e-6}  # an ordinary diffusers model
    twin, source = code(family.twin, family.calibration), code(family.source, family.calibration)
    for ours, theirs in zip(source, twin):
        assert relative(ours, theirs) <= 1e-4
    encoded, decoded = code(family.source, family.calibration, torch.float16, latents=source[0])
    assert not finite(encoded) and not finite(decoded)  # the encoder, and the decoder on fp32 latents
    assert all(finite(t) for t in code(family.twin, family.calibration, torch.float16))


# -- the fix --------------------------------------------------------------------------------------------------


def test_the_fixed_model_computes_the_sources_function_in_fp32(family):
    for ours, theirs in zip(code(family.fixed, family.calibration), code(family.source, family.calibration)):
        assert relative(ours, theirs) <= 1e-4


def test_fp16_is_finite_at_4x_and_as_accurate_as_the_twins_own_fp16(family):
    reference = code(family.source, family.large)  # fp32
    fixed = code(family.fixed, family.large, torch.float16, latents=reference[0].half())
    twin = code(family.twin, family.large, torch.float16, latents=reference[0].half())
    for ours, theirs, truth in zip(fixed, twin, reference):
        assert finite(ours)
        assert relative(ours, truth) <= 2 * relative(theirs, truth)


def test_the_report_tells_the_peaks_before_and_after(family):
    report = family.report
    assert report.changed and any(stage.peak_before > FP16_MAX for stage in report.stages)
    for stage in report.stages:
        assert stage.peak_after <= report.limit
        assert stage.factor == 1 or stage.peak_after > report.limit / 2  # scaled down no further than needed
        assert stage.factor <= 1
    table = report.table()
    assert all(stage.label in table for stage in report.stages) and "(overflows)" in table
    # Measured again on the fixed model: the peaks it reported, and nothing left to do.
    again = fp16_safe(copy.deepcopy(family.fixed), family.calibration)
    assert not again.changed
    for before, after in zip(report.stages, again.stages):
        assert before.name == after.name
        assert after.peak_before == pytest.approx(before.peak_after, rel=1e-4)


def test_the_saved_folder_loads_keeps_normalisation_and_lineage(family, tmp_path):
    folder = save_fp16_safe(family.fixed, family.report, tmp_path / "fixed")
    assert (folder / REPORT_FILE).is_file()
    loaded = load_vae(folder)
    assert type(loaded) is type(family.source)
    norms = {name: m.eps for name, m in loaded.named_modules() if isinstance(m, nn.GroupNorm)}
    assert norms == {name: m.eps for name, m in family.fixed.named_modules() if isinstance(m, nn.GroupNorm)}
    assert loaded.config[GROUPNORM_EPS_KEY] and model_fingerprint(loaded) == model_fingerprint(family.fixed)
    assert LatentNormalization.from_config(loaded.config) == LatentNormalization(0.5, 0.25)
    assert model_fingerprint(family.source) in function_fingerprints(loaded)
    source = code(family.source, family.calibration)
    for ours, theirs in zip(code(loaded, family.calibration, latents=source[0]), source):
        assert relative(ours, theirs) <= 1e-4
    if family.name in PLAIN:
        # plain diffusers: every GroupNorm gets eps 1e-6 back; the report bounds what that changes
        plain = AutoencoderKL.from_pretrained(folder)
        for ours, theirs in zip(code(plain, family.calibration), source):
            assert relative(ours, theirs) <= 1e-4
        assert family.report.plain_load_eps_error < 1e-6
        half = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float16)
        with torch.no_grad():
            assert finite(half.decode(source[0].half()).sample)
        # handed to the codec, a plain-loaded model gets its exact eps back: the fixed model's fingerprint
        assert LatentCodec(plain).fingerprint == model_fingerprint(family.fixed)
        assert {m.eps for m in plain.modules() if isinstance(m, nn.GroupNorm)} != {1e-6}
    else:
        with pytest.raises(ValueError):  # the shortcut's block types guard against a plain load
            AutoencoderKL.from_pretrained(folder)


# -- where it is used -----------------------------------------------------------------------------------------


def fixed_and_source(name: str):
    build, side = FAMILIES[name]
    torch.manual_seed(0)
    _, source = overflowing_pair(build())
    fixed = copy.deepcopy(source)
    fp16_safe(fixed, smooth(2, side, side, seed=1))
    return fixed, source, side


def test_a_diffusers_pipeline_decodes_in_fp16_with_the_fixed_model(tmp_path):
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    fixed, source, _ = fixed_and_source("f16c16")
    fixed.save_pretrained(tmp_path / "vae")

    def images(vae):
        torch.manual_seed(0)
        transformer = DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=16, out_channels=32, num_layers=1,
            sample_size=4, patch_size=2, norm_num_groups=4, num_embeds_ada_norm=1000)
        pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler()).to(torch.float16)
        pipe.set_progress_bar_config(disable=True)
        return pipe(class_labels=[3], num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images

    assert finite(torch.from_numpy(images(AutoencoderKL.from_pretrained(tmp_path / "vae"))))
    assert not finite(torch.from_numpy(images(source)))  # what the fix removes


def test_the_projects_pipeline_decodes_in_fp16_with_the_fixed_model():
    from latent_vae.pipeline import LatentDiffusionPipeline
    from latent_vae.utils.errors import NonFiniteError

    fixed, source, _ = fixed_and_source("f16c16")

    def generate(vae):
        pipe = LatentDiffusionPipeline.from_vae(vae.half(), image_size=64, seed=0, block_out_channels=(16, 32),
                                                layers_per_block=1, norm_num_groups=8)
        pipe.unet.float()  # the UNet in fp32, the VAE in fp16: decode_latents casts the latents
        pipe.set_progress_bar_config(disable=True)
        return pipe(batch_size=1, num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt").images

    assert finite(generate(fixed))
    with pytest.raises(NonFiniteError, match="latent-vae fp16-fix"):
        generate(source)


@pytest.mark.parametrize("name", ["f16c16", "ldm-attention", "residual-thumbnail"])
def test_exact_tiling_in_fp16_equals_whole_within_fp16_rounding(name):
    """Tiled against whole, both fp16; the yardstick is the whole image in the other memory layout (the same
    function in another summation order). The thumbnail shortcut reaches across tiles; attention is whole-tensor."""
    fixed, _, side = fixed_and_source(name)
    image = smooth(1, 3 * side, 2 * side + side // 2, seed=3)
    whole = LatentCodec(copy.deepcopy(fixed), dtype="fp16", channels_last=False)
    layout = LatentCodec(copy.deepcopy(fixed), dtype="fp16", channels_last=True)
    tiled = LatentCodec(copy.deepcopy(fixed), dtype="fp16", channels_last=False, tile_size=side)
    latents = whole.encode(image)
    tiled_latents = tiled.encode(image)
    assert whole.last_plan.whole and not tiled.last_plan.whole
    assert relative(tiled_latents, latents) <= 2 * relative(layout.encode(image), latents)
    decoded = whole.decode(latents)
    assert relative(tiled.decode(latents), decoded) <= 2 * relative(layout.decode(latents), decoded)
    assert finite(tiled_latents)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tiled_groupnorm_statistics_of_a_half_tensor_are_those_of_its_fp32_values(dtype):
    """Whole-image GroupNorm keeps its statistics in fp32; the tiles' must too (the kernel rounds them to the
    input's dtype), or tiled fp16/bf16 carries a rounding that whole-image coding does not."""
    from latent_vae.codec.tiling.ops import tile_stats

    x = (torch.randn(2, 12, 9, 7, generator=torch.Generator().manual_seed(0)) * 300).to(dtype)
    for ours, theirs in zip(tile_stats(x, 4), tile_stats(x.float(), 4)):
        assert torch.equal(torch.as_tensor(ours), torch.as_tensor(theirs))


# -- what it refuses, and what it leaves alone ----------------------------------------------------------------


class Shifted(nn.GroupNorm):
    """A norm subclass: not provably GroupNorm's arithmetic."""


def custom_processor(vae):
    vae.decoder.mid_block.attentions[0].set_processor(type("MyProcessor", (), {"__call__": lambda *a, **k: None})())


REFUSALS = {
    "a LayerNorm for conv_norm_out": (lambda v: setattr(v.decoder, "conv_norm_out", nn.LayerNorm(8)),
                                      "decoder.conv_norm_out"),
    "a GroupNorm subclass": (lambda v: setattr(v.encoder.down_blocks[0].resnets[0], "norm1", Shifted(4, 8)),
                             "encoder.down_blocks.0.resnets.0.norm1"),
    "a time embedding": (lambda v: setattr(v.decoder.up_blocks[0].resnets[0], "time_emb_proj", nn.Linear(4, 16)),
                         "decoder.up_blocks.0.resnets.0"),
    "a custom attention processor": (custom_processor, "decoder.mid_block.attentions.0"),
    "an unknown module": (lambda v: setattr(v.encoder, "extra", nn.Conv2d(8, 8, 1)), "encoder.extra"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_what_it_cannot_prove_is_refused_by_name_before_any_change(case):
    change, name = REFUSALS[case]
    vae = build_vae("f16c16-tiny", seed=0)
    change(vae)
    before = copy.deepcopy(vae.state_dict())
    with pytest.raises(Fp16FixError, match=name.replace(".", r"\.")):
        fp16_safe(vae, smooth(1, 32, 32))
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())


def test_an_unknown_model_class_is_refused():
    class MyVAE(AutoencoderKL):
        pass

    with pytest.raises(Fp16FixError, match="MyVAE"):
        fp16_safe(MyVAE(**get_preset("f16c16-tiny").diffusers_config()), smooth(1, 32, 32))


def test_a_fixed_stage_inside_fp16_but_above_the_limit_is_a_warning():
    vae = build_vae("f16c16-tiny", seed=0)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(2.0**12)  # the decoded image peaks in the thousands: inside fp16
    report = fp16_safe(vae, smooth(1, 32, 32))
    assert [stage.name for stage in report.tight] == ["decoder.conv_out"]
    assert "warning: decoder.conv_out (the decoded image)" in report.summary()


def test_a_fixed_stage_that_does_not_fit_is_refused_naming_it():
    vae = build_vae("f16c16-tiny", seed=0)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(2.0**20)  # the decoded image itself leaves fp16's range
    before = copy.deepcopy(vae.state_dict())
    with pytest.raises(Fp16FixError, match=r"decoder\.conv_out.*the decoded image"):
        fp16_safe(vae, smooth(1, 32, 32))
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())


def test_a_model_that_fits_comes_back_unchanged():
    vae = build_vae("f16c16-tiny", seed=0)
    fingerprint, config = model_fingerprint(vae), dict(vae.config)
    report = fp16_safe(vae, smooth(1, 64, 64))
    assert not report.changed and report.fingerprint == fingerprint == model_fingerprint(vae)
    assert dict(vae.config) == config


def test_bad_arguments_are_refused():
    vae = build_vae("f16c16-tiny", seed=0)
    with pytest.raises(ValueError, match="headroom"):
        fp16_safe(vae, smooth(1, 32, 32), headroom=3)
    with pytest.raises(ValueError, match="fp32"):
        fp16_safe(copy.deepcopy(vae).half(), smooth(1, 32, 32))
    with pytest.raises(ValueError, match="at least one"):
        fp16_safe(vae, [])
    with pytest.raises(ValueError, match="powers of two"):
        stage_graph(vae).rescale({"decoder.conv_in": 3.0})
    with pytest.raises(ValueError, match="fixed"):
        stage_graph(vae).rescale({"decoder.conv_out": 2.0})


# -- the command, and the rest of the project with a fixed model ----------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An overflowing f16c16 source folder (with a normalisation), calibration images, and its fixed folder
    written by the command."""
    from latent_vae import cli, save_vae
    from latent_vae.images.reading import tensor_to_pil

    root = tmp_path_factory.mktemp("fp16")
    torch.manual_seed(0)
    _, source = overflowing_pair(build_vae("f16c16-tiny", seed=None))
    write_normalization(source, LatentNormalization(scaling_factor=0.5, shift_factor=0.25))
    save_vae(source, root / "source")
    (root / "images").mkdir()
    for i, image in enumerate(tensor_to_pil(smooth(3, 80, 64, seed=4))):
        image.save(root / "images" / f"{i}.png")
    code = cli.main(["fp16-fix", "--model", str(root / "source"), "--data", str(root / "images"),
                     "--out", str(root / "fixed"), "--resolution", "32", "--device", "cpu"])
    assert code == 0
    return SimpleNamespace(root=root, source=root / "source", images=root / "images", fixed=root / "fixed")


def fp16_fix(capsys, *argv) -> tuple[int, str, str]:
    from latent_vae import cli

    code = cli.main(["fp16-fix", "--resolution", "32", "--device", "cpu", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_command_prints_the_table_and_writes_a_folder_that_fp16_decodes(saved, tmp_path, capsys):
    code, out, err = fp16_fix(capsys, "--model", saved.source, "--data", saved.images, "--out", tmp_path / "fixed")
    assert code == 0, err
    assert "peak before" in out and "(overflows)" in out and "65504" in out and "decoder.conv_in" in out
    report = (tmp_path / "fixed" / REPORT_FILE).read_text()
    assert '"headroom": 32.0' in report
    latents = LatentCodec.from_pretrained(saved.source).encode(smooth(1, 128, 96, seed=5))
    decoded = LatentCodec.from_pretrained(tmp_path / "fixed", dtype="fp16").decode(latents)
    assert finite(decoded)


def test_the_command_refuses_before_any_work(saved, tmp_path, capsys):
    (tmp_path / "a-file").write_text("keep me")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me too")
    for out, why in [(tmp_path / "a-file", "not a folder"), (tmp_path / "other", "other things"),
                     (saved.source, "is the --model folder")]:
        code, _, err = fp16_fix(capsys, "--model", saved.source, "--data", saved.images, "--out", out)
        assert code == 2 and why in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "a-file").read_text() == "keep me" and (tmp_path / "other" / "notes.txt").is_file()
    code, _, err = fp16_fix(capsys, "--model", saved.source, "--data", saved.images, "--out", tmp_path / "new",
                            "--headroom", "3")
    assert code == 2 and "--headroom" in err and not (tmp_path / "new").exists()


def test_an_unreadable_image_is_named_and_the_others_calibrate(saved, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for path in saved.images.iterdir():
        (images / path.name).write_bytes(path.read_bytes())
    (images / "broken.png").write_bytes(b"not a png")
    code, _, err = fp16_fix(capsys, "--model", saved.source, "--data", images, "--out", tmp_path / "fixed")
    assert code == 1 and "broken.png" in err
    assert load_vae(tmp_path / "fixed").config[GROUPNORM_EPS_KEY]


def test_latent_files_made_by_the_source_decode_with_the_fixed_model(saved, tmp_path, capsys):
    from latent_vae import cli

    images = sorted(map(str, saved.images.iterdir()))
    assert cli.main(["encode", *images, "--out", str(tmp_path / "latents"), "--model", str(saved.source)]) == 0
    latents = sorted(map(str, (tmp_path / "latents").iterdir()))
    assert cli.main(["decode", *latents, "--out", str(tmp_path / "png"), "--model", str(saved.fixed),
                     "--dtype", "fp16"]) == 0
    assert len(list((tmp_path / "png").iterdir())) == len(images)
    # another model's latents are still refused
    assert cli.main(["decode", *latents, "--out", str(tmp_path / "other"), "--model", "f16c16-tiny"]) == 1
    capsys.readouterr()


def test_latent_datasets_and_precompute_in_fp16_with_the_fixed_model(saved, tmp_path):
    from latent_vae import save_vae
    from latent_vae.latents.precompute import precompute_latents
    from latent_vae.latents.readers import load_latents
    from latent_vae.utils.errors import NonFiniteError

    fast = {"resolution": 32, "num_workers": 0, "batch_size": 2, "progress": False}
    precompute_latents(str(saved.source), saved.images, tmp_path / "by-source", dtype="fp32", **fast)
    assert len(load_latents(tmp_path / "by-source", model=str(saved.fixed), sample=False)) == 3  # same function
    summary = precompute_latents(str(saved.fixed), saved.images, tmp_path / "fp16", dtype="fp32",
                                 encode_dtype="fp16", **fast)
    assert summary.complete and summary.rows == 3
    in_fp16 = torch.stack([row["latents"] for row in load_latents(tmp_path / "fp16", sample=False)])
    in_fp32 = torch.stack([row["latents"] for row in load_latents(tmp_path / "by-source", sample=False)])
    assert finite(in_fp16) and relative(in_fp16, in_fp32) < 0.05  # fp16's rounding, not another function
    with pytest.raises(NonFiniteError, match="latent-vae fp16-fix"):
        precompute_latents(str(saved.source), saved.images, tmp_path / "overflows", dtype="fp32",
                           encode_dtype="fp16", **fast)
    # the lineage holds while the model is the one recorded: changed weights end it
    changed = load_vae(saved.fixed)
    with torch.no_grad():
        changed.decoder.conv_out.bias.add_(0.01)
    save_vae(changed, tmp_path / "changed")
    with pytest.raises(ValueError, match="latents were made by model"):
        load_latents(tmp_path / "by-source", model=str(tmp_path / "changed"))


def test_the_codecs_fp16_error_names_the_command_that_fixes_it(saved):
    from latent_vae.utils.errors import NonFiniteError

    with pytest.raises(NonFiniteError, match=f"latent-vae fp16-fix --model {saved.source}"):
        LatentCodec.from_pretrained(saved.source, dtype="fp16").encode(smooth(1, 32, 32))
