"""Shared fixtures: tiny models and small synthetic images; no network, no data from outside the repository."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, smooth_image
from PIL import Image


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models are latency-bound: on a shared 2-core machine a second thread only adds waiting
    (tiny training runs measured about 5x slower and erratic with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def image_folder(tmp_path):
    """A folder with four small PNG/JPEG photos-like images of two sizes."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i, (h, w) in enumerate([(64, 64), (64, 64), (48, 80), (64, 64)]):
        suffix = ".jpg" if i == 1 else ".png"
        Image.fromarray(smooth_image(h, w, seed=i)).save(folder / f"img{i}{suffix}")
    return folder


@pytest.fixture
def tiny_codec():
    from latent_vae import LatentCodec

    torch.manual_seed(0)
    return LatentCodec.from_pretrained(TINY, seed=0, device="cpu")


@pytest.fixture
def fresh_accelerator():
    """A fresh Accelerate state for each training run, as a new process would have (its state is a
    process-wide singleton)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture(scope="module")
def training_images(tmp_path_factory) -> Path:
    """Six small smooth random images of different sizes: something a tiny VAE starts to learn in a few steps."""
    folder = tmp_path_factory.mktemp("training_images")
    rng = np.random.default_rng(0)
    for i in range(6):
        small = rng.random((6, 6, 3)) * 255
        image = Image.fromarray(small.astype(np.uint8)).resize((48 + 8 * i, 56), Image.BICUBIC)
        image.save(folder / f"img{i}.png")
    return folder
