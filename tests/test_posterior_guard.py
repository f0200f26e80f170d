"""A posterior that is mostly noise is measured and named wherever latents are stored, read or sampled."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from helpers import FP32_OP, TINY, smooth_image
from PIL import Image

from latent_vae import LatentCodec, build_vae, cli, save_vae
from latent_vae.codec.posterior import NOISE_LIMIT, PosteriorStats
from latent_vae.latents.format import LatentInfo
from latent_vae.latents.precompute import precompute_latents
from latent_vae.latents.readers import load_latents
from latent_vae.latents.verify import verify_latents
from latent_vae.utils.errors import PosteriorNoiseWarning

FAST = {"num_workers": 0, "batch_size": 2, "progress": False, "resolution": 32, "shard_size": 3}


def with_logvar(bias: float, name: str, root: Path) -> Path:
    """The tiny model with its log-variance output moved to `bias` (weights of those channels zeroed): a posterior
    std of exp(bias / 2) everywhere, sound for a very negative bias and mostly noise for a large one."""
    vae = build_vae(TINY, seed=0)
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[channels:] = 0
        vae.quant_conv.bias[channels:] = bias
    return save_vae(vae, root / name)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"sound": with_logvar(-20.0, "sound", root), "noisy": with_logvar(16.0, "noisy", root)}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i in range(6):
        Image.fromarray(smooth_image(40, 48, seed=i)).save(folder / f"p{i}.png")
    return folder


def posterior_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, PosteriorNoiseWarning)]


# -- the measure --------------------------------------------------------------------------------------------------


def test_the_noise_ratio_is_the_posterior_spread_over_the_spread_of_the_means():
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(4, 3, 5, 5, generator=generator) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    deterministic = PosteriorStats()
    deterministic.update(mean, torch.zeros_like(mean))
    assert deterministic.noise_ratio() == 0.0
    as_wide = PosteriorStats()
    std = torch.full_like(mean, 1.0) * mean.std(dim=(0, 2, 3), unbiased=False).view(1, 3, 1, 1)
    as_wide.update(mean, std)  # each channel's posterior std equals the spread of its means
    assert as_wide.noise_ratio() == pytest.approx(1.0, rel=FP32_OP)
    ratios = as_wide.record()["channel_noise_ratios"]
    assert ratios == pytest.approx([1.0, 1.0, 1.0], rel=FP32_OP)


def test_stats_gathered_in_parts_and_merged_equal_stats_of_the_whole():
    generator = torch.Generator().manual_seed(1)
    mean, std = torch.randn(6, 4, 3, 3, generator=generator), torch.rand(6, 4, 3, 3, generator=generator)
    whole, first, second = PosteriorStats(), PosteriorStats(), PosteriorStats()
    whole.update(mean, std)
    first.update(mean[:2], std[:2])
    for i in range(2, 6):
        second.update(mean[i], std[i])  # one image at a time, as a precompute shard gathers them
    merged = PosteriorStats.from_record(json.loads(json.dumps(first.record()))).merge(second)
    assert merged.values == whole.values
    assert merged.noise_ratio() == pytest.approx(whole.noise_ratio(), rel=FP32_OP)


def test_one_latent_value_per_channel_has_no_spread_to_measure():
    stats = PosteriorStats()
    stats.update(torch.ones(1, 4, 1, 1), torch.ones(1, 4, 1, 1))
    assert stats.noise_ratio() is None


# -- where latents are stored and read ------------------------------------------------------------------------------


def test_precompute_of_a_noisy_posterior_names_the_model_records_the_figure_and_sampling_warns(models, photos, tmp_path):
    out = tmp_path / "noisy"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = precompute_latents(str(models["noisy"]), photos, out, **FAST)
    [line] = posterior_warnings(caught)
    assert str(models["noisy"]) in line and f"{summary.posterior_noise:.3g}" in line
    assert summary.posterior_noise > NOISE_LIMIT
    recorded = LatentInfo.read(out).posterior
    assert recorded["values"] == 6 * 2 * 2 and recorded["noise_ratio"] == pytest.approx(summary.posterior_noise)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = load_latents(out)  # sample=True by default
        items = [dataset[i] for i in range(len(dataset))]
    [line] = posterior_warnings(caught)  # once for the dataset, not once per item
    assert "sample=False" in line and len(items) == 6
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_latents(out, sample=False)
        report = verify_latents(out, posterior_warning=False)
    assert not posterior_warnings(caught) and report.ok
    assert report.posterior_noise == pytest.approx(summary.posterior_noise)


def test_a_sound_posterior_is_stored_and_sampled_without_a_word(models, photos, tmp_path):
    out = tmp_path / "sound"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = precompute_latents(str(models["sound"]), photos, out, **FAST)
        dataset = load_latents(out)
        sample, mean = dataset[0]["latents"], load_latents(out, sample=False)[0]["latents"]
    assert not posterior_warnings(caught)
    assert summary.posterior_noise < 1e-3
    assert (sample - mean).norm() < 1e-3 * mean.norm()


def test_the_command_line_says_it_in_one_line_when_storing_and_verifying(models, photos, tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli.main(["precompute", "--model", str(models["noisy"]), "--data", str(photos), "--out", str(out),
                     "--resolution", "32", "--num-workers", "0", "--device", "cpu"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "posterior" in line]
    assert code == 0 and len(lines) == 1 and lines[0].startswith("latent-vae: warning: ")
    assert str(models["noisy"]) in lines[0]
    assert cli.main(["precompute", "--verify", str(out)]) == 0
    captured = capsys.readouterr()
    assert "posterior noise" in captured.out
    assert [line for line in captured.err.splitlines() if line.startswith("latent-vae: warning: ")]


def test_sampling_a_noisy_posterior_with_the_codec_warns_once_and_the_mode_never(models):
    image = smooth_image(64, 64)
    noisy = LatentCodec.from_pretrained(str(models["noisy"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        noisy.encode(image)
        assert not posterior_warnings(caught)
        noisy.encode(image, sample=True)
        noisy.encode(image, sample=True)
    [line] = posterior_warnings(caught)
    assert "sample=True" in line
    sound = LatentCodec.from_pretrained(str(models["sound"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample = sound.encode(image, sample=True, generator=torch.Generator().manual_seed(0))
    assert not posterior_warnings(caught)
    assert not math.isnan(sample.norm().item())
