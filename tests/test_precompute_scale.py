"""Precompute at dataset scale, in one process: tar shards, bytes-parquet and streamed inputs, stale claims,
reading in place and streaming across ranks and workers (tiny preset, 32-48 px images)."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import assert_close
from PIL import Image

from latent_vae import LatentCodec, build_vae, save_vae
from latent_vae.latents.claims import Heartbeat
from latent_vae.latents.encoding import encode_images
from latent_vae.latents.format import read_failures, read_manifests, unpack
from latent_vae.latents.options import PrecomputeOptions
from latent_vae.latents.precompute import precompute_latents, shard_order
from latent_vae.latents.readers import load_latents
from latent_vae.latents.verify import verify_latents

RES = 32
FAST = {"num_workers": 0, "batch_size": 3, "progress": False, "dtype": "fp32", "resolution": RES}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_vae(build_vae("f16c16-tiny", seed=0), tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def codec(model_dir) -> LatentCodec:
    return LatentCodec.from_pretrained(str(model_dir))


def jpeg(seed: int, size: tuple[int, int] = (40, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[0] // 8, size[1] // 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize((size[1], size[0]), Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def img2dataset_shards(root: Path, shards: int = 3, per_shard: int = 4) -> dict[str, tuple[bytes, str]]:
    """Tar shards as img2dataset writes them (KEY.jpg, KEY.txt, KEY.json); returns key -> (jpeg, caption)."""
    root.mkdir(parents=True, exist_ok=True)
    samples = {}
    for shard in range(shards):
        members = []
        for i in range(per_shard):
            key = f"{shard:05d}{i:04d}"
            image, caption = jpeg(shard * 100 + i), f"caption {shard}-{i}"
            samples[key] = (image, caption)
            members += [(f"{key}.jpg", image), (f"{key}.txt", caption.encode()),
                        (f"{key}.json", json.dumps({"key": key, "url": f"http://x/{key}"}).encode())]
        write_tar(root / f"{shard:05d}.tar", members)
    return samples


def stored(out: Path) -> dict[str, dict]:
    return {row["key"]: row for f in sorted((out / "data").glob("*.parquet")) for row in pq.read_table(f).to_pylist()}


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg(seed))).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.numerics
def test_tar_shards_give_one_output_shard_each_with_keys_captions_and_failures(model_dir, codec, tmp_path):
    samples = img2dataset_shards(tmp_path / "tars")
    # Shard 00003: a sample without an image, a corrupt image, a caption from json only.
    write_tar(tmp_path / "tars" / "00003.tar", [
        ("noimage.txt", b"a caption and nothing else"), ("corrupt.jpg", jpeg(7)[:60]),
        ("json_only.png", _png(9)), ("json_only.json", json.dumps({"caption": "from json"}).encode())])
    # Shard 00004: a download cut short in its third sample.
    write_tar(tmp_path / "whole.tar", [(f"cut{i}.jpg", jpeg(50 + i, (400, 400))) for i in range(4)])
    whole = (tmp_path / "whole.tar").read_bytes()
    (tmp_path / "tars" / "00004.tar").write_bytes(whole[: len(whole) * 5 // 8])
    out = tmp_path / "latents"
    summary = precompute_latents(str(model_dir), str(tmp_path / "tars" / "*.tar"), out, **FAST)
    assert summary.complete and summary.shards == 5
    assert sorted(p.stem for p in (out / "data").glob("*.parquet")) == ["00000", "00001", "00002", "00003", "00004"]
    rows = stored(out)
    assert set(rows) == set(samples) | {"json_only", "cut0", "cut1"}  # what the cut shard held before the cut is kept
    assert rows["json_only"]["text"] == "from json"
    row = rows["000010002"]
    assert row["text"] == "caption 1-2" and json.loads(row["json"])["url"] == "http://x/000010002"
    failures = {f["key"]: f["reason"] for f in read_failures(out)}
    assert failures == {"noimage": "missing", "corrupt": "corrupt", "00004#unread": "unreadable_shard"}
    assert read_manifests(out)["00004"].rows == 2 and verify_latents(out).ok

    # The run's rows are the pure per-batch function's rows on the same decoded images.
    keys = sorted(samples)[:5]
    images = [Image.open(io.BytesIO(samples[k][0])).convert("RGB") for k in keys]
    direct, skipped = encode_images(codec, images, [{"key": k} for k in keys], PrecomputeOptions(**FAST))
    assert not skipped
    for expected in direct:
        got = rows[expected["key"]]
        shape = got["latent_shape"]
        assert shape == expected["latent_shape"] and got["target_size"] == [RES, RES]
        assert_close(unpack(got["mean"], shape, torch.float32), unpack(expected["mean"], shape, torch.float32))


@pytest.mark.slow
@pytest.mark.numerics
def test_bytes_parquet_and_a_streamed_dataset_give_the_tar_shards_rows(model_dir, tmp_path):
    samples = img2dataset_shards(tmp_path / "tars", shards=2)
    (tmp_path / "parquet").mkdir()
    for shard in range(2):  # img2dataset's parquet output: key, caption and the encoded image as bytes
        keys = sorted(k for k in samples if k.startswith(f"{shard:05d}"))
        pq.write_table(pa.table({"key": keys, "caption": [samples[k][1] for k in keys],
                                 "jpg": pa.array([samples[k][0] for k in keys], pa.binary())}),
                       tmp_path / "parquet" / f"{shard:05d}.parquet")
    runs = {"tar": tmp_path / "tars", "parquet": tmp_path / "parquet"}
    results = {}
    for name, data in runs.items():
        out = tmp_path / f"out-{name}"
        summary = precompute_latents(str(model_dir), str(data), out, **FAST)
        assert summary.complete and summary.rows == len(samples) and verify_latents(out).ok
        results[name] = {k: r["mean"] for k, r in stored(out).items()}
    assert results["parquet"] == results["tar"]  # same keys, same bytes
    assert stored(tmp_path / "out-parquet")["000010003"]["caption"] == "caption 1-3"

    # A streamed 🤗 dataset: its own shards become the units of work; keys from its "key" column.
    table = pq.read_table(tmp_path / "parquet" / "00000.parquet")
    features = datasets.Features({"key": datasets.Value("string"), "caption": datasets.Value("string"),
                                  "jpg": datasets.Image()})
    dataset = datasets.Dataset.from_dict({"key": table["key"].to_pylist(), "caption": table["caption"].to_pylist(),
                                          "jpg": [{"bytes": b, "path": None} for b in table["jpg"].to_pylist()]},
                                         features=features)
    stream = dataset.to_iterable_dataset(num_shards=2)
    out = tmp_path / "out-stream"
    summary = precompute_latents(str(model_dir), stream, out, **FAST)
    assert summary.shards == 2 and sorted(p.stem for p in (out / "data").glob("*.parquet")) == [
        "stream-00000", "stream-00001"]
    streamed = stored(out)
    assert sorted(streamed) == sorted(k for k in results["parquet"] if k.startswith("00000"))
    for key, row in streamed.items():  # equal up to float summation order (other batches: other kernels' order)
        assert_close(unpack(row["mean"], row["latent_shape"], torch.float32),
                     unpack(results["parquet"][key], row["latent_shape"], torch.float32))


def dead_pid() -> int:
    """The pid of a process that has exited (a SIGKILLed run's, as far as its claims can tell)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


@pytest.mark.slow
def test_stale_claims_are_taken_over_and_live_ones_waited_for(model_dir, tmp_path):
    samples = img2dataset_shards(tmp_path / "tars", shards=4, per_shard=2)
    out = tmp_path / "latents"
    (out / "claims").mkdir(parents=True)
    # 00000: claimed by a process of this host that is gone (a run killed with SIGKILL): taken over at once.
    # 00001: claimed on another node whose heartbeat stopped long ago: taken over.
    # 00002: claimed on another node that is alive (a fresh heartbeat), then dies: the run waits, then takes over.
    owner = {"host": socket.gethostname(), "pid": dead_pid(), "started": "1", "run_id": "dead-run"}
    (out / "claims" / "00000.claim").write_text(json.dumps(owner))
    (out / "claims" / "00001.claim").write_text(json.dumps({**owner, "host": "node-7", "pid": 1}))
    os.utime(out / "claims" / "00001.claim", (time.time() - 3600, time.time() - 3600))
    (out / "claims" / "00002.claim").write_text(json.dumps({**owner, "host": "node-8", "pid": 1}))
    # 00003: held by an earlier run of this very process (one that stopped on an error): free at once.
    from latent_vae.latents.claims import Owner

    earlier = {**asdict(Owner.this_process()), "run_id": "an-earlier-run"}
    (out / "claims" / "00003.claim").write_text(json.dumps(earlier))
    start = time.monotonic()
    summary = precompute_latents(str(model_dir), str(tmp_path / "tars"), out, claim_timeout=2.0, **FAST)
    waited = time.monotonic() - start
    assert summary.complete and summary.shards_this_run == 4 and sorted(stored(out)) == sorted(samples)
    assert waited >= 2.0  # the live claim was respected until it went stale
    assert not list((out / "claims").iterdir()) and verify_latents(out).ok


def test_decode_threads_keep_a_shards_order_and_what_was_read_before_a_cut(tmp_path):
    # A shard's images may be decoded in a thread pool (one big shard must not be bound to one core): the items
    # still arrive in the shard's order, and a shard cut short keeps the images read before the cut.
    from latent_vae.latents.claims import Owner
    from latent_vae.latents.precompute import ShardReader
    from latent_vae.latents.sources import open_source

    write_tar(tmp_path / "whole.tar", [(f"{i:03d}.jpg", jpeg(i, (40 + 8 * (i % 3), 48))) for i in range(12)])
    whole = (tmp_path / "whole.tar").read_bytes()
    (tmp_path / "tars").mkdir()
    (tmp_path / "tars" / "00000.tar").write_bytes(whole)
    (tmp_path / "tars" / "00001.tar").write_bytes(whole[: len(whole) * 2 // 3])
    source = open_source(str(tmp_path / "tars"))
    options = PrecomputeOptions(resolution=RES, batch_size=3, dtype="fp32")

    def read(threads: int) -> list[tuple]:
        reader = ShardReader(source, [0, 1], tmp_path / f"out{threads}", Owner.this_process(), options, None, threads)
        (tmp_path / f"out{threads}" / "claims").mkdir(parents=True)
        return [(i["kind"], i.get("key") or i.get("metadata", {}).get("key"),
                 i["prepared"].pixels.sum().item() if i["kind"] == "image" else None)
                for chunk in reader for i in chunk]

    one, many = read(1), read(5)
    assert one == many
    kept_before_cut = [key for kind, key, _ in one[one.index(("start", None, None), 1):] if kind == "image"]
    assert 0 < len(kept_before_cut) < 12 and [k for k, _, _ in one].count("failure") == 1


@pytest.mark.slow
def test_debris_of_a_run_killed_while_claiming_blocks_nothing(model_dir, tmp_path):
    # A claim that does not parse (empty, cut short) must not make a rerun wait for the whole claim timeout:
    # it is debris, stale at once, and a dead process's half-published claim is removed.
    samples = img2dataset_shards(tmp_path / "tars", shards=2, per_shard=2)
    claims = tmp_path / "latents" / "claims"
    claims.mkdir(parents=True)
    (claims / "00000.claim").write_bytes(b"")
    (claims / "00001.claim").write_bytes(b'{"host": ')
    leftover = claims / f".00001.claim.{socket.gethostname()}.{dead_pid()}.0123abcd.tmp"
    leftover.write_text("{}")
    start = time.monotonic()
    summary = precompute_latents(str(model_dir), str(tmp_path / "tars"), tmp_path / "latents", claim_timeout=600.0,
                                 **FAST)
    assert time.monotonic() - start < 120  # far below the claim timeout: nothing waited for
    assert summary.complete and summary.shards_this_run == 2 and sorted(stored(tmp_path / "latents")) == sorted(samples)
    assert not list(claims.iterdir())


def test_shard_order_prefers_a_ranks_own_shards_then_helps_others():
    orders = [shard_order(10, rank, 3) for rank in range(3)]
    assert orders[1][:3] == [1, 4, 7] and all(sorted(o) == list(range(10)) for o in orders)
    assert len({o[4] for o in orders}) == 3  # ranks done early help in different places


@pytest.fixture(scope="module")
def latent_dir(model_dir, tmp_path_factory) -> Path:
    """A finished latent dataset of 14 rows in 7 shards (one row group each)."""
    root = tmp_path_factory.mktemp("dataset")
    img2dataset_shards(root / "tars", shards=7, per_shard=2)
    precompute_latents(str(model_dir), str(root / "tars"), root / "latents", **FAST)
    return root / "latents"


@pytest.mark.slow
def test_load_latents_reads_in_place_without_a_cache(latent_dir, tmp_path, monkeypatch):
    cache = tmp_path / "hf_cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    root = latent_dir.parent
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    dataset = load_latents(latent_dir, sample=False)
    items = [dataset[i] for i in torch.randperm(len(dataset)).tolist()]  # random access, as a shuffled loader
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2,
                                                   collate_fn=__import__("latent_vae").collate_latents)))
    assert len(dataset) == 14 and len({i["key"] for i in items}) == 14 and batch["latents"].shape[0] == 4
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before  # no new or changed file anywhere
    assert not cache.exists()


@pytest.mark.slow
def test_streaming_reads_every_row_once_over_two_ranks_and_two_workers(latent_dir):
    everything = load_latents(latent_dir, sample=False)
    keys = everything.column("key")
    seen = []
    for rank in range(2):
        stream = load_latents(latent_dir, sample=False, streaming=True, rank=rank, world_size=2, seed=3)
        assert isinstance(stream, torch.utils.data.IterableDataset)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        mine = [item["key"] for item in loader]
        assert mine  # both ranks read something
        seen += mine
    assert Counter(seen) == Counter(keys)  # every row exactly once over 2 ranks x 2 workers
    # A new epoch reads the same rows in another order; the mean latents are those of the map-style reader.
    stream = load_latents(latent_dir, sample=False, streaming=True, rank=0, world_size=1, seed=3)
    first = [i["key"] for i in stream]
    stream.set_epoch(1)
    second = {i["key"]: i["latents"] for i in stream}
    assert sorted(first) == sorted(second) and first != list(second)
    index = keys.index(first[0])
    assert_close(second[first[0]], everything[index]["latents"])


@pytest.mark.slow
@pytest.mark.parametrize("failing", ["encode_moments", "moment_rows"])  # the encoder (this thread), the writer thread
def test_a_run_that_fails_leaves_nothing_that_blocks_the_next_run_in_the_same_process(model_dir, tmp_path,
                                                                                       monkeypatch, failing):
    from latent_vae.latents import precompute

    samples = img2dataset_shards(tmp_path / "tars", shards=3, per_shard=4)
    real, calls = getattr(precompute, failing), []

    def fails_on_the_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory, say")
        return real(*args, **kwargs)

    monkeypatch.setattr(precompute, failing, fails_on_the_third_batch)
    out = tmp_path / "latents"
    options = {**FAST, "batch_size": 2, "num_workers": 1, "claim_timeout": 120.0}
    with pytest.raises(RuntimeError, match="out of memory"):
        precompute_latents(str(model_dir), str(tmp_path / "tars"), out, **options)
    assert not list((out / "staging").iterdir())  # the open shard's half-written file is gone
    # the heartbeat is the process's: a claim of the failed run left in it would be beaten during later runs
    assert not Heartbeat.of_this_process(options["claim_timeout"] / 4).paths
    start = time.monotonic()
    summary = precompute_latents(str(model_dir), str(tmp_path / "tars"), out, **options)
    assert time.monotonic() - start < 60  # no waiting for the claim timeout
    assert summary.complete and sorted(stored(out)) == sorted(samples) and verify_latents(out).ok
