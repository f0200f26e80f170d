"""Training pieces on their own: config merging, data, losses, LPIPS, checkpoints (CPU, tiny, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from latent_vae import build_vae
from training.config import CONFIG_DIR, TrainConfig, load_config, merge, parse_args
from training.data import (
    CropDataset,
    ImageSource,
    ShardedSampler,
    hold_out,
    ldm_crop,
    train_loader,
    validation_crops,
)
from training.losses import (
    AutoencoderWithLoss,
    LossWeights,
    PatchDiscriminator,
    adaptive_weight,
    frequency_loss,
    hinge_d_loss,
    kl_per_pixel,
    ssim_loss,
)
from training.lpips import LPIPS, LPIPSWeightsMissing


def write_images(folder: Path, count: int = 5, corrupt: int = 1) -> Path:
    rng = np.random.default_rng(0)
    (folder / "nested").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        array = (rng.random((40 + 4 * i, 48, 3)) * 255).astype(np.uint8)
        Image.fromarray(array).save(folder / ("nested" if i % 2 else ".") / f"img{i}.png")
    for i in range(corrupt):
        (folder / f"broken{i}.png").write_bytes(b"\x89PNG not really")
    return folder


# -- config -----------------------------------------------------------------------------------------


def test_every_shipped_config_loads_onto_the_defaults():
    for path in sorted(CONFIG_DIR.glob("*.json")):
        config = load_config(path, {"data": "x"})
        config.validate()
    assert load_config("tiny_test").model == "f16c16-tiny"  # a bare name is looked up in training/configs/


def test_command_line_overrides_file_and_coerces_types(tmp_path):
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps({"batch_size": 3, "use_ema": True, "learning_rate": 0.1}))
    config = parse_args(["--config", str(config_file), "--batch_size", "5", "--use_ema", "false",
                         "--mixed_precision", "bf16", "--data", "d"])
    assert (config.batch_size, config.use_ema, config.learning_rate, config.mixed_precision) == (5, False, 0.1, "bf16")


def test_unknown_or_mistyped_options_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="learning_rat"):
        merge(TrainConfig(), {"learning_rat": 1.0})
    bad_file = tmp_path / "bad.json"
    bad_file.write_text(json.dumps({"batchsize": 2}))
    with pytest.raises(ValueError, match="batchsize"):
        load_config(bad_file)
    with pytest.raises(ValueError, match="batch_size must be int"):
        merge(TrainConfig(), {"batch_size": "many"})
    with pytest.raises(SystemExit):  # argparse: "unrecognized arguments: --bogus"
        parse_args(["--bogus", "1"])
    with pytest.raises(SystemExit):  # no prefix matching: --batch is not --batch_size
        parse_args(["--batch", "1"])
    for bad, message in (({"crop_policy": "centre"}, "crop_policy must be ldm or native"),
                         ({"crop_min": 0.0}, "crop_min must be in"), ({"validation_holdout": -1}, "validation_holdout")):
        with pytest.raises(ValueError, match=message):
            merge(TrainConfig(data="x"), bad).validate()


# -- data -------------------------------------------------------------------------------------------


def test_folder_is_read_recursively_and_corrupt_images_are_skipped_and_counted(tmp_path):
    source = ImageSource(write_images(tmp_path / "imgs", count=5, corrupt=1))
    assert len(source) == 6
    dataset = CropDataset(source, 32, seed=0)
    broken = next(i for i in range(len(source)) if "broken" in source.describe(i))
    crop, skipped = dataset[(0, broken)]
    assert crop.shape == (3, 32, 32) and skipped == 1
    assert -1 <= crop.min() and crop.max() <= 1
    batches = train_loader(source, resolution=32, batch_size=6, seed=0, rank=0, world_size=1, num_workers=0)
    pixels, skipped = next(iter(batches))
    assert pixels.shape == (6, 3, 32, 32) and skipped == 1


def test_a_crop_is_a_function_of_its_position_only(tmp_path):
    source = ImageSource(write_images(tmp_path / "imgs", corrupt=0))
    a, b = CropDataset(source, 24, seed=3, min_scale=0.5), CropDataset(source, 24, seed=3, min_scale=0.5)
    assert torch.equal(a[(2, 1)][0], b[(2, 1)][0])
    assert not torch.equal(a[(2, 1)][0], a[(3, 1)][0])  # another epoch, another crop


def test_ldm_crops_take_half_to_all_of_the_short_side_area_resized(tmp_path):
    # A horizontal ramp (value = x / 2): the value span across a crop tells the side of the square it came from.
    ramp = np.tile((np.arange(512) / 2).astype(np.uint8)[None, :, None], (256, 1, 3))
    image = Image.fromarray(ramp)
    sides = []
    for seed in range(40):
        crop = ldm_crop(image, 32, np.random.default_rng(seed), crop_min=0.5, flip=False)
        values = (crop[0, 0] + 1) * 127.5  # first row, in 0..255
        sides.append(float(values[-1] - values[0]) * 2 * 32 / 31)  # columns 0 and 31 are box means 1/32 apart
    assert 0.5 * 256 - 4 <= min(sides) < 0.6 * 256 and 0.9 * 256 < max(sides) <= 256 + 4  # fractions of 256, not 32
    # Area resampling: a 1-pixel checkerboard halved is flat grey, not a sampled pattern.
    board = Image.fromarray(((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)).convert("RGB")
    assert ldm_crop(board, 32, np.random.default_rng(0), crop_min=1.0, flip=False).abs().max() < 0.01
    # An image smaller than the crop is enlarged to it.
    assert ldm_crop(Image.fromarray(ramp[:20, :30]), 32, np.random.default_rng(0), 0.5, True).shape == (3, 32, 32)


def test_ldm_crops_are_a_function_of_their_position_only(tmp_path):
    source = ImageSource(write_images(tmp_path / "imgs", corrupt=0))
    a, b = (CropDataset(source, 24, seed=3, crop_policy="ldm", crop_min=0.5) for _ in range(2))
    assert torch.equal(a[(2, 1)][0], b[(2, 1)][0])
    assert not torch.equal(a[(2, 1)][0], a[(3, 1)][0])
    native = CropDataset(source, 24, seed=3)  # the native policy (pre-resized data) stays available
    assert not torch.equal(a[(2, 1)][0], native[(2, 1)][0])
    with pytest.raises(ValueError, match="crop_policy"):
        CropDataset(source, 24, seed=3, crop_policy="centre")


def test_held_out_validation_images_are_a_fixed_choice_never_in_the_training_set(tmp_path):
    source = ImageSource(write_images(tmp_path / "imgs", count=10, corrupt=0))
    train, held = hold_out(source, 3)
    train_names = {train.describe(i) for i in range(len(train))}
    held_names = {held.describe(i) for i in range(len(held))}
    assert len(held_names) == 3 and not train_names & held_names
    assert train_names | held_names == {source.describe(i) for i in range(len(source))}
    again = hold_out(ImageSource(tmp_path / "imgs"), 3)[1]
    assert [again.describe(i) for i in range(3)] == [held.describe(i) for i in range(3)]  # the same every run
    assert np.asarray(held.load(0)).shape[2] == 3  # loads through the source
    # every training sample of two epochs comes from the training images
    sampler = ShardedSampler(len(train), rank=0, world_size=1, seed=5)
    stream = iter(sampler)
    assert {train.describe(next(stream)[1]) for _ in range(2 * len(train))} == train_names
    with pytest.raises(ValueError, match="validation_holdout 10 leaves no training image"):
        hold_out(source, 10)


def test_ranks_get_disjoint_shards_and_a_resumed_stream_continues_exactly():
    take = lambda it, n: [next(it) for _ in range(n)]
    epoch0 = [take(iter(ShardedSampler(10, rank=r, world_size=2, seed=1)), 5) for r in range(2)]
    indices = [i for shard in epoch0 for _, i in shard]
    assert sorted(indices) == list(range(10))  # each image once per epoch, split between ranks
    full = take(iter(ShardedSampler(10, rank=1, world_size=2, seed=1)), 13)
    resumed = take(iter(ShardedSampler(10, rank=1, world_size=2, seed=1, start=7)), 6)
    assert resumed == full[7:]


def test_datasets_on_disk_load_as_folder_parquet_and_arrow(tmp_path):
    import datasets

    images = [Image.fromarray((np.ones((36, 40, 3)) * v).astype(np.uint8)) for v in (10, 120, 240)]
    ds = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "data.parquet"))
    arrow = min((tmp_path / "saved").glob("*.arrow"))
    for path in (tmp_path / "saved", tmp_path / "data.parquet", arrow):
        source = ImageSource(path)
        assert len(source) == 3
        crops = validation_crops(source, 3, 32)
        assert crops.shape == (3, 3, 32, 32)
        assert crops[1].add(1).mul(127.5).round().eq(120).all()
    with pytest.raises(ValueError, match="pixels"):
        ImageSource(tmp_path / "saved", image_column="pixels")


def test_a_saved_datasetdict_trains_on_the_chosen_split(tmp_path):
    """The same opener as precompute: "train" by default, --split picks another, an ambiguous dict is refused."""
    import datasets

    def images(values):
        rows = [Image.fromarray(np.full((32, 32, 3), v, np.uint8)) for v in values]
        return datasets.Dataset.from_dict({"image": rows}, features=datasets.Features({"image": datasets.Image()}))

    datasets.DatasetDict({"train": images([10, 20]), "test": images([200])}).save_to_disk(str(tmp_path / "dict"))
    assert len(ImageSource(tmp_path / "dict")) == 2
    test = ImageSource(tmp_path / "dict", split="test")
    assert len(test) == 1 and np.asarray(test.load(0))[0, 0, 0] == 200
    with pytest.raises(ValueError, match="no split 'val'"):
        ImageSource(tmp_path / "dict", split="val")
    datasets.DatasetDict({"a": images([1]), "b": images([2])}).save_to_disk(str(tmp_path / "ambiguous"))
    with pytest.raises(ValueError, match="choose one with --split"):
        ImageSource(tmp_path / "ambiguous")


# -- losses -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory) -> Path:
    """Random LPIPS weights in the real file layout (the real ones cannot be downloaded in tests)."""
    torch.manual_seed(0)
    model = LPIPS()
    for lin in model.lins:
        lin.weight.data.abs_()  # LPIPS heads are non-negative
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg16.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_lpips_without_weights_says_how_to_provide_them_or_turn_it_off(tmp_path):
    with pytest.raises(LPIPSWeightsMissing) as error:
        LPIPS.from_file(tmp_path / "none.safetensors")
    message = str(error.value)
    assert "--lpips_weights" in message and "--lpips_weight 0" in message and "\n" not in message


def test_lpips_gradient_reaches_the_vae(lpips_file):
    lpips = LPIPS.from_file(lpips_file)
    assert not any(p.requires_grad for p in lpips.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert lpips(x, x).abs().max() < 1e-6
    vae = build_vae("f16c16-tiny", seed=0)
    # Only the perceptual term: pixel, KL and sharpness weights off.
    model = AutoencoderWithLoss(vae, LossWeights(lpips=1.0, kl=0.0), lpips)
    out = model(x)
    (out["nll"] - out["pixel_loss"]).backward()  # the LPIPS part alone
    for name in ("encoder.conv_in.weight", "decoder.conv_out.weight"):
        grad = dict(vae.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_kl_is_zero_for_the_prior_and_positive_otherwise():
    zeros = torch.zeros(2, 4, 2, 2)
    assert kl_per_pixel(zeros, zeros, 48) == 0
    assert kl_per_pixel(zeros + 1, zeros, 48) == pytest.approx(0.5 * 16 / 48)


def test_sharpness_losses_are_zero_for_equal_images_and_punish_blur():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    for loss in (frequency_loss, ssim_loss):
        assert loss(x, x) < 1e-5
        assert loss(x, blurred) > 0.05


def test_hinge_loss_and_adaptive_weight():
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0  # confident and right: no loss
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)) == 1
    w = torch.randn(8, requires_grad=True)
    nll, g = (3 * w).sum(), (w * 0.5).sum()
    # LDM's units: the ratio of the nll summed over 10 pixel values (10x ours), its 1e-4, then / 10 for our mean loss.
    expected = (10 * 3 * 8**0.5) / (0.5 * 8**0.5 + 1e-4) / 10
    assert adaptive_weight(nll, g, w, pixel_values=10).item() == pytest.approx(expected, rel=1e-5)
    assert adaptive_weight(nll, g * 1e-9, w, pixel_values=10, max_weight=100.0).item() == pytest.approx(10.0)  # clamped
    # fp16's loss scale changes nothing (gradients are unscaled before the norms and the 1e-4) ...
    small = (w * 1e-5).sum()  # a gradient norm near the 1e-4, where scaling before the norm would show
    assert adaptive_weight(nll, small, w, pixel_values=10, grad_scale=2.0**16).item() == pytest.approx(
        adaptive_weight(nll, small, w, pixel_values=10).item(), rel=1e-5)
    # ... and an overflowed gradient is NaN (an overflow for the caller), not the clamp or 0
    for a, b in ((nll * float("inf"), g), (nll, g * float("inf"))):
        assert adaptive_weight(a, b, w, pixel_values=10).isnan()
    logits = PatchDiscriminator(layers=2, channels=8)(torch.zeros(2, 3, 32, 32))
    assert logits.shape[0] == 2 and logits.shape[1] == 1 and logits.ndim == 4
