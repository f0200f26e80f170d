"""Hostile input: what a careless or malicious user can hand the command line, the Python API and training.

Every case asserts the outcome a careful user expects: the exit status (1: some inputs failed, every good
output still written; 2: nothing could run; 3: a bug), one line naming the input and the reason, no
traceback, and the good outputs written and correct.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from helpers import TINY, assert_close, smooth_image
from PIL import Image
from safetensors.torch import load_file, save_file

import latent_vae.latents.single_file as latent_files_module
from latent_vae import LatentCodec, build_vae, save_vae
from latent_vae.cli import main
from latent_vae.images.reading import ImageError, load_image
from latent_vae.latents.single_file import FORMAT, load_latent_file
from latent_vae.models.loading import save_single_file
from latent_vae.utils.errors import EXIT_BAD_INPUT, EXIT_INTERNAL_ERROR, EXIT_SOME_FAILED

MODEL = ["--model", TINY, "--device", "cpu", "--tile-size", "0"]
REPO = Path(__file__).resolve().parents[1]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def failure_lines(err: str) -> list[str]:
    """`failed: ...` (one input) and `latent-vae[ COMMAND]: error: ...` (nothing could run) lines."""
    return [line for line in err.splitlines() if line.startswith(("failed:", "latent-vae: error:"))
            or line.startswith("latent-vae ") and ": error: " in line]


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A few hundred bytes that declare width x height pixels: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture
def codec() -> LatentCodec:
    return LatentCodec.from_pretrained(TINY, seed=0, device="cpu")


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(smooth_image(32, 48, seed=i)).save(folder / f"good{i}.png")
    return folder


# -- images: one reader, every failure one line -------------------------------------------------------


def test_a_decompression_bomb_fails_alone_and_the_good_images_around_it_are_encoded(tmp_path, capsys, photos, codec):
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    assert (tmp_path / "bomb.png").stat().st_size < 500
    code, _, err = run(capsys, "encode", photos / "good0.png", tmp_path / "bomb.png", photos / "good1.png",
                       "--out", tmp_path / "out", *MODEL)
    assert code == EXIT_SOME_FAILED
    [line] = failure_lines(err)
    assert str(tmp_path / "bomb.png") in line and "bomb" in line.split("bomb.png", 1)[1]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good0.safetensors", "good1.safetensors"]
    for name in ("good0", "good1"):  # written and correct
        expected = codec.encode(load_image(photos / f"{name}.png"))[0]
        assert_close(load_latent_file(tmp_path / "out" / f"{name}.safetensors").latents, expected)


def test_the_pixel_limit_is_configurable_and_checked_before_decoding(tmp_path, capsys, photos):
    # 32x48 = 1536 pixels: over a limit of 1000, under no limit at all.
    code, _, err = run(capsys, "encode", photos / "good0.png", "--max-pixels", 1000, "--out", tmp_path / "a", *MODEL)
    assert code == EXIT_SOME_FAILED and "over the limit" in err and "--max-pixels" in err
    code, _, _ = run(capsys, "encode", photos / "good0.png", "--max-pixels", 0, "--out", tmp_path / "b", *MODEL)
    assert code == 0 and (tmp_path / "b" / "good0.safetensors").is_file()
    code, _, err = run(capsys, "encode", photos / "good0.png", "--max-pixels", -1, "--out", tmp_path / "c", *MODEL)
    assert code == EXIT_BAD_INPUT and len(failure_lines(err)) == 1


@pytest.mark.parametrize("command", ["reconstruct", "interpolate", "calibrate"])
def test_a_bomb_is_one_line_in_every_command_that_reads_images(tmp_path, capsys, photos, command):
    (photos / "bomb.png").write_bytes(bomb_png())
    if command == "reconstruct":
        code, _, err = run(capsys, "reconstruct", photos / "bomb.png", photos / "good0.png", "--out", tmp_path / "r", *MODEL)
        assert code == EXIT_SOME_FAILED and [p.name for p in (tmp_path / "r").iterdir()] == ["good0.png"]
    elif command == "interpolate":  # two inputs, one output: nothing can run
        code, _, err = run(capsys, "interpolate", photos / "bomb.png", photos / "good0.png", "--steps", 3,
                           "--resolution", 32, "--out", tmp_path / "strip.png", *MODEL)
        assert code == EXIT_BAD_INPUT and not (tmp_path / "strip.png").exists()
    else:
        save_vae(build_vae(TINY, seed=0), tmp_path / "model")
        code, out, err = run(capsys, "calibrate", "--model", tmp_path / "model", "--data", photos,
                             "--resolution", 32, "--device", "cpu", "--tile-size", 0)
        assert code == EXIT_SOME_FAILED and json.loads(out.splitlines()[0])["images"] == 3
        assert json.loads((tmp_path / "model" / "config.json").read_text())["scaling_factor"] != 1.0
    [line] = failure_lines(err)
    assert str(photos / "bomb.png") in line


def test_exif_orientation_is_applied_by_encode(tmp_path, capsys):
    stored = Image.fromarray(smooth_image(20, 40))  # stored 40 wide, 20 high, tagged "rotate 90"
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "camera.jpg", exif=exif.tobytes(), quality=95)
    code, _, _ = run(capsys, "encode", tmp_path / "camera.jpg", "--out", tmp_path / "out", *MODEL)
    assert code == 0
    assert load_latent_file(tmp_path / "out" / "camera.safetensors").image_size == (40, 20)  # upright: 40 high


def test_inputs_that_already_worked_still_do_and_broken_ones_fail_alone(tmp_path, capsys, photos):
    good = {
        "gray16.png": Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)),
        "cmyk.jpg": Image.new("CMYK", (32, 32), (10, 200, 30, 0)),
        "anim.gif": Image.new("P", (32, 32)),
    }
    for name, image in good.items():
        if name == "anim.gif":
            image.save(tmp_path / name, save_all=True, append_images=[Image.new("P", (32, 32), 3)])
        else:
            image.save(tmp_path / name)
    full = (photos / "good0.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(full[: len(full) // 3])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not an image")
    os.symlink(tmp_path / "loop.png", tmp_path / "loop.png")
    bad = ["truncated.png", "empty.png", "text.png", "loop.png"]
    code, _, err = run(capsys, "encode", *(tmp_path / n for n in [*good, *bad]), "--out", tmp_path / "out", *MODEL)
    assert code == EXIT_SOME_FAILED
    lines = failure_lines(err)
    assert len(lines) == len(bad)
    for name, line in zip(bad, lines):
        assert str(tmp_path / name) in line
    assert "symbolic links" in lines[-1] and "no such file" not in lines[-1]
    assert sorted(p.stem for p in (tmp_path / "out").iterdir()) == sorted(Path(n).stem for n in good)


def test_python_inputs_on_the_wrong_scale_are_refused_and_bytes_are_an_image(codec, photos):
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    with pytest.raises(ImageError, match=r"\[-1, 1\].*127.5"):
        codec.encode((pixels + 1) * 127.5)  # 0..255
    with pytest.raises(ImageError, match="NaN"):
        codec.encode(torch.full((1, 3, 32, 32), float("nan")))
    with pytest.raises(ImageError, match="float .*mode 'F'"):
        codec.encode(Image.fromarray(np.full((32, 32), 0.5, dtype=np.float32)))  # [0, 1] would have become black
    data = (photos / "good0.png").read_bytes()
    assert_close(codec.encode(data), codec.encode(load_image(photos / "good0.png")))
    with pytest.raises(ImageError, match="^image bytes: not an image"):
        codec.encode(b"not a png")


# -- decode: each latent file on its own ---------------------------------------------------------------


def test_decode_writes_every_good_latent_and_names_each_bad_one(tmp_path, capsys, photos, codec):
    run(capsys, "encode", photos / "good0.png", photos / "good1.png", "--out", tmp_path / "lat", *MODEL)
    good = load_latent_file(tmp_path / "lat" / "good0.safetensors")

    def write(name: str, tensor: torch.Tensor | None = None, **metadata) -> Path:
        fields = {"format": FORMAT, "fingerprint": good.fingerprint, "image_size": json.dumps(list(good.image_size)),
                  "normalization": "{}", **metadata}
        path = tmp_path / "lat" / f"{name}.safetensors"
        save_file({"latents": good.latents.clone() if tensor is None else tensor},
                  str(path), metadata={k: v for k, v in fields.items() if v is not None})
        return path

    nan, inf = good.latents.clone(), good.latents.clone()
    nan[0, 0, 0], inf[1, 1, 1] = float("nan"), float("inf")
    bad = {
        "nan": write("nan", nan), "inf": write("inf", inf),
        "int64": write("int64", good.latents.long()), "bool": write("bool", good.latents > 0),
        "uint8": write("uint8", good.latents.to(torch.uint8)),
        "no_fingerprint": write("no_fingerprint", fingerprint=None),
        "float_size": write("float_size", image_size="[32.5, 48]"), "negative": write("negative", image_size="[-32, 48]"),
        "size_mismatch": write("size_mismatch", image_size="[64, 48]"), "rank": write("rank", good.latents[None]),
    }
    os.symlink(tmp_path / "loop.safetensors", tmp_path / "loop.safetensors")
    bad["loop"] = tmp_path / "loop.safetensors"
    inputs = [tmp_path / "lat" / "good0.safetensors", *bad.values(), tmp_path / "lat" / "good1.safetensors"]
    code, _, err = run(capsys, "decode", *inputs, "--out", tmp_path / "png", *MODEL)
    assert code == EXIT_SOME_FAILED
    lines = failure_lines(err)
    assert len(lines) == len(bad)
    for path, line in zip(bad.values(), lines):
        assert line.startswith(f"failed: {path}: ")
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["good0.png", "good1.png"]
    expected = codec.decode(good.latents, image_size=good.image_size, output_type="np")[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "png" / "good0.png")), expected)


def test_a_full_disk_fails_that_output_alone_and_leaves_no_partial_file(tmp_path, capsys, photos, monkeypatch):
    real_save_file = latent_files_module.save_file

    def disk_full_for_good1(tensors, path, metadata=None):
        if "good1" in str(path):
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(latent_files_module, "save_file", disk_full_for_good1)
    code, _, err = run(capsys, "encode", *sorted(photos.iterdir()), "--out", tmp_path / "out", *MODEL)
    assert code == EXIT_SOME_FAILED
    [line] = failure_lines(err)
    assert line == f"failed: {photos / 'good1.png'}: No space left on device"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good0.safetensors", "good2.safetensors"]


# -- reconstruct ------------------------------------------------------------------------------------------


def test_reconstruct_fails_a_tiny_image_and_a_nan_alone(tmp_path, capsys, photos, monkeypatch):
    Image.fromarray(smooth_image(8, 8)).save(photos / "tiny.png")  # under SSIM's 11-pixel window
    decode_raw, calls = LatentCodec.decode_raw, []

    def nan_on_the_second_image(self, raw):
        calls.append(1)
        return decode_raw(self, raw * float("nan") if len(calls) == 2 else raw)

    monkeypatch.setattr(LatentCodec, "decode_raw", nan_on_the_second_image)
    code, out, err = run(capsys, "reconstruct", photos / "good0.png", photos / "good1.png", photos / "tiny.png",
                         photos / "good2.png", "--out", tmp_path / "rec", *MODEL)
    assert code == EXIT_SOME_FAILED
    lines = failure_lines(err)
    assert len(lines) == 2
    assert lines[0].startswith(f"failed: {photos / 'good1.png'}: NaN or inf")
    assert lines[1].startswith(f"failed: {photos / 'tiny.png'}: 8x8 is smaller than SSIM's 11-pixel window")
    assert sorted(p.name for p in (tmp_path / "rec").iterdir()) == ["good0.png", "good2.png"]
    assert "mean over 2" in out


# -- the command could not run: exit 2, one line ---------------------------------------------------------


@pytest.mark.parametrize("device", ["cuda", "gpu"])
def test_a_device_that_is_not_there_is_one_line(tmp_path, capsys, photos, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = run(capsys, "encode", photos / "good0.png", "--out", tmp_path, "--model", TINY, "--device", device)
    assert code == EXIT_BAD_INPUT and len(err.strip().splitlines()) == 1 and repr(device) in err


@pytest.mark.parametrize("argv", [
    ["info", "--resolution", "0"],
    ["sample-photos", "--resolution", "-1"],
    ["interpolate", "A", "A", "--steps", "1"],
    ["interpolate", "A", "A", "--resolution", "0"],
    ["encode", "A", "--max-pixels", "-1"],
])
def test_impossible_numbers_are_one_line_and_exit_2(tmp_path, capsys, photos, argv):
    argv = [str(photos / "good0.png") if a == "A" else a for a in argv]
    out = [] if argv[0] == "info" else ["--out", tmp_path / "out"]
    code, _, err = run(capsys, *argv, *out, "--model", TINY)
    assert code == EXIT_BAD_INPUT
    [line] = failure_lines(err)
    assert line.startswith(f"latent-vae {argv[0]}: error: argument --") and argv[-2] in line


def _model_variants(root: Path) -> dict[str, tuple[Path, Path, str]]:
    """Broken models: name -> (what to pass as --model, the file the error must name, what else it must say)."""
    save_vae(build_vae(TINY, seed=0), root / "good")
    config = json.loads((root / "good" / "config.json").read_text())
    variants = {}
    for name, text, field in [
        ("boc_string", json.dumps({**config, "block_out_channels": "8,8,16"}), "block_out_channels"),
        ("groups_zero", json.dumps({**config, "norm_num_groups": 0}), "norm_num_groups"),
        ("groups_indivisible", json.dumps({**config, "norm_num_groups": 3}), "divisible by norm_num_groups"),
        ("class_list", json.dumps({**config, "_class_name": ["AutoencoderKL"]}), "_class_name"),
        ("json_list", json.dumps([1, 2]), "JSON object"),
        ("empty", "", "empty file"),
    ]:
        shutil.copytree(root / "good", root / name)
        (root / name / "config.json").write_text(text)
        variants[name] = (root / name, root / name / "config.json", field)
    weights = root / "good" / "diffusion_pytorch_model.safetensors"
    single = save_single_file(build_vae(TINY, seed=0), root / "single.safetensors").read_bytes()
    for name, data in [
        ("truncated", single[: len(single) // 2]),
        ("flipped_header", single[:8] + bytes([single[8] ^ 0xFF]) + single[9:]),
        ("huge_header", struct.pack("<Q", 2**62) + single[8:]),
    ]:
        (root / f"{name}.safetensors").write_bytes(data)
        variants[name] = (root / f"{name}.safetensors",) * 2 + ("not a readable .safetensors file",)
    torch.save({"weights": torch.zeros(2)}, root / "pickle.safetensors")  # a renamed pickle
    variants["renamed_pickle"] = (root / "pickle.safetensors",) * 2 + ("not a readable .safetensors file",)
    torch.save({"weights": torch.zeros(2)}, root / "model.ckpt")
    variants["pickle"] = (root / "model.ckpt",) * 2 + ("refusing to unpickle",)
    shutil.copytree(root / "good", root / "folder_truncated")
    (root / "folder_truncated" / weights.name).write_bytes(weights.read_bytes()[:100])
    variants["folder_truncated"] = (root / "folder_truncated", root / "folder_truncated" / weights.name,
                                    "not a readable .safetensors file")
    return variants


def test_every_broken_model_is_one_line_naming_the_file_and_the_field(tmp_path, capsys, photos):
    for name, (model, named, mention) in _model_variants(tmp_path / "models").items():
        code, _, err = run(capsys, "encode", photos / "good0.png", "--out", tmp_path / "out", "--model", model,
                           "--device", "cpu")
        assert code == EXIT_BAD_INPUT, name
        [line] = err.strip().splitlines()
        assert line.startswith(f"latent-vae: error: {named}") and mention in line, (name, line)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_bug_exits_3_with_a_one_line_summary_before_the_traceback(tmp_path, capsys, photos, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("latent_vae.cli.coding.save_latent_file", broken)
    code = main([str(a) for a in ["encode", photos / "good0.png", "--out", tmp_path / "out", *MODEL]])
    err = capsys.readouterr().err
    assert code == EXIT_INTERNAL_ERROR
    summary = err.index("latent-vae: internal error (ZeroDivisionError: division by zero)")
    assert summary < err.index("Traceback")  # a log shows the summary even when the traceback is cut off


def test_unreadable_subfolders_are_reported_by_calibrate(tmp_path, capsys, photos, monkeypatch):
    locked = photos / "locked"
    locked.mkdir()
    Image.fromarray(smooth_image(32, 32)).save(locked / "hidden.png")
    if os.geteuid() == 0:  # root reads through chmod 000: make the folder unreadable the way a user would see it
        real_scandir = os.scandir

        def scandir(path="."):
            if Path(path) == locked:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", scandir)
    else:
        locked.chmod(0)
    try:
        save_vae(build_vae(TINY, seed=0), tmp_path / "model")
        code, out, err = run(capsys, "calibrate", "--model", tmp_path / "model", "--data", photos, "--resolution", 32,
                             "--device", "cpu")
    finally:
        locked.chmod(0o755)
    assert code == EXIT_SOME_FAILED
    [line] = failure_lines(err)
    assert line == f"failed: {locked}: cannot read (Permission denied)"
    assert json.loads(out.splitlines()[0])["images"] == 3


@pytest.mark.slow
def test_no_traceback_reaches_a_script_that_runs_the_command(tmp_path, photos):
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    result = subprocess.run(
        [sys.executable, "-m", "latent_vae", "encode", str(tmp_path / "bomb.png"), str(photos / "good0.png"),
         "--out", str(tmp_path / "out"), *MODEL],
        check=False, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300,
    )
    assert result.returncode == EXIT_SOME_FAILED, result.stderr
    assert "Traceback" not in result.stderr and "bomb.png" in result.stderr
    assert (tmp_path / "out" / "good0.safetensors").is_file()


# -- training ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_images(training_images: Path) -> Path:
    """The shared training images plus a decompression bomb, read at some step of every epoch."""
    (training_images / "bomb.png").write_bytes(bomb_png())
    return training_images


def train(images: Path, out: Path, **overrides):
    from training.config import load_config
    from training.train_vae import main as train_main

    # No held-out validation images: the bomb must come up in training, not in the validation set.
    settings = {"data": str(images), "output_dir": str(out), "validation_holdout": 0, **overrides}
    return train_main(load_config("tiny_test", settings))


def train_command(capsys, *argv) -> tuple[int, str]:
    from training.train_vae import run as train_run

    with pytest.raises(SystemExit) as exit_:
        train_run(["--config", "tiny_test", *map(str, argv)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exit_.value.code, err


@pytest.mark.usefixtures("fresh_accelerator")
def test_a_corrupt_newest_checkpoint_resumes_from_the_previous_one_with_the_same_weights(train_images, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(train_images, run_dir, max_steps=4, checkpoint_every=2, keep_checkpoints=2)
    newest = run_dir / "checkpoint-0000004"
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state["images_skipped"] >= 1  # the bomb was skipped and counted, not fatal
    # An uninterrupted continuation from checkpoint 2 is what checkpoint 4 holds (resume is exact).
    reference = {name: load_file(str(newest / name)) for name in ("vae.safetensors", "ema.safetensors")}
    for damaged in ("vae.safetensors", "optimizer.pt", "trainer_state.json"):
        copy = tmp_path / f"damaged-{damaged}"
        shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("vae", "samples", "logs"))
        target = copy / newest.name / damaged
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
        AcceleratorState._reset_state(True)
        capsys.readouterr()
        train(train_images, copy, max_steps=4, checkpoint_every=2, keep_checkpoints=2, resume="latest")
        out = capsys.readouterr().out
        assert f"skipping damaged checkpoint {copy / newest.name}: {damaged} is" in out
        assert f"resumed from {copy / 'checkpoint-0000002'} at step 2" in out
        for name, tensors in reference.items():
            resumed = load_file(str(copy / newest.name / name))
            assert all(torch.equal(tensors[k], resumed[k]) for k in tensors), (damaged, name)


@pytest.mark.usefixtures("fresh_accelerator")
def test_resume_latest_without_a_checkpoint_says_it_starts_fresh(train_images, tmp_path, capsys):
    train(train_images, tmp_path / "run", max_steps=1, checkpoint_every=0, validate_every=0, resume="latest")
    assert f"no checkpoint in {tmp_path / 'run'} yet, starting fresh" in capsys.readouterr().out


@pytest.mark.usefixtures("fresh_accelerator")
def test_training_bad_starts_are_one_line_and_exit_2(tmp_path, capsys, train_images):
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_text("not an image")
    (broken / "b.png").write_bytes(bomb_png())
    cases = [
        (["--data", tmp_path / "empty"], "no image files found"),
        (["--data", broken], "leaves no training image of the 2"),
        (["--data", broken, "--validation_holdout", 0], "no readable validation image"),
        (["--data", broken, "--validation_data", train_images], "16 unreadable images in a row"),
        (["--data", train_images, "--resolution", 7], "resolution must be a multiple of the model's downsampling factor 16"),
        (["--data", train_images, "--model", "nope"], "'nope' is neither a preset"),
    ]
    for argv, message in cases:
        AcceleratorState._reset_state(True)
        code, err = train_command(capsys, *argv, "--output_dir", tmp_path / "out")
        assert code == 2, argv
        # (after the progress bar's text when the data fails at the first step)
        [line] = [line[line.index("error: "):] for line in err.splitlines() if "error: " in line]
        assert message in line, (argv, line)


@pytest.mark.usefixtures("fresh_accelerator")
def test_training_reports_an_unreadable_subfolder(tmp_path, capsys, train_images, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(train_images, data)
    locked = data / "locked"
    locked.mkdir()
    real_scandir = os.scandir

    def scandir(path="."):  # as chmod 000 would for a user who is not root
        if Path(path) == locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    train(data, tmp_path / "run", max_steps=1, checkpoint_every=0, validate_every=0)
    assert f"skipped folder {locked}: cannot read (Permission denied)" in capsys.readouterr().err


@pytest.mark.slow
def test_training_with_a_model_that_does_not_exist_exits_2_without_a_traceback(tmp_path, train_images):
    result = subprocess.run(
        [sys.executable, "-m", "training.train_vae", "--config", "tiny_test", "--data", str(train_images),
         "--model", "nope", "--output_dir", str(tmp_path / "out")],
        check=False, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: 'nope' is neither a preset")
