"""Latent datasets with real processes: SIGKILL mid-run then rerun, and two ranks under torchrun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from latent_vae import build_vae, save_vae
from latent_vae.latents import load_latents, read_failures, read_summary, shard_files

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, list[str], list[str]]:
    """A saved tiny model and a folder of images, three of them unusable."""
    root = tmp_path_factory.mktemp("precompute")
    model = save_vae(build_vae("f16c16-tiny", seed=0), root / "model")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    good = []
    for i in range(40):
        name = f"{'sub/' if i % 3 == 0 else ''}{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (32 + i % 5, 32 + i % 7, 3), dtype=np.uint8)).save(images / name)
        good.append(name)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (images / "empty.png").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(images / "small.png")
    return model, images, sorted(good), ["broken.png", "empty.png", "small.png"]


def command(model: Path, images: Path, out: Path) -> list[str]:
    return ["-m", "latent_vae.precompute", "--model", str(model), "--data", str(images), "--out", str(out),
            "--resolution", "32", "--batch-size", "2", "--shard-size", "2", "--num-workers", "1",
            "--device", "cpu", "--no-progress"]


def environment() -> dict:
    # One thread per process: two processes on two cores; and the repository importable from a subprocess.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def stored_keys(out: Path) -> list[str]:
    return [k for s in shard_files(out) for k in pq.read_table(s, columns=["key"]).column("key").to_pylist()]


def kill_after_new_shards(argv: list[str], out: Path, shards_before: int, timeout: float = 120.0) -> None:
    """Start the command and SIGKILL it (and its DataLoader worker) once it has committed a shard more."""
    process = subprocess.Popen([sys.executable, *argv], env=environment(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while len(shard_files(out)) <= shards_before:
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no shard committed in time"
            time.sleep(0.01)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: the run and its worker, nothing else
        except ProcessLookupError:  # it had already finished
            pass
        process.wait()


def test_sigkill_then_rerun_holds_every_input_exactly_once(setup, tmp_path):
    model, images, good, bad = setup
    out = tmp_path / "latents"
    argv = command(model, images, out)
    kill_after_new_shards(argv, out, 0)
    first = stored_keys(out)
    assert 0 < len(first) < len(good) and read_summary(out) is None  # really killed mid-run
    kill_after_new_shards(argv, out, len(shard_files(out)))  # killed again, later on
    assert len(stored_keys(out)) > len(first)

    done = subprocess.run([sys.executable, *argv], check=False, env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "40 latents" in done.stdout and "3 failed" in done.stdout
    keys = stored_keys(out)
    assert Counter(keys) == Counter(good)  # every image once, none twice
    assert sorted(f["key"] for f in read_failures(out)) == bad  # every failure listed once
    assert read_summary(out)["rows"] == 40
    assert len(load_latents(out, model=str(model), resolution=32, cache_dir=tmp_path / "cache")) == 40


def test_two_processes_write_disjoint_shards_of_one_dataset(setup, tmp_path):
    model, images, good, bad = setup
    out = tmp_path / "latents"
    # torchrun (what `accelerate launch` runs underneath): two real processes over gloo on this CPU.
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *command(model, images, out)], check=False, env=environment(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = Counter(s.name.split("-")[1] for s in shard_files(out))
    assert set(ranks) == {"00000", "00001"}  # both ranks wrote their own shards
    per_rank = {r: {k for s in shard_files(out) if s.name.split("-")[1] == r
                    for k in pq.read_table(s, columns=["key"]).column("key").to_pylist()} for r in ranks}
    assert not per_rank["00000"] & per_rank["00001"]
    assert Counter(stored_keys(out)) == Counter(good)
    assert sorted(f["key"] for f in read_failures(out)) == bad
    summary = read_summary(out)
    assert summary["world_size"] == 2 and summary["encoded_this_run"] == 40
    dataset = load_latents(out, model=str(model), cache_dir=tmp_path / "cache")
    assert sorted(dataset.with_format(None)["key"]) == good  # reads as one dataset
