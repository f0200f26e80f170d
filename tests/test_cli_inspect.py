"""`latent-vae inspect`: the command's outputs, its exit statuses and what it refuses before any work."""

from __future__ import annotations

import json

import pytest
from helpers import smooth_image
from PIL import Image

THUMB = "f16c16-small-thumb"


@pytest.fixture
def photo_folder(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(smooth_image(40 + 8 * i, 72, seed=i)).save(folder / f"photo{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def test_inspect_command_writes_both_models_and_names_an_unreadable_image(photo_folder, tmp_path, capsys):
    from latent_vae.cli import main
    from latent_vae.utils.errors import EXIT_SOME_FAILED

    out = tmp_path / "report"
    status = main(["inspect", "--model", THUMB, "--compare", "f16c16-tiny", "--data", str(photo_folder),
                   "--out", str(out), "--resolution", "64", "--device", "cpu", "--interpolation-steps", "3"])
    assert status == EXIT_SOME_FAILED
    assert f"{photo_folder / 'broken.png'}: " in capsys.readouterr().err
    numbers = json.loads((out / "report.json").read_text())
    assert numbers["images"] == [f"photo{i}.png" for i in range(4)]
    assert [m["description"]["model"] for m in numbers["models"]] == [THUMB, "f16c16-tiny"]
    assert (out / "index.html").stat().st_size > 0
    # the same folder again is an earlier report: replaced
    (photo_folder / "broken.png").unlink()
    assert main(["inspect", "--model", THUMB, "--data", str(photo_folder), "--out", str(out), "--resolution", "64",
                 "--device", "cpu", "--interpolation-steps", "3", "--max-images", "2"]) == 0
    assert len(json.loads((out / "report.json").read_text())["images"]) == 2


@pytest.mark.parametrize("problem", ["out_is_a_file", "out_holds_other_files", "one_image", "resolution",
                                     "latent_too_small"])
def test_inspect_command_refuses_before_work(problem, photo_folder, tmp_path, capsys):
    from latent_vae.cli import main
    from latent_vae.utils.errors import EXIT_BAD_INPUT

    out = tmp_path / "report"
    args = ["inspect", "--model", THUMB, "--data", str(photo_folder), "--out", str(out), "--resolution", "64",
            "--device", "cpu"]
    if problem == "out_is_a_file":
        out.write_text("mine")
    elif problem == "out_holds_other_files":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif problem == "one_image":
        for path in list(photo_folder.iterdir())[1:]:
            path.unlink()
    elif problem == "resolution":
        args[-3] = "72"  # not a multiple of the factor 16
    else:
        args[-3] = "32"  # a 2x2 latent: no spectrum rings above half Nyquist to measure
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("latent-vae: error: ")]
    assert len(errors) == 1 and "Traceback" not in err  # one line (after the preset's note), no traceback
    assert not (out / "index.html").exists()
    if problem != "one_image":
        assert "--out" in errors[0] or "--resolution" in errors[0]
