"""Latent datasets: precompute -> parquet shards -> load_latents, on the tiny preset at 32-64 px."""

from __future__ import annotations

import argparse
import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import BF16_UNIT, FP32_REORDER, assert_close, max_error
from PIL import Image

from latent_vae import LatentCodec, build_vae, cli, save_vae
from latent_vae.images.reading import centre_crop
from latent_vae.latents.encoding import make_buckets, nearest_bucket
from latent_vae.latents.format import LatentInfo, pack, read_failures, read_summary, unpack
from latent_vae.latents.precompute import precompute_latents
from latent_vae.latents.readers import BucketBatchSampler, collate_latents, load_latents
from latent_vae.latents.verify import verify_latents

RES = 32
FAST = {"num_workers": 0, "batch_size": 2, "progress": False}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A saved tiny model: a folder has a stable fingerprint (a preset name gives fresh random weights)."""
    vae = build_vae("f16c16-tiny", seed=0)
    # A non-trivial normalisation, so that a test would see it missing from load_latents.
    vae.register_to_config(scaling_factor=2.5, shift_factor=0.1)
    return save_vae(vae, tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def codec(model_dir) -> LatentCodec:
    return LatentCodec.from_pretrained(str(model_dir))


def random_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth-ish content (low-res noise upsampled) so that resizing is not a lottery of aliasing.
    small = rng.integers(0, 256, (max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)


def expected_crop(image: Image.Image, target: tuple[int, int]) -> np.ndarray:
    """The pixels precompute should encode: the documented centre crop, done here independently."""
    width, height = image.size
    th, tw = target
    scale = max(th / height, tw / width)
    left, top = (width - tw / scale) / 2, (height - th / scale) / 2
    box = (left, top, left + tw / scale, top + th / scale)
    return np.asarray(image.resize((tw, th), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0))


@pytest.fixture()
def folder(tmp_path) -> Path:
    """Nested images with captions from a .txt file and from metadata.jsonl (with a label column)."""
    root = tmp_path / "images"
    (root / "cats").mkdir(parents=True)
    sizes = {"a.png": (32, 48), "b.jpg": (40, 32), "cats/c.png": (64, 64), "cats/d.webp": (36, 50)}
    for i, (name, (h, w)) in enumerate(sizes.items()):
        random_image(h, w, i).save(root / name, quality=95) if name.endswith(".jpg") else random_image(h, w, i).save(root / name)
    (root / "a.txt").write_text("a caption from a text file\n")
    (root / "cats" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "c.png", "text": "a cat", "label": 3}) + "\n"
        + json.dumps({"file_name": "d.webp", "text": "another cat", "label": 5}) + "\n")
    return root


def shard_files(path: Path) -> list[Path]:
    return sorted((path / "data").glob("*.parquet"))


def rows_by_key(path: Path) -> dict[str, dict]:
    """The raw stored rows, read with pyarrow (no datasets cache involved)."""
    rows = [row for shard in shard_files(path) for row in pq.read_table(shard).to_pylist()]
    return {row["key"]: row for row in rows}


@pytest.mark.numerics
def test_folder_round_trip_matches_codec(model_dir, codec, folder, tmp_path):
    out = tmp_path / "latents"
    summary = precompute_latents(str(model_dir), folder, out, resolution=RES, dtype="fp32", **FAST)
    assert summary.complete and summary.rows == 4 and summary.failures == 0
    assert verify_latents(out).ok

    info = LatentInfo.read(out)
    assert info.fingerprint == codec.fingerprint and info.resolution == RES
    assert info.normalization["scaling_factor"] == 2.5 and info.storage_dtype == "float32"

    dataset = load_latents(out, model=str(model_dir), resolution=RES, sample=False)
    assert len(dataset) == 4
    items = {item["key"]: item for item in dataset}
    assert set(items) == {"a.png", "b.jpg", "cats/c.png", "cats/d.webp"}
    # Captions: .txt beside the image, metadata.jsonl relative to its own folder; other columns pass through.
    assert items["a.png"]["text"] == "a caption from a text file"
    assert items["cats/c.png"]["text"] == "a cat" and items["cats/c.png"]["label"] == 3
    assert items["b.jpg"]["text"] is None and items["b.jpg"]["label"] is None
    assert items["cats/d.webp"]["original_size"] == [36, 50] and items["cats/d.webp"]["target_size"] == [RES, RES]

    for key, item in items.items():
        image = Image.open(folder / key).convert("RGB")
        expected = codec.encode(expected_crop(image, (RES, RES)))[0]  # normalised mode, as load_latents(sample=False)
        assert item["latents"].shape == (16, RES // 16, RES // 16)
        assert_close(item["latents"], expected)

    # Batches for training: latents stacked, captions (some missing: None) as lists.
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_latents)))
    assert batch["latents"].shape == (4, 16, RES // 16, RES // 16) and None in batch["text"]
    # ... and a latent decodes back to an image of the crop's size.
    image = codec.decode(items["a.png"]["latents"][None], output_type="pil")[0]
    assert image.size == (RES, RES)


@pytest.mark.slow
@pytest.mark.numerics
def test_bf16_storage_sampling_and_workers(model_dir, codec, folder, tmp_path):
    out = tmp_path / "latents"
    # Two DataLoader workers: decoding happens in other processes and must give the same rows.
    precompute_latents(str(model_dir), folder, out, resolution=RES, dtype="bf16", num_workers=2, batch_size=3,
                       progress=False)
    raw = rows_by_key(out)
    image = Image.open(folder / "cats/c.png").convert("RGB")
    encoded = codec.encode(expected_crop(image, (RES, RES)), return_dict=True)
    shape = raw["cats/c.png"]["latent_shape"]
    # bf16 keeps 8 significant bits: the stored moments are the encoder's to 2**-8 of each value, plus fp32
    # summation order (another batch) relative to the largest value.
    mean = unpack(raw["cats/c.png"]["mean"], shape, torch.bfloat16)
    std = unpack(raw["cats/c.png"]["std"], shape, torch.bfloat16)
    for stored, encoder in ((mean, encoded.mean[0]), (std, torch.exp(0.5 * encoded.logvar[0]))):
        torch.testing.assert_close(stored, encoder, rtol=BF16_UNIT, atol=FP32_REORDER * encoder.abs().max().item())
    assert len(raw["cats/c.png"]["mean"]) == 2 * math.prod(shape)  # two bytes per value

    dataset = load_latents(out, model=codec)  # sample=True by default
    index = dataset.column("key").index("cats/c.png")
    draws = torch.stack([dataset[index]["latents"] for _ in range(200)])
    assert not torch.equal(draws[0], draws[1])  # a fresh sample on every read
    normalization = codec.normalization
    # The draws scatter around the normalised mean with the normalised std.
    torch.testing.assert_close(draws.mean(0), normalization.normalize(mean[None])[0], atol=0.35 * 2.5 * std.max().item(), rtol=0)
    torch.testing.assert_close(draws.std(0), std * 2.5, atol=0.0, rtol=0.25)


def test_pack_round_trip_exact_for_each_dtype():
    values = torch.randn(2, 4, 3, 5)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        packed = pack(values, dtype)
        assert len(packed) == 2 and len(packed[0]) == 60 * torch.finfo(dtype).bits // 8
        assert torch.equal(unpack(packed[1], (4, 3, 5), dtype), values[1].to(dtype).float())


@pytest.mark.numerics
def test_flip_stores_the_mirrored_images_latents(model_dir, codec, folder, tmp_path):
    out = tmp_path / "latents"
    precompute_latents(str(model_dir), folder, out, resolution=RES, dtype="fp32", flip=True, **FAST)
    raw = rows_by_key(out)
    image = Image.open(folder / "cats/d.webp").convert("RGB")
    crop = expected_crop(image, (RES, RES))
    mirrored = codec.encode(np.ascontiguousarray(crop[:, ::-1]), return_dict=True).mean[0]
    row = raw["cats/d.webp"]
    assert_close(unpack(row["flip_mean"], row["latent_shape"], torch.float32), mirrored)
    assert max_error(unpack(row["mean"], row["latent_shape"], torch.float32), mirrored) > 1e-2

    always = load_latents(out, sample=False, flip_probability=1.0)
    item = next(i for i in always if i["key"] == "cats/d.webp")
    assert item["flipped"] is True
    assert_close(item["latents"], codec.normalization.normalize(mirrored[None])[0])


def test_buckets_have_equal_area_and_sides_divisible_by_16():
    buckets = make_buckets(1024, 16, max_aspect=4.0)
    assert (1024, 1024) in buckets
    for h, w in buckets:
        assert h % 16 == 0 and w % 16 == 0
        assert 0.9 * 1024**2 <= h * w <= 1024**2  # about the same area, never more
        assert max(h / w, w / h) <= 4.0
    assert nearest_bucket(600, 1800, buckets)[1] / nearest_bucket(600, 1800, buckets)[0] == pytest.approx(3.0, rel=0.1)
    assert nearest_bucket(1800, 600, buckets)[0] > nearest_bucket(1800, 600, buckets)[1]  # tall stays tall
    # The crop box is centred and in the resized image's pixels.
    crop = centre_crop(100, 300, (64, 128))
    assert crop.scale == pytest.approx(0.64) and crop.top_left == (0, 32)  # 300 px -> 192, (192 - 128) / 2
    assert crop.box == pytest.approx((50.0, 0.0, 250.0, 100.0))
    for height in range(40, 120, 3):  # the box never leaves the image, whatever the rounding
        for width in range(40, 120, 3):
            left, top, right, bottom = centre_crop(height, width, (32, 32)).box
            assert 0 <= left < right <= width and 0 <= top < bottom <= height


def test_the_cli_square_crop_is_the_pixels_precompute_encodes():
    # One crop: `latent-vae interpolate`/`calibrate` and the demo (centre_square) and precompute cut and resample alike.
    from latent_vae.images.reading import centre_square
    from latent_vae.latents.encoding import prepare_image
    from latent_vae.latents.options import PrecomputeOptions

    rng = np.random.default_rng(3)
    for height, width in [(300, 200), (90, 170), (64, 64)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        square = np.asarray(centre_square(image, 48))
        prepared = prepare_image(image, PrecomputeOptions(resolution=48)).pixels.permute(1, 2, 0).numpy()
        assert square.shape == (48, 48, 3) and (square == prepared).all()


def test_bucketed_precompute_records_sizes_and_batches_by_shape(model_dir, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    sizes = [(64, 64), (64, 130), (130, 64), (70, 140), (66, 66)]  # square, wide, tall
    for i, (h, w) in enumerate(sizes):
        random_image(h, w, i).save(root / f"{i}.png")
    out = tmp_path / "latents"
    precompute_latents(str(model_dir), root, out, resolution=64, buckets=True, **FAST)
    info = LatentInfo.read(out)
    assert info.buckets and all(h % 16 == 0 and w % 16 == 0 for h, w in info.buckets)
    dataset = load_latents(out, sample=False)
    items = {item["key"]: item for item in dataset}
    assert items["0.png"]["target_size"] == [64, 64]
    wide, tall = items["1.png"]["target_size"], items["2.png"]["target_size"]
    assert wide[1] > wide[0] and tall[0] > tall[1] and wide == tall[::-1]
    assert items["1.png"]["latents"].shape == (16, wide[0] // 16, wide[1] // 16)
    assert items["3.png"]["original_size"] == [70, 140]
    # A wide image whose aspect does not match its bucket exactly is cropped off-centre on the long side.
    assert items["3.png"]["crop_coords_top_left"][0] == 0
    sampler = BucketBatchSampler(dataset, batch_size=2, seed=0)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(5)) and len(batches) == len(sampler)
    for batch in torch.utils.data.DataLoader(dataset, batch_sampler=sampler):
        assert batch["latents"].ndim == 4  # default collate stacks: one shape per batch


def test_bad_files_are_listed_and_everything_else_written(model_dir, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(3):
        random_image(40, 40, i).save(root / f"good{i}.png")
    full = (root / "good0.png").read_bytes()
    (root / "truncated.png").write_bytes(full[: len(full) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.md").write_text("not an image")
    (root / "fake.png").write_bytes(b"\x00" * 100)
    random_image(20, 200, 9).save(root / "small.png")  # 20 px tall cannot fill 32 px without upscaling
    out = tmp_path / "latents"
    summary = precompute_latents(str(model_dir), root, out, resolution=RES, **FAST)
    assert summary.rows == 3 and summary.failures == 5 and summary.complete
    assert summary.failure_reasons == {"corrupt": 1, "empty": 1, "unsupported": 2, "too_small": 1}
    reasons = {f["key"]: f["reason"] for f in read_failures(out)}
    assert reasons == {"truncated.png": "corrupt", "empty.jpg": "empty", "notes.md": "unsupported",
                       "fake.png": "unsupported", "small.png": "too_small"}
    lines = (out / "failures.jsonl").read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(line)["message"] for line in lines)
    assert "5 failed" in summary.line() and "1 too_small" in summary.line()
    # With upscaling allowed the small image is kept.
    again = precompute_latents(str(model_dir), root, tmp_path / "up", resolution=RES, max_upscale=2.0, **FAST)
    assert again.rows == 4 and again.failure_reasons.get("too_small") is None


def _labelled_dataset(n: int = 4) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"]),
                                  "id": datasets.Value("string"), "caption": datasets.Value("string")})
    return datasets.Dataset.from_dict(
        {"image": [random_image(40, 48, i) for i in range(n)], "label": [i % 2 for i in range(n)],
         "id": [f"img-{i}" for i in range(n)], "caption": [f"caption {i}" for i in range(n)]}, features=features)


def test_every_kind_of_datasets_source_gives_the_same_rows(model_dir, tmp_path):
    source = _labelled_dataset()
    source.save_to_disk(tmp_path / "saved")
    source.to_parquet(tmp_path / "data.parquet")
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    results = {}
    for name, data in {"object": source, "saved": tmp_path / "saved", "parquet": str(tmp_path / "data.parquet"),
                       "arrow": str(arrow)}.items():
        out = tmp_path / f"out-{name}"
        precompute_latents(str(model_dir), data, out, resolution=RES, key_column="id", **FAST)
        rows = rows_by_key(out)
        results[name] = {k: (r["mean"], r["label"], r["caption"]) for k, r in rows.items()}
        assert set(rows) == {f"img-{i}" for i in range(4)}
    assert all(r == results["object"] for r in results.values())
    # Passthrough columns keep their features: the label is still a ClassLabel.
    dataset = load_latents(tmp_path / "out-object")
    assert isinstance(dataset.features["label"], datasets.ClassLabel)
    assert dataset[0]["caption"] == "caption 0"


def test_other_model_resolution_or_settings_are_refused(model_dir, folder, tmp_path):
    out = tmp_path / "latents"
    precompute_latents(str(model_dir), folder, out, resolution=RES, **FAST)
    other = build_vae("f16c16-tiny", seed=1)
    with pytest.raises(ValueError, match="not by the given model"):
        load_latents(out, model=other)
    assert len(load_latents(out, model=LatentInfo.read(out).fingerprint)) == 4
    with pytest.raises(ValueError, match="not by the given model 0123456789abcdef"):
        load_latents(out, model="0123456789abcdef")
    with pytest.raises(ValueError, match="resolution 32, not 64"):
        load_latents(out, resolution=64)
    # Adding to a dataset with other settings would mix two kinds of rows.
    with pytest.raises(ValueError, match="made differently.*flip"):
        precompute_latents(str(model_dir), folder, out, resolution=RES, flip=True, **FAST)
    with pytest.raises(ValueError, match="made differently.*fingerprint"):
        precompute_latents(other, folder, out, resolution=RES, **FAST)
    # A folder that changed: its virtual shards are positions in the sorted file list, so it is not continued.
    random_image(40, 40, 3).save(folder / "added.png")
    with pytest.raises(ValueError, match="made differently.*input_digest"):
        precompute_latents(str(model_dir), folder, out, resolution=RES, **FAST)
    with pytest.raises(ValueError, match="no mirrored latents"):
        load_latents(out, flip_probability=0.5)
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "thesis.tex").write_text("keep me")
    with pytest.raises(ValueError, match="not a latent dataset"):
        precompute_latents(str(model_dir), folder, tmp_path / "occupied", resolution=RES, **FAST)


@pytest.mark.slow
def test_interrupted_dataset_is_refused_then_completed_exactly_once(model_dir, folder, tmp_path):
    out = tmp_path / "latents"
    random_image(8, 8, 0).save(folder / "tiny.png")  # a failure, which must not be listed twice either
    one_per_shard = {**FAST, "batch_size": 1, "shard_size": 1}
    precompute_latents(str(model_dir), folder, out, resolution=RES, **one_per_shard)
    # One output shard per input shard, the failed input's too (no rows, its failure in the manifest).
    assert len(shard_files(out)) == 5 and len(list((out / "manifests").glob("*.json"))) == 5
    # What a kill leaves behind: a shard never committed (no manifest: its half-written file stays in staging/,
    # named after a process that is gone) and a commit cut short between its manifest and its rename.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    lost = shard_files(out)[1]
    (out / "manifests" / f"{lost.stem}.json").unlink()
    lost.rename(out / "staging" / f".{lost.name}.{socket.gethostname()}.{dead.stdout.strip()}.0badc0de.tmp")
    cut = shard_files(out)[2]
    manifest = json.loads((out / "manifests" / f"{cut.stem}.json").read_text())
    cut.rename(out / "staging" / manifest["staged_file"])
    with pytest.raises(ValueError, match="1 of 5 shards are not done"):
        load_latents(out)
    assert len(load_latents(out, allow_incomplete=True)) == 3  # the cut-short commit is finished on reading
    report = verify_latents(out)
    assert not report.ok and "1 shard(s) not done" in report.problems[0]

    summary = precompute_latents(str(model_dir), folder, out, resolution=RES, **one_per_shard)
    assert summary.encoded_this_run == 1 and summary.shards_done_before == 4 and summary.complete
    assert sorted(rows_by_key(out)) == ["a.png", "b.jpg", "cats/c.png", "cats/d.webp"]
    assert [f["key"] for f in read_failures(out)] == ["tiny.png"]
    assert not list((out / "staging").iterdir()) and read_summary(out)["rows"] == 4 and verify_latents(out).ok
    # A data file changed after its commit is caught by its checksum.
    table = pq.read_table(shard_files(out)[0])
    pq.write_table(table, shard_files(out)[0], compression="none")
    assert any("sha256" in p for p in verify_latents(out).problems)


def test_cli_runs_verifies_and_bad_input_is_one_line(model_dir, folder, tmp_path, capsys):
    out = tmp_path / "latents"
    base = ["precompute", "--model", str(model_dir), "--data", str(folder), "--resolution", "32", "--num-workers", "0",
            "--no-progress"]
    assert cli.main([*base, "--out", str(out), "--dtype", "fp16"]) == 0
    assert "4 latents" in capsys.readouterr().out and LatentInfo.read(out).storage_dtype == "float16"
    assert cli.main(["precompute", "--verify", str(out)]) == 0
    assert "OK" in capsys.readouterr().out

    random_image(8, 8, 0).save(folder / "tiny.png")
    assert cli.main([*base, "--out", str(tmp_path / "with_failure")]) == 1  # some inputs failed: each named
    err = capsys.readouterr().err
    assert "tiny.png: 8x8 is too small" in err and "[too_small]" in err

    for bad, message in [(["--data", str(tmp_path / "nowhere")], "no such file or folder"),
                         (["--model", "no-such-model"], "neither a preset"),
                         (["--resolution", "40"], "not a multiple of the model's downsampling factor 16"),
                         (["--verify", str(tmp_path / "nowhere")], "not a latent dataset")]:
        argv = [*base, "--out", str(tmp_path / "x"), *bad]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and "Traceback" not in err
    assert cli.main(["precompute", "--data", str(folder)]) == 2
    assert "--model, --out required" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown precompute option.*'resoluton'"):
        precompute_latents(str(model_dir), folder, tmp_path / "y", resoluton=32)
    with pytest.raises(ValueError, match="no image column"):
        precompute_latents(str(model_dir), datasets.Dataset.from_dict({"x": [1]}), tmp_path / "z", **FAST)


def test_precompute_flags_are_derived_from_the_options_dataclass():
    from latent_vae.cli.precompute import add_precompute_arguments
    from latent_vae.latents.options import PrecomputeOptions

    parser = argparse.ArgumentParser()
    add_precompute_arguments(parser)
    args = parser.parse_args(["--resolution", "64", "--flip", "--no-progress", "--dtype", "fp32", "--tile-size", "128",
                              "--claim-timeout", "9.5", "--no-channels-last"])
    options = PrecomputeOptions(**{k: v for k, v in vars(args).items() if k in PrecomputeOptions.__dataclass_fields__})
    assert (options.resolution, options.flip, options.progress, options.dtype) == (64, True, False, "fp32")
    assert (options.tile_size, options.claim_timeout, options.device, options.channels_last) == (128, 9.5, None, False)
    defaults = parser.parse_args([])
    assert all(getattr(defaults, name) == spec.default for name, spec in PrecomputeOptions.__dataclass_fields__.items())
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "fp64"])  # a Literal field's choices
