"""Latent datasets with real processes: SIGKILL mid-run then rerun, two concurrent runs into one --out (again
and again, to catch a race), and two torchrun "nodes" on localhost against one process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import assert_close
from PIL import Image

from latent_vae import build_vae, save_vae
from latent_vae.latents.format import read_failures, read_manifests, read_summary, unpack
from latent_vae.latents.precompute import precompute_latents
from latent_vae.latents.readers import load_latents
from latent_vae.latents.verify import verify_latents

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


def command(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "latent_vae", "precompute", "--model", str(model), "--data", str(data), "--out", str(out),
            "--resolution", "32", "--batch-size", "2", "--shard-size", "3", "--num-workers", "1",
            "--device", "cpu", "--no-progress", *extra]


def environment() -> dict:
    # One thread per process: two processes on two cores; and the repository importable from a subprocess.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def stored_keys(out: Path) -> list[str]:
    return [k for s in sorted((out / "data").glob("*.parquet"))
            for k in pq.read_table(s, columns=["key"]).column("key").to_pylist()]


def test_sigkill_then_rerun_holds_every_input_exactly_once(setup, tmp_path):
    model, images, good, bad = setup
    out = tmp_path / "latents"
    argv = command(model, images, out)
    process = subprocess.Popen([sys.executable, *argv], env=environment(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while len(list((out / "manifests").glob("*.json"))) < 2:
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no shard committed in time"
            time.sleep(0.01)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # its own session: the run and its worker, nothing else
        process.wait()
    done_before = len(read_manifests(out))
    assert 2 <= done_before < 15 and list((out / "claims").iterdir())  # really killed mid-run, claims left behind

    start = time.monotonic()
    done = subprocess.run([sys.executable, *argv], check=False, env=environment(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1, done.stderr  # 1: some inputs failed, each named on stderr
    assert "40 latents" in done.stdout and "3 failed" in done.stdout and "broken.png" in done.stderr
    # The dead run's claims (this host, its pid gone) were taken over at once, not after the claim timeout.
    assert time.monotonic() - start < 120
    assert Counter(stored_keys(out)) == Counter(good)  # every image once, none twice
    assert sorted(f["key"] for f in read_failures(out)) == bad  # every failure listed once
    assert read_summary(out)["shards_done_before"] == done_before and verify_latents(out).ok
    assert not list((out / "claims").iterdir()) and not list((out / "staging").iterdir())
    assert len(load_latents(out, model=str(model), resolution=32)) == 40


RACE = """
import json, sys, time
from pathlib import Path
from latent_vae.latents.precompute import precompute_latents
model, data, base, me, rounds = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4], int(sys.argv[5])
results = []
for r in range(rounds):
    (base / f"ready-{r}-{me}").touch()
    deadline = time.monotonic() + 120
    while not all((base / f"ready-{r}-{who}").exists() for who in "ab"):
        if time.monotonic() > deadline:
            sys.exit(f"the other run never reached round {r}")
        time.sleep(0.001)
    summary = precompute_latents(model, data, base / f"out-{r}", resolution=32, batch_size=2, shard_size=2,
                                 num_workers=r % 2, device="cpu", progress=False, claim_timeout=30)
    results.append({"complete": summary.complete, "shards": summary.shards_this_run, "rows": summary.rows})
print(json.dumps(results))
"""


def test_two_concurrent_runs_into_one_out_never_duplicate_or_lose_a_row(setup, tmp_path):
    """Two runs started together, six times: a commit protocol that lets both finish one shard writes its rows twice."""
    model, images, good, bad = setup
    rounds = 6
    runs = [subprocess.Popen([sys.executable, "-c", RACE, str(model), str(images), str(tmp_path), who, str(rounds)],
                             env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for who in "ab"]
    try:
        outputs = [run.communicate(timeout=300) for run in runs]
    finally:
        for run in runs:
            run.kill()  # only if still running (a hang): never leave it behind
    for run, (stdout, stderr) in zip(runs, outputs):
        assert run.returncode == 0, stderr[-3000:]
    results = [json.loads(stdout) for stdout, _ in outputs]
    shards = -(-(len(good) + len(bad)) // 2)
    for r in range(rounds):
        out = tmp_path / f"out-{r}"
        assert Counter(stored_keys(out)) == Counter(good), f"round {r}"
        assert sorted(f["key"] for f in read_failures(out)) == bad
        assert verify_latents(out).ok
        # Both runs return a complete dataset, and between them every shard was committed exactly once.
        assert all(result[r]["complete"] and result[r]["rows"] == 40 for result in results)
        assert sum(result[r]["shards"] for result in results) == shards
    assert all(sum(result[r]["shards"] for r in range(rounds)) > 0 for result in results)  # both did work


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_with_two_processes_stores_every_key_once_and_both_ranks_work(setup, tmp_path):
    """The launcher command of the docs, `torchrun --nproc_per_node 2 -m latent_vae precompute ...`: two real
    processes on one node (gloo on CPU) share the shards of one --out."""
    model, images, good, bad = setup
    out = tmp_path / "latents"
    # One image a shard (43 shards), so that a rank that starts a little late still finds shards left: ranks start
    # without a barrier, and in so small a run one rank could otherwise take every shard.
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(free_port()), *command(model, images, out, "--batch-size", "1", "--shard-size", "1")]
    done = subprocess.run(launch, env=environment(), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 1, done.stderr[-3000:]  # 1: the three bad images, each named
    assert all(name in done.stderr for name in bad)
    assert read_summary(out)["world_size"] == 2
    assert Counter(stored_keys(out)) == Counter(good)  # every key exactly once
    assert sorted(f["key"] for f in read_failures(out)) == bad
    assert len({m.pid for m in read_manifests(out).values()}) == 2  # both ranks committed shards
    verify = subprocess.run([sys.executable, "-m", "latent_vae", "precompute", "--verify", str(out)],
                            env=environment(), capture_output=True, text=True, timeout=120, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_two_nodes_on_localhost_equal_one_process(setup, tmp_path):
    model, images, good, bad = setup
    out, single = tmp_path / "nodes", tmp_path / "single"
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               *command(model, images, out, "--dtype", "fp32", "--batch-size", "1", "--shard-size", "1")],
                              env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, (_, stderr) in zip(nodes, outputs):
        assert node.returncode == 1, stderr[-3000:]  # 1: the three bad images
    assert "world_size" in (out / "summary.json").read_text() and read_summary(out)["world_size"] == 2
    assert len({m.pid for m in read_manifests(out).values()}) == 2  # both nodes committed shards

    precompute_latents(str(model), images, single, resolution=32, batch_size=2, shard_size=3, num_workers=0,
                       dtype="fp32", device="cpu", progress=False)
    rows = {name: {r["key"]: r for s in sorted((path / "data").glob("*.parquet")) for r in pq.read_table(s).to_pylist()}
            for name, path in (("nodes", out), ("single", single))}
    assert sorted(rows["nodes"]) == sorted(rows["single"]) == good
    for key, row in rows["single"].items():  # the same fp32 latents (up to summation order in other batches)
        shape = row["latent_shape"]
        assert_close(unpack(rows["nodes"][key]["mean"], shape, torch.float32), unpack(row["mean"], shape, torch.float32))
    assert read_failures(out) and sorted(f["key"] for f in read_failures(out)) == bad
