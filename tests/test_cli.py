"""The command line end to end on small images, in-process (main(argv)) for speed."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import TINY, assert_close
from PIL import Image
from safetensors.torch import save_file

from latent_vae import LatentCodec, build_vae, save_vae
from latent_vae.cli import main
from latent_vae.latents.single_file import load_latent_file

MODEL = ["--model", TINY, "--device", "cpu"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.mark.numerics
def test_encode_then_decode_round_trip_at_the_original_size(tmp_path, capsys, image_folder):
    images = sorted(image_folder.iterdir())
    code, _, _ = run(capsys, "encode", *images, "--out", tmp_path / "latents", *MODEL)
    assert code == 0
    latent = load_latent_file(tmp_path / "latents" / "img2.safetensors")
    assert latent.image_size == (48, 80) and latent.latents.shape == (16, 3, 5)
    codec = LatentCodec.from_pretrained(TINY, seed=0, device="cpu")
    assert latent.fingerprint == codec.fingerprint
    assert_close(latent.latents, codec.encode(images[2])[0])

    code, _, _ = run(capsys, "decode", *sorted((tmp_path / "latents").iterdir()), "--out", tmp_path / "png", *MODEL)
    assert code == 0
    decoded = Image.open(tmp_path / "png" / "img2.png")
    assert decoded.size == (80, 48)
    expected = codec.decode(latent.latents, image_size=(48, 80), output_type="np")[0]
    assert np.abs(np.asarray(decoded).astype(int) - expected.astype(int)).max() <= 1


def test_bad_files_in_a_batch_are_reported_and_the_good_ones_written(tmp_path, capsys, image_folder):
    (tmp_path / "notes.png").write_text("not an image")
    full = (image_folder / "img0.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(full[: len(full) // 3])
    good = image_folder / "img0.png"
    code, _, err = run(capsys, "encode", tmp_path / "notes.png", good, tmp_path / "missing.png",
                       tmp_path / "truncated.png", "--out", tmp_path / "out", *MODEL)
    assert code == 1
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["img0.safetensors"]
    for name in ("notes.png: not an image", "missing.png: no such file", "truncated.png: corrupt or truncated"):
        assert name in err
    assert "3 of 4 inputs failed" in err


def test_decoding_a_latent_from_another_model_or_a_wrong_file_is_refused(tmp_path, capsys, image_folder):
    run(capsys, "encode", image_folder / "img0.png", "--out", tmp_path / "lat", *MODEL)
    code, _, err = run(capsys, "decode", tmp_path / "lat" / "img0.safetensors", "--out", tmp_path / "png",
                       "--model", TINY, "--seed", "1", "--device", "cpu")
    assert code == 1 and "not by the given model" in err
    save_file({"latents": torch.zeros(16, 4, 4)}, str(tmp_path / "foreign.safetensors"))
    save_file({"something": torch.zeros(3)}, str(tmp_path / "nokey.safetensors"))
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 40)
    code, _, err = run(capsys, "decode", tmp_path / "foreign.safetensors", tmp_path / "nokey.safetensors",
                       tmp_path / "garbage.safetensors", "--out", tmp_path / "png", *MODEL)
    assert code == 1
    assert "not a latent-vae latent file" in err and "no 'latents' tensor" in err and "not a readable" in err
    assert not (tmp_path / "png").exists() or not any((tmp_path / "png").iterdir())


def test_a_missing_model_is_one_line_and_exit_2(tmp_path, capsys, image_folder):
    code, _, err = run(capsys, "encode", image_folder / "img0.png", "--out", tmp_path / "out", "--model", tmp_path / "nope")
    assert code == 2
    assert err.strip().count("\n") == 0 and err.startswith("latent-vae: error:") and "f16c16" in err


def test_reconstruct_prints_scores_and_writes_side_by_sides(tmp_path, capsys, image_folder):
    code, out, _ = run(capsys, "reconstruct", image_folder / "img0.png", image_folder / "img2.png",
                       "--out", tmp_path / "rec", *MODEL)
    assert code == 0
    assert "PSNR" in out and "SSIM" in out and "mean over 2" in out
    strip = Image.open(tmp_path / "rec" / "img2.png")
    assert strip.width == 3 * 80 + 2 * 4  # original | reconstruction | error map


def test_calibrate_saves_unit_variance_constants_into_the_model(tmp_path, capsys, image_folder):
    save_vae(build_vae(TINY, seed=0), tmp_path / "model")
    code, out, _ = run(capsys, "calibrate", "--model", tmp_path / "model", "--data", image_folder,
                       "--resolution", 64, "--device", "cpu")
    assert code == 0
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["scaling_factor"] != 1.0 and json.loads(out.splitlines()[0])["images"] == 4
    code, _, err = run(capsys, "calibrate", "--model", TINY, "--data", image_folder)
    assert code == 2 and "--out" in err


def test_info_reports_the_f16c16_shapes_and_flops(capsys):
    code, out, _ = run(capsys, "info", "--json")
    info = json.loads(out)
    assert code == 0
    assert info["latent_shape"] == [16, 64, 64] and info["compression_ratio"] == 48
    assert info["downsampling_factor"] == 16 and 60e6 < info["parameters"] < 70e6
    assert info["decode_gflops"] > info["encode_gflops"] > 1000
    assert info["class"] == "AutoencoderKL" and info["shortcut"] is None
    _, out, _ = run(capsys, "info", "--json", "--model", "f16c16-small-thumb")
    assert json.loads(out)["shortcut"] == "thumbnail"


def test_interpolate_writes_a_strip(tmp_path, capsys, image_folder):
    code, _, _ = run(capsys, "interpolate", image_folder / "img0.png", image_folder / "img2.png",
                     "--steps", 4, "--resolution", 32, "--out", tmp_path / "strip.png", *MODEL)
    assert code == 0
    strip = Image.open(tmp_path / "strip.png")
    assert strip.width == 4 * 32 + 3 * 4


def test_sample_photos_writes_reconstructions_of_the_shipped_photos(tmp_path, capsys):
    pytest.importorskip("skimage")
    code, out, err = run(capsys, "sample-photos", "--out", tmp_path, "--resolution", 64, *MODEL)
    assert code == 0 and (tmp_path / "reconstructions.png").is_file()
    assert "untrained" in err and "astronaut.png" in out


@pytest.mark.slow
def test_help_explains_every_command():
    result = subprocess.run([sys.executable, "-m", "latent_vae", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    for command in ("encode", "decode", "reconstruct", "calibrate", "info", "interpolate", "sample-photos"):
        assert command in result.stdout


@pytest.mark.slow
def test_help_and_usage_errors_do_not_import_diffusers():
    """diffusers takes seconds to import: the parser must not need it (the commands import it when they run)."""
    probe = ("import sys; from latent_vae.cli import build_parser; import latent_vae; build_parser(); "
             "print(sorted(m for m in ('diffusers', 'torchmetrics') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
