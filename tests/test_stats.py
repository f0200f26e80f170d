import pytest
import torch
from diffusers import AutoencoderKL
from helpers import FP32_OP, FP32_REORDER, assert_close, smooth_image

from latent_vae import LatentCodec, build_vae, calibrate, load_vae, save_vae
from latent_vae.models.normalization import RunningLatentStats


def images(n=6):
    return [smooth_image(48, 48, seed=i) for i in range(n)]


def test_running_stats_equal_the_statistics_of_all_latents_at_once():
    latents = torch.randn(10, 4, 3, 5) * torch.tensor([1.0, 2.0, 0.5, 3.0]).view(1, 4, 1, 1) + 0.7
    stats = RunningLatentStats()
    for chunk in latents.split(3):
        stats.update(chunk)
    per_channel = stats.normalization(per_channel=True)
    flat = latents.transpose(0, 1).reshape(4, -1).double()
    assert_close(per_channel.latents_mean, flat.mean(1), FP32_OP)
    assert_close(per_channel.latents_std, flat.std(1, unbiased=False), FP32_OP)
    glob = stats.normalization(per_channel=False)
    assert glob.shift_factor == pytest.approx(latents.double().mean().item(), rel=FP32_OP)
    assert glob.scaling_factor == pytest.approx(1 / latents.double().std(unbiased=False).item(), rel=FP32_OP)


@pytest.mark.numerics
@pytest.mark.parametrize("per_channel", [False, True])
def test_calibration_gives_unit_variance_on_the_data_it_saw(per_channel, tmp_path):
    codec = LatentCodec(build_vae("f16c16-tiny", seed=0), max_batch_size=4)
    data = images()
    before = codec.encode(data)
    assert abs(before.std().item() - 1) > 0.05  # otherwise this test proves nothing
    calibrate(codec, data, per_channel=per_channel)
    after = codec.encode(data)
    # Calibrated latents have unit standard deviation, so these tolerances are relative to it: fp32 summation
    # order only, since calibration measured these very latents.
    if per_channel:
        channels = after.transpose(0, 1).reshape(16, -1)
        assert channels.mean(1).abs().max().item() <= FP32_REORDER
        assert (channels.std(1, unbiased=False) - 1).abs().max().item() <= FP32_REORDER
    else:
        assert abs(after.mean().item()) <= FP32_REORDER
        assert abs(after.std(unbiased=False).item() - 1) <= FP32_REORDER
    # written into the config: saved with the model and read by diffusers
    save_vae(codec.vae, tmp_path / "m")
    config = AutoencoderKL.from_pretrained(tmp_path / "m").config
    if per_channel:
        assert config.latents_std is not None and len(config.latents_std) == 16
    else:
        assert config.scaling_factor == pytest.approx(1 / before.std(unbiased=False).item(), rel=1e-3)
    reloaded = LatentCodec(load_vae(tmp_path / "m"))
    assert_close(reloaded.encode(data), after)


def test_calibrating_nothing_is_an_error():
    codec = LatentCodec(build_vae("f16c16-tiny", seed=0))
    with pytest.raises(ValueError, match="at least one image"):
        calibrate(codec, [])
