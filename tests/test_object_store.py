"""Latent datasets on an object store: a real S3-protocol server on localhost (moto's), started here, and a proxy
that injects throttling, resets and lost answers. Dummy credentials; nothing leaves the machine."""

from __future__ import annotations

import errno
import json
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
from cli_harness import run_cli
from test_precompute_scale import img2dataset_shards, jpeg, write_tar

from benchmarks.local_s3 import DUMMY_CREDENTIALS, FaultProxy, S3Server, wait_for
from latent_vae import build_vae, save_vae
from latent_vae.latents.claims import Claims, Owner
from latent_vae.latents.format import read_failures, read_manifests
from latent_vae.latents.locations import open_store
from latent_vae.latents.precompute import precompute_latents
from latent_vae.latents.readers import load_latents
from latent_vae.latents.verify import verify_latents
from latent_vae.utils.errors import StorageError, storage_failure

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")
# The tiny fresh model's posterior is noise, which precompute says; not the subject here.
pytestmark = pytest.mark.filterwarnings("ignore::latent_vae.utils.errors.PosteriorNoiseWarning")

RES = 32
FAST = {"num_workers": 0, "batch_size": 3, "progress": False, "dtype": "fp32", "resolution": RES}
REPO = Path(__file__).resolve().parents[1]
# Few retries in the tests that exhaust them; the defaults (10, with backoff) are for real stores.
IMPATIENT = {"config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}}}


@pytest.fixture(scope="module")
def server():
    saved = {k: os.environ.get(k) for k in (*DUMMY_CREDENTIALS, "AWS_ENDPOINT_URL")}
    s3 = S3Server()
    os.environ.update(DUMMY_CREDENTIALS)  # in-process clients pass the endpoint in storage options
    yield s3
    s3.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_vae(build_vae("f16c16-tiny", seed=0), tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def shards(server, tmp_path_factory):
    """Bucket `photos`: 4 img2dataset tar shards of 3 images and a fifth with one broken image; the good keys."""
    root = tmp_path_factory.mktemp("tars")
    samples = img2dataset_shards(root, shards=4, per_shard=3)
    write_tar(root / "00004.tar", [("ok.jpg", jpeg(7)), ("broken.jpg", b"not a jpeg")])
    server.make_bucket("photos")
    server.upload(root, "photos", "shards")
    return sorted([*samples, "ok"])


def options(endpoint: str, **more) -> dict:
    return {"endpoint_url": endpoint, **more}


def stored_keys(url: str, storage_options: dict) -> list[str]:
    store = open_store(url, storage_options)
    return [k for m in read_manifests(store).values()
            for k in pq.read_table(store.open_input(f"data/{m.data_file}"), columns=["key"]).column("key").to_pylist()]


def environment(endpoint: str) -> dict[str, str]:
    return {**os.environ, **DUMMY_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def command(model: Path, out: str, *more: str) -> list[str]:
    return ["-m", "latent_vae", "precompute", "--model", str(model), "--data", "s3://photos/shards/*.tar",
            "--out", out, "--resolution", str(RES), "--dtype", "fp32", "--batch-size", "3", "--num-workers", "1",
            "--no-progress", "--claim-timeout", "30", *more]


# -- in and out of a bucket ----------------------------------------------------------------------------------------


def test_bucket_to_bucket_precompute_reads_back_map_style_and_streaming(server, shards, model_dir):
    storage = options(server.endpoint)
    code, out, err = run_cli("precompute", "--model", model_dir, "--data", "s3://photos/shards/*.tar",
                             "--out", "s3://photos/lat-cli", "--resolution", RES, "--dtype", "fp32", "--no-progress",
                             "--num-workers", 0, "--storage-options", json.dumps(storage))
    assert code == 1, err  # 1: the broken image failed, and is named
    assert "13 latents" in out and "1 failed" in out and "broken" in err
    assert "s3://photos/lat-cli/failures.jsonl" in err
    assert sorted(stored_keys("s3://photos/lat-cli", storage)) == shards
    assert [f["key"] for f in read_failures(open_store("s3://photos/lat-cli", storage))] == ["broken"]
    report = verify_latents("s3://photos/lat-cli", storage_options=storage)
    assert report.ok and report.rows == 13, report.problems
    mapped = load_latents("s3://photos/lat-cli", storage_options=storage, sample=False)
    assert len(mapped) == 13 and mapped[5]["latents"].shape == (16, RES // 16, RES // 16)
    streamed = load_latents("s3://photos/lat-cli", storage_options=storage, streaming=True, sample=False)
    assert sorted(item["key"] for item in streamed) == shards
    code, out, err = run_cli("precompute", "--verify", "s3://photos/lat-cli", "--storage-options", json.dumps(storage))
    assert code == 0 and "OK" in out and "every key once" in out, err


def test_a_rerun_removes_what_a_losing_attempt_left_and_verify_names_it(server, shards, model_dir):
    storage = options(server.endpoint)
    url = "s3://photos/lat-orphans"
    precompute_latents(str(model_dir), "s3://photos/shards/*.tar", url, storage_options=storage, **FAST)
    client = server.client()
    client.put_object(Bucket="photos", Key="lat-orphans/data/00001.deadbeef-0000.parquet", Body=b"a loser's copy")
    report = verify_latents(url, storage_options=storage)
    assert not report.ok and "00001.deadbeef-0000.parquet" in report.problems[0]
    summary = precompute_latents(str(model_dir), "s3://photos/shards/*.tar", url, storage_options=storage, **FAST)
    assert summary.complete and summary.encoded_this_run == 0
    assert "lat-orphans/data/00001.deadbeef-0000.parquet" not in server.keys("photos", "lat-orphans")


def test_a_takeover_race_on_one_stale_claim_has_one_winner(server):
    server.make_bucket("claims-race")
    store = open_store("s3://claims-race/lat", options(server.endpoint))
    dead = json.dumps({"host": "node-gone", "pid": 1, "started": "1", "run_id": "dead"}).encode()
    for round_ in range(2):
        name = f"{round_:05d}"
        assert store.publish(f"claims/{name}.claim", dead)
        # The store's clock counts whole seconds: a timeout of 2 s tells the winner's fresh claim from a stale one.
        time.sleep(3.1)
        contenders = [Claims(store, Owner("host", 100 + i, None, f"run-{i}"), timeout=2.0) for i in range(6)]
        won: list[str] = []
        start = threading.Barrier(len(contenders))
        threads = [threading.Thread(target=contend, args=(c, name, start, won)) for c in contenders]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        holder = json.loads(store.read_bytes(f"claims/{name}.claim"))["run_id"]
        assert won == [holder]


def contend(claims: Claims, name: str, start: threading.Barrier, won: list[str]) -> None:
    start.wait()
    if claims.try_claim(name):
        won.append(claims.owner.run_id)


def test_a_heartbeat_keeps_a_claim_and_a_taken_over_claim_stops_beating(server):
    server.make_bucket("claims-beat")
    store = open_store("s3://claims-beat/lat", options(server.endpoint))
    mine = Claims(store, Owner("host", 1, None, "mine"), timeout=60)
    assert mine.try_claim("00000")
    beat = mine.handle("00000")
    before = store.seen("claims/00000.claim")
    assert beat.beat() and store.seen("claims/00000.claim").version != before.version
    theirs = Claims(store, Owner("host", 2, None, "theirs"), timeout=60)
    assert not theirs.try_claim("00000")  # live: not taken
    assert store.take_over("claims/00000.claim", store.seen("claims/00000.claim"), b'{"run_id": "theirs"}')
    assert not beat.beat()  # taken over: the heartbeat lets go, and release leaves the new holder's claim
    mine.release("00000")
    assert store.exists("claims/00000.claim")


# -- many runs into one prefix -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_concurrent_runs_and_a_killed_one_write_every_key_once(server, shards, model_dir):
    url, env = "s3://photos/lat-race", environment(server.endpoint)
    argv = [sys.executable, *command(model_dir, url)]
    killed = subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: any(k.startswith("lat-race/manifests/") for k in server.keys("photos", "lat-race")),
                        timeout=180), "no shard committed in time"
    finally:
        os.killpg(killed.pid, signal.SIGKILL)  # its own session: the run and its worker
        killed.wait()
    runs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [run.communicate(timeout=400) for run in runs]
    assert [run.returncode for run in runs] == [1, 1], results  # 1: the broken image, named
    rerun = subprocess.run(argv, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 1 and "13 latents (0 this run)" in rerun.stdout, rerun.stderr
    storage = options(server.endpoint)
    assert Counter(stored_keys(url, storage)) == Counter(shards)
    assert verify_latents(url, storage_options=storage).ok
    data = [k for k in server.keys("photos", "lat-race/data/")]
    assert len(data) == 5  # the killed run's uncommitted attempt was removed


@pytest.mark.slow
def test_throttling_resets_and_lost_answers_are_retried(server, shards, model_dir):
    proxy = FaultProxy(server.port, share=0.15, budget=60, seed=1)
    try:
        storage = options(proxy.endpoint)
        summary = precompute_latents(str(model_dir), "s3://photos/shards/*.tar", "s3://photos/lat-faults",
                                     storage_options=storage, **FAST)
    finally:
        proxy.stop()
    counts = proxy.counts
    assert counts.slowdowns and counts.resets and counts.lost_answers, counts
    assert summary.complete and summary.rows == 13 and summary.failures == 1
    assert Counter(stored_keys("s3://photos/lat-faults", options(server.endpoint))) == Counter(shards)
    assert verify_latents("s3://photos/lat-faults", storage_options=options(server.endpoint)).ok


@pytest.mark.slow
def test_a_fault_past_the_retries_fails_the_shard_in_flight_and_the_same_command_resumes(server, shards, model_dir):
    proxy = FaultProxy(server.port, share=0.0)
    url = "s3://photos/lat-outage"

    def outage_after_first_commit():
        wait_for(lambda: any(k.startswith("lat-outage/manifests/") for k in server.keys("photos", "lat-outage")))
        proxy.share, proxy.budget, proxy.kinds = 1.0, 10**6, ("reset",)

    threading.Thread(target=outage_after_first_commit, daemon=True).start()
    code, out, err = run_cli("precompute", "--model", model_dir, "--data", "s3://photos/shards/*.tar", "--out", url,
                             "--resolution", RES, "--dtype", "fp32", "--no-progress", "--num-workers", 0,
                             "--batch-size", 1, "--storage-options", json.dumps(options(proxy.endpoint, **IMPATIENT)))
    proxy.stop()
    assert code == 2, (out, err)
    [line] = err.strip().splitlines()
    assert line.startswith("latent-vae precompute: error: s3://photos/lat-outage") and "run the same command" in line
    committed = read_manifests(open_store(url, options(server.endpoint)))
    assert committed and all(not m.failures or m.input_shard == "00004" for m in committed.values())
    code, out, err = run_cli("precompute", "--model", model_dir, "--data", "s3://photos/shards/*.tar", "--out", url,
                             "--resolution", RES, "--dtype", "fp32", "--no-progress", "--num-workers", 0,
                             "--storage-options", json.dumps(options(server.endpoint)))
    assert code == 1 and "13 latents" in out, err
    assert Counter(stored_keys(url, options(server.endpoint))) == Counter(shards)


# -- refused before any work -----------------------------------------------------------------------------------


def test_a_missing_bucket_is_one_line_naming_the_url(server, shards, model_dir):
    code, _, err = run_cli("precompute", "--model", model_dir, "--data", "s3://photos/shards/*.tar",
                           "--out", "s3://no-such-bucket/lat", "--storage-options",
                             json.dumps(options(server.endpoint)))
    assert code == 2 and err.strip() == ("latent-vae precompute: error: s3://no-such-bucket/lat: no such bucket "
                                         "(create it, or check its name and the endpoint)"), err
    code, _, err = run_cli("precompute", "--verify", "s3://no-such-bucket/lat", "--storage-options",
                           json.dumps(options(server.endpoint)))
    assert code == 2 and "s3://no-such-bucket/lat: no such bucket" in err


def test_missing_credentials_and_a_denied_permission_are_one_line(server, shards, model_dir, tmp_path):
    env = {k: v for k, v in environment(server.endpoint).items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=server.endpoint, AWS_EC2_METADATA_DISABLED="true",
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"))
    done = subprocess.run([sys.executable, *command(model_dir, "s3://photos/lat-nocreds")], check=False,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "s3://photos/lat-nocreds: no credentials found" in done.stderr

    proxy = FaultProxy(server.port, share=0.0)
    proxy.deny_writes = True
    try:
        code, _, err = run_cli("precompute", "--model", model_dir, "--data", "s3://photos/shards/*.tar", "--out",
                               "s3://photos/lat-denied", "--storage-options", json.dumps(options(proxy.endpoint)))
    finally:
        proxy.stop()
    assert code == 2 and err.count("\n") == 1 and "s3://photos/lat-denied: access denied" in err, err


def test_a_store_without_conditional_writes_is_refused_unless_one_writer_is_promised(model_dir, tmp_path):
    images = tmp_path / "tars"
    img2dataset_shards(images, shards=2, per_shard=2)
    with pytest.raises(StorageError, match="memory://lat.*conditional writes.*--single-writer"):
        precompute_latents(str(model_dir), str(images), "memory://lat", **FAST)
    summary = precompute_latents(str(model_dir), str(images), "memory://lat", single_writer=True, **FAST)
    assert summary.complete and summary.rows == 4 and len(load_latents("memory://lat")) == 4


# -- the disk and the data ---------------------------------------------------------------------------------------


def test_a_full_disk_mid_run_names_the_file_and_the_same_command_resumes(model_dir, tmp_path, monkeypatch):
    from latent_vae.latents import storage

    images = tmp_path / "tars"
    samples = img2dataset_shards(images, shards=3, per_shard=2)
    out = tmp_path / "latents"
    real = storage.LocalStore.new_data_file
    opened = []

    class FullDisk:
        def __init__(self, sink):
            self.sink = sink

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.sink, name)

    def second_file_hits_a_full_disk(self, shard, attempt):
        staged = real(self, shard, attempt)
        opened.append(staged.key)
        if len(opened) == 2:
            staged.sink = FullDisk(staged.sink)
        return staged

    monkeypatch.setattr(storage.LocalStore, "new_data_file", second_file_hits_a_full_disk)
    argv = ["precompute", "--model", model_dir, "--data", images, "--out", out, "--resolution", RES,
            "--dtype", "fp32", "--no-progress", "--num-workers", 0]
    code, _, err = run_cli(*argv)
    assert code == 2
    [line] = err.strip().splitlines()
    assert line == (f"latent-vae precompute: error: {out / opened[1]}: No space left on device; the shards committed "
                    "so far are kept: run the same command again to resume (after freeing space or fixing the "
                    "permission, if that was the cause)")
    monkeypatch.setattr(storage.LocalStore, "new_data_file", real)
    code, out_text, err = run_cli(*argv)
    assert code == 0 and "6 latents" in out_text, err
    assert verify_latents(out).ok and len(load_latents(out)) == len(samples)


def test_pyarrows_disk_full_message_becomes_its_reason():
    error = OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")
    assert storage_failure("/data/x.parquet", error).startswith("/data/x.parquet: No space left on device; the shards")


def test_repeated_keys_in_a_shard_are_named_when_renamed(model_dir, tmp_path, capfd):
    (tmp_path / "tars").mkdir()
    write_tar(tmp_path / "tars" / "00000.tar", [(f"{key}.jpg", jpeg(i)) for i, key in enumerate("ababa")])
    summary = precompute_latents(str(model_dir), str(tmp_path / "tars"), tmp_path / "latents", **FAST)
    assert summary.rows == 5
    lines = [line for line in capfd.readouterr().err.splitlines() if "repeated" in line]
    assert lines == ["latent-vae: 00000: 3 repeated key(s) in the shard, stored as KEY#n: a#2, b#2, a#3"]


def test_parquet_shards_and_an_image_folder_stream_from_the_bucket(server, model_dir, tmp_path):
    import io

    import pyarrow as pa
    from PIL import Image

    server.make_bucket("mixed")
    client = server.client()
    for shard in range(2):
        table = pa.table({"key": [f"p{shard}-{i}" for i in range(3)], "jpg": [jpeg(shard * 10 + i) for i in range(3)],
                          "caption": [f"c{i}" for i in range(3)]})
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        client.put_object(Bucket="mixed", Key=f"parquet/{shard:05d}.parquet", Body=buffer.getvalue())
    for i in range(3):
        buffer = io.BytesIO()
        Image.open(io.BytesIO(jpeg(i))).save(buffer, "PNG")
        client.put_object(Bucket="mixed", Key=f"folder/sub/{i}.png", Body=buffer.getvalue())
        client.put_object(Bucket="mixed", Key=f"folder/sub/{i}.txt", Body=f"caption {i}".encode())
    storage = options(server.endpoint)
    summary = precompute_latents(str(model_dir), "s3://mixed/parquet/*.parquet", "s3://mixed/out-parquet",
                                 storage_options=storage, **FAST)
    assert summary.complete and summary.rows == 6
    expected = sorted(f"p{shard}-{i}" for shard in range(2) for i in range(3))
    assert sorted(stored_keys("s3://mixed/out-parquet", storage)) == expected
    summary = precompute_latents(str(model_dir), "s3://mixed/folder", tmp_path / "out-folder", storage_options=storage,
                                 **FAST)
    assert summary.complete and summary.rows == 3
    captions = sorted(item["text"] for item in load_latents(tmp_path / "out-folder", sample=False))
    assert captions == ["caption 0", "caption 1", "caption 2"]
