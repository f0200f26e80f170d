"""The one image reader (`latent_vae.images.reading.load_image`), image tensor checks and the atomic-write helpers."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from latent_vae.images.reading import ImageError, check_image_tensor, load_image
from latent_vae.utils.atomic import atomic_directory, atomic_path, atomic_write_text


def png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kwargs.pop("format", "PNG"), **kwargs)
    return buffer.getvalue()


def test_exif_orientation_is_applied_for_paths_bytes_and_dicts(tmp_path):
    # A 40x20 picture stored sideways with "rotate 90" (orientation 6): upright it is 20 wide, 40 high.
    stored = Image.new("RGB", (40, 20), (200, 10, 10))
    stored.paste((10, 10, 200), (0, 0, 10, 20))  # a blue band on the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    data = png_bytes(stored, format="JPEG", exif=exif.tobytes(), quality=95)
    path = tmp_path / "camera.jpg"
    path.write_bytes(data)
    for source in (path, str(path), data, io.BytesIO(data), {"bytes": data, "path": None}, {"bytes": None, "path": str(path)}):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (20, 40)
        top = np.asarray(image)[:5].reshape(-1, 3).mean(0)
        assert top[2] > 150 and top[0] < 80  # the stored left edge is now on top


def test_pixel_limit_refuses_a_bomb_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb)  # 144 megapixels in a few hundred kilobytes
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(ImageError, match=r"bomb.png: 12000x12000 .* over the limit"):
        load_image(bomb)
    with pytest.raises(ImageError, match="over the limit of 1"):
        load_image(png_bytes(Image.new("RGB", (1200, 1000))), max_pixels=1_000_000, name="big")
    assert load_image(png_bytes(Image.new("RGB", (1000, 1000))), max_pixels=1_000_000).size == (1000, 1000)


@pytest.mark.parametrize("case", ["missing", "folder", "empty", "text", "truncated", "loop", "type"])
def test_every_failure_is_one_image_error_naming_the_input(tmp_path, case):
    target = tmp_path / f"{case}.png"
    if case == "folder":
        target.mkdir()
    elif case == "empty":
        target.write_bytes(b"")
    elif case == "text":
        target.write_text("not a picture")
    elif case == "truncated":
        target.write_bytes(png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))[:300])
    elif case == "loop":
        os.symlink(target, target)
    source = 12345 if case == "type" else target
    with pytest.raises(ImageError) as raised:
        load_image(source)
    message = str(raised.value)
    assert "\n" not in message
    if case == "type":
        assert "type int" in message
    else:
        assert message.startswith(str(target))
    if case == "loop":
        assert "no such file" not in message


def test_atomic_writes_leave_the_old_file_on_error(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    folder = tmp_path / "model"
    with atomic_directory(folder) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_directory(folder) as tmp:
            (tmp / "b.txt").write_text("2")
            raise RuntimeError("killed")
    assert sorted(p.name for p in folder.iterdir()) == ["a.txt"]
    with atomic_directory(folder) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in folder.iterdir()) == ["c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "state.json"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_non_finite_value_in_an_image_tensor_is_refused(bad):
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    assert check_image_tensor(images.to(torch.bfloat16)).shape == (2, 3, 8, 8)
    images[1, 2, 5, 3] = bad
    with pytest.raises(ImageError, match="NaN or inf"):
        check_image_tensor(images)
    with pytest.raises(ImageError, match=r"\[0, 255\]"):
        check_image_tensor(torch.rand(1, 3, 8, 8) * 255)
