"""The Ray engine on a local Ray cluster (2 CPUs, CPU encoders): the local engine's dataset, exactly once through a
SIGKILLed driver, a killed encoder actor and a second job into one --out, a broken image as one failure row, and
bucket to bucket on a local S3 server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import assert_close
from test_precompute_scale import img2dataset_shards, write_tar

from latent_vae import build_vae, save_vae
from latent_vae.latents.format import MANIFEST_DIR, read_failures, read_manifests, unpack
from latent_vae.latents.precompute import precompute_latents
from latent_vae.latents.readers import load_latents
from latent_vae.latents.verify import verify_latents

# The tiny fresh model's posterior is noise, which precompute says; not the subject here.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::latent_vae.utils.errors.PosteriorNoiseWarning")]
REPO = Path(__file__).resolve().parents[1]
ray = pytest.importorskip("ray", reason="the Ray engine's tests need Ray: pip install 'latent-vae[ray]'")

OPTIONS = {"resolution": 32, "batch_size": 2, "dtype": "fp32", "progress": False}


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (starting one costs seconds): its address, for drivers in subprocesses.
    Its workers import this checkout (PYTHONPATH), whatever is installed."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path, set[str]]:
    """A saved tiny model and img2dataset-style tar shards: 6 shards of 4 images, one of them corrupt."""
    root = tmp_path_factory.mktemp("ray")
    model = save_vae(build_vae("f16c16-tiny", seed=0), root / "model")
    samples = img2dataset_shards(root / "tars", shards=6, per_shard=4)
    write_tar(root / "tars" / "00006.tar", [("broken.jpg", b"\xff\xd8\xff not a jpeg"), ("broken.txt", b"x")])
    return model, root / "tars", set(samples)


def stored(out: Path) -> dict[str, dict]:
    return {row["key"]: row for f in sorted((out / "data").glob("*.parquet")) for row in pq.read_table(f).to_pylist()}


def stored_keys(out: Path) -> list[str]:
    return [k for f in sorted((out / "data").glob("*.parquet"))
            for k in pq.read_table(f, columns=["key"]).column("key").to_pylist()]


@pytest.fixture(scope="module")
def ray_dataset(cluster, inputs, tmp_path_factory) -> Path:
    model, tars, _ = inputs
    out = tmp_path_factory.mktemp("ray_out") / "latents"
    summary = precompute_latents(str(model), str(tars), out, engine="ray", **OPTIONS)
    assert summary.complete, summary.problems
    return out


def test_the_ray_engine_gives_the_local_engines_keys_and_fp32_latents(ray_dataset, inputs, tmp_path):
    model, tars, keys = inputs
    local = tmp_path / "local"
    precompute_latents(str(model), str(tars), local, num_workers=1, device="cpu", **OPTIONS)
    by_ray, by_local = stored(ray_dataset), stored(local)
    assert set(by_ray) == set(by_local) == keys
    for key in keys:  # other batches, so other summation orders: equal up to fp32 reordering
        for column in ("mean", "std"):
            assert_close(unpack(by_ray[key][column], by_ray[key]["latent_shape"], torch.float32),
                         unpack(by_local[key][column], by_local[key]["latent_shape"], torch.float32))
        assert by_ray[key]["text"] == by_local[key]["text"]
    for name, manifest in read_manifests(ray_dataset).items():  # the posterior's sums, shard by shard
        assert manifest.posterior["values"] == read_manifests(local)[name].posterior["values"]
        assert manifest.posterior["noise_ratio"] == pytest.approx(read_manifests(local)[name].posterior["noise_ratio"],
                                                                  rel=1e-5, nan_ok=True)
    assert verify_latents(ray_dataset).ok
    assert len(load_latents(ray_dataset, model=str(model), resolution=32)) == len(keys)


def test_a_broken_image_is_one_failure_row_and_its_shard_is_committed(ray_dataset):
    failures = read_failures(ray_dataset)
    assert [(f["key"], f["reason"]) for f in failures] == [("broken", "unsupported")]  # as the local engine says
    assert (ray_dataset / MANIFEST_DIR / "00006.json").is_file()


def driver_command(cluster: str, model: Path, tars: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "latent_vae", "precompute", "--engine", "ray", "--ray-address", cluster,
            "--model", str(model), "--data", str(tars), "--out", str(out), "--resolution", "32", "--batch-size", "1",
            "--dtype", "fp32", "--decoders", "1", "--no-progress"]


def wait_for_manifests(out: Path, count: int, seconds: float, process: subprocess.Popen | None = None) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done = len(list((out / MANIFEST_DIR).glob("*.json")))
        if done >= count or (process is not None and process.poll() is not None):
            return done
        time.sleep(0.02)
    raise AssertionError(f"no {count} committed shard(s) in {out} after {seconds} s")


def test_a_driver_killed_after_its_first_commit_then_rerun_stores_every_key_once(cluster, inputs, tmp_path):
    model, tars, keys = inputs
    out = tmp_path / "latents"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    driver = subprocess.Popen(driver_command(cluster, model, tars, out), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        committed = wait_for_manifests(out, 1, 300, driver)
        assert driver.poll() is None, driver.communicate()[0][-3000:]
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    finally:
        driver.kill()
    assert 1 <= committed < 7, f"killed after {committed} of 7 shards: the kill must land mid-run"
    rerun = subprocess.run(driver_command(cluster, model, tars, out), env=env, capture_output=True, text=True,
                           timeout=600, check=False)
    assert rerun.returncode == 1, rerun.stderr[-3000:]  # 1: one input failed (the broken image), listed
    counts = Counter(stored_keys(out))
    assert set(counts) == keys and set(counts.values()) == {1}
    assert verify_latents(out).ok
    assert [f["key"] for f in read_failures(out)] == ["broken"]


def test_a_second_job_into_the_same_out_at_the_same_time_stores_every_key_once(cluster, inputs, tmp_path):
    """The second job has a local Ray of its own, as one started by mistake elsewhere would: on one 2-CPU cluster,
    each job's encoder actor would hold a CPU and leave none for either job's decode tasks."""
    model, tars, keys = inputs
    out = tmp_path / "latents"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    first = driver_command(cluster, model, tars, out)
    second = [word for word in first if word not in ("--ray-address", cluster)]
    jobs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for command in (first, second)]
    logs = [job.communicate(timeout=600)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [1, 1], "\n".join(log[-2000:] for log in logs)
    counts = Counter(stored_keys(out))
    assert set(counts) == keys and set(counts.values()) == {1}
    assert verify_latents(out).ok


def encoder_pids() -> set[int]:
    """The processes of this cluster's encoder actors (Ray names an actor's process after its class)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"MapBatches(Encoder)" in (entry / "cmdline").read_bytes():
                pids.add(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the actor's process in /proc")
def test_an_encoder_actor_killed_mid_run_is_replaced_and_nothing_is_lost_or_doubled(cluster, inputs, tmp_path):
    model, tars, keys = inputs
    out = tmp_path / "latents"
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = precompute_latents(str(model), str(tars), out, engine="ray", decoders=1,
                                                   **{**OPTIONS, "batch_size": 1})
        except BaseException as error:  # noqa: BLE001 -- raised again in the test's thread
            result["error"] = error

    others = encoder_pids()  # actors of earlier runs that Ray has not reaped yet are not this run's
    thread = threading.Thread(target=run)
    thread.start()
    committed = wait_for_manifests(out, 1, 300)
    before = encoder_pids() - others
    assert len(before) == 1, before
    os.kill(next(iter(before)), signal.SIGKILL)
    replaced = set()
    while thread.is_alive() and not replaced:  # Ray restarts the actor (it reloads the model) and retries its batch
        replaced = encoder_pids() - before - others
        time.sleep(0.05)
    thread.join(600)
    assert "error" not in result, result.get("error")
    assert committed < 7, "the actor must be killed mid-run"
    assert result["summary"].complete and result["summary"].rows == len(keys)
    counts = Counter(stored_keys(out))
    assert set(counts) == keys and set(counts.values()) == {1}
    assert verify_latents(out).ok
    assert replaced, "a new encoder actor took the killed one's place"


def test_without_ray_the_engine_says_how_to_install_it_in_one_line(monkeypatch):
    import latent_vae.latents.ray_engine as engine

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ValueError, match=r"^--engine ray needs Ray Data: pip install 'latent-vae\[ray\]'$"):
        engine.import_ray()


def test_bucket_to_bucket_on_ray_gives_every_key_once(cluster, inputs, tmp_path):
    """tar shards in an S3 bucket (moto's server on localhost) to latents in the bucket: the readers stream the
    shards from the store, the driver commits through it. Credentials travel in the storage options, since Ray's
    workers do not see this process's environment."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from benchmarks.local_s3 import S3Server

    model, tars, keys = inputs
    server = S3Server()
    try:
        server.make_bucket("photos")
        server.upload(tars, "photos", "shards")
        storage = {"endpoint_url": server.endpoint, "key": "testing", "secret": "testing",
                   "client_kwargs": {"region_name": "us-east-1"}}
        summary = precompute_latents(str(model), "s3://photos/shards/*.tar", "s3://photos/lat", engine="ray",
                                     storage_options=storage, **OPTIONS)
        assert summary.complete and summary.rows == len(keys) and summary.failures == 1, summary.line()
        report = verify_latents("s3://photos/lat", storage_options=storage)
        assert report.ok and report.rows == len(keys), report.problems
        streamed = load_latents("s3://photos/lat", storage_options=storage, streaming=True, sample=False)
        assert sorted(item["key"] for item in streamed) == sorted(keys)
    finally:
        server.stop()
