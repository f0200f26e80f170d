"""Precompute into and out of an S3-protocol server against the local disk, in one run: the protocol's cost.

Runs of `precompute_latents` on the same img2dataset-style tar shards, one process each, interleaved:

- `local disk`: shards read from a folder, the latent dataset written to a folder (hard links and renames);
- `S3 -> S3`: shards streamed from a bucket of a local S3 server (moto's, a process on the loopback interface),
  the dataset written to the same bucket (`If-None-Match` claims and manifests, data written in place,
  `If-Match` heartbeats);
- `S3 -> S3, faults`: the same through a proxy that answers 503 SlowDown, resets connections, and loses answers to
  requests that took effect, for a share of the requests (`--fault-share`), retried by the clients.

Each dataset is then verified (manifests, checksums, every key once) and read back once, map-style, with
`load_latents`. The local server keeps its buckets in memory: the ratios measure the protocol's requests and
the clients' work, not a network's latency or bandwidth (a real bucket adds tens of milliseconds a request).

    python -m benchmarks.object_store
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

from benchmarks.local_s3 import DUMMY_CREDENTIALS, FaultProxy, S3Server
from benchmarks.precompute_scale import make_shards
from benchmarks.report import write_results
from latent_vae import build_vae, save_vae
from latent_vae.latents.precompute import precompute_latents
from latent_vae.latents.readers import load_latents
from latent_vae.latents.verify import verify_latents
from latent_vae.utils.errors import PosteriorNoiseWarning

NAME = "object_store"


def run(model: Path, data: str, out: str, storage: dict | None, args, expected: int | None = None) -> dict:
    """One precompute, its verification and one map-style read of every row; the figures of a table row."""
    start = time.perf_counter()
    summary = precompute_latents(str(model), data, out, storage_options=storage, resolution=args.size,
                                 batch_size=args.batch_size, num_workers=args.workers, device="cpu", progress=False)
    seconds = time.perf_counter() - start
    report = verify_latents(out, storage_options=storage)
    start = time.perf_counter()
    dataset = load_latents(out, storage_options=storage, sample=False)
    for index in range(len(dataset)):
        dataset[index]
    read = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "images/s": round(summary.rows / seconds, 1), "read back s": round(read, 2),
            "verified": "every key once" if report.ok and summary.rows == (expected or args.shards * args.per_shard)
            else "; ".join(report.problems) or f"{summary.rows} rows"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--model", default="f16c16-tiny", help="preset (fresh weights); tiny: the data path dominates")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    parser.add_argument("--fault-share", type=float, default=0.05, help="share of requests the proxy spoils")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant, interleaved; the fastest is kept")
    parser.add_argument("--name", default=NAME, help="results file stem")
    args = parser.parse_args()
    # Fresh weights have a noisy posterior; the latents are read as means here, and the warning is not the subject.
    warnings.simplefilter("ignore", PosteriorNoiseWarning)

    workdir = Path(tempfile.mkdtemp(prefix="object_store_"))
    server = S3Server(separate_process=True)  # this process forks DataLoader workers
    os.environ.update(DUMMY_CREDENTIALS)
    try:
        shards, model = workdir / "shards", workdir / "model"
        make_shards(shards, args.shards, args.per_shard, args.size)
        save_vae(build_vae(args.model, seed=0), model)
        server.make_bucket("bench")
        server.upload(shards, "bench", "shards")

        proxy = FaultProxy(server.port, share=args.fault_share, budget=10**6, seed=0)
        variants = {"local disk": (str(shards), str(workdir / "latents{}"), None),
                    "S3 -> S3": ("s3://bench/shards/*.tar", "s3://bench/latents{}", {"endpoint_url": server.endpoint}),
                    f"S3 -> S3, {args.fault_share:.0%} of requests spoiled":
                        ("s3://bench/shards/*.tar", "s3://bench/faults{}", {"endpoint_url": proxy.endpoint})}
        try:
            run(model, str(shards / "00000.tar"), str(workdir / "warm-up"), None, args, expected=args.per_shard)
            # Interleaved repeats, the fastest kept: the machine is shared, and the first run pays start-up costs.
            trials: dict[str, list[dict]] = {name: [] for name in variants}
            for repeat in range(args.repeats):
                for name, (data, out, storage) in variants.items():
                    trials[name].append(run(model, data, out.format(repeat), storage, args))
        finally:
            proxy.stop()
        rows = [{"variant": name, **min(results, key=lambda r: r["seconds"])} for name, results in trials.items()]
        faults = proxy.counts
        for row in rows:
            row["relative"] = f"{rows[0]['seconds'] / row['seconds']:.2f}x"
        notes = (f"{args.shards} tar shards of {args.per_shard} {args.size}-px JPEGs, `{args.model}`, one process with "
                 f"{args.workers} DataLoader worker(s), batch {args.batch_size}, CPU; the fastest of {args.repeats} "
                 "interleaved runs of each, after a warm-up run. The S3 server is moto's, in "
                 "a process of its own, on the loopback interface. Faults injected by the proxy: "
                 f"{faults.slowdowns} 503 "
                 f"SlowDown, {faults.resets} connection resets, {faults.lost_answers} lost answers in "
                 f"{faults.requests} requests (all its runs), all retried. Command: "
                 f"`{' '.join(['python -m benchmarks.object_store', *sys.argv[1:]])}`.")
        write_results(args.name, rows, notes=notes,
                      columns=["variant", "seconds", "images/s", "relative", "read back s", "verified"],
                      extra={"command": [sys.executable, "-m", "benchmarks.object_store", *sys.argv[1:]],
                             "trials": trials, "faults": vars(faults)})
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
