"""Two real processes on CPU (torchrun, gloo): DDP keeps the ranks' weights identical while each rank reads
its own shard and draws its own noise."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]

# Run under torchrun: trains with training.train_vae and, at each checkpoint, has every rank write the
# weights it holds (the real checkpoint is written by the main process only).
WORKER = """
import sys
from safetensors.torch import save_file
import training.train_vae as train_vae

real_save = train_vae.save_checkpoint

def save_and_dump_each_rank(accelerator, out_dir, step, *, vae, discriminator, **kwargs):
    rank = accelerator.process_index
    for name, module in (("vae", vae), ("disc", discriminator)):
        tensors = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
        save_file(tensors, str(out_dir / f"{name}-rank{rank}-step{step}.safetensors"))
    return real_save(accelerator, out_dir, step, vae=vae, discriminator=discriminator, **kwargs)

train_vae.save_checkpoint = save_and_dump_each_rank
train_vae.run(sys.argv[1:])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_processes_hold_identical_weights_and_read_different_data(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(images / f"{i}.png")
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(worker), "--config", "tiny_test", "--data", str(images), "--output_dir", str(out),
        "--max_steps", "3", "--disc_start", "1", "--checkpoint_every", "0", "--validate_every", "0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    state = json.loads((out / "checkpoint-0000003" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert state["samples_seen"] == 3 * 2  # per rank: 3 steps of batch 2
    for name in ("vae", "disc"):
        rank0, rank1 = (load_file(str(out / f"{name}-rank{r}-step3.safetensors")) for r in (0, 1))
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), f"{name}.{key} differs between ranks"
    initial = load_file(str(out / "vae-rank0-step3.safetensors"))
    from latent_vae import build_vae

    fresh = build_vae("f16c16-tiny", seed=0).state_dict()
    assert any(not torch.equal(initial[k], fresh[k]) for k in fresh)  # it did train
    # Per-rank seeds: the ranks' RNG streams differ (different posterior noise).
    rng0, rng1 = (load_file(str(out / "checkpoint-0000003" / f"rng-{r}.safetensors"))["torch"] for r in (0, 1))
    assert not torch.equal(rng0, rng1)
    assert (out / "vae" / "config.json").is_file()
