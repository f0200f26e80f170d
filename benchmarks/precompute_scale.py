"""Precompute at scale, in small: img2dataset-style tar shards, two processes into one --out, SIGKILL, rerun.

- `bare encode`: `LatentCodec.encode` on the same images already decoded and cropped (the encoder alone), in as
  many processes of one thread as the runs, started together, measured just before and after the clean run (the
  machine is shared: the mean of the two stands for its load during the run);
- `clean run`: two `python -m latent_vae precompute` processes started together into one empty --out
  (they share the shards through claim files), timed from start until both have exited;
- `killed run`: the same, both killed with SIGKILL once half of the shards are committed, then the same two
  commands again; the dataset is then verified (every shard's manifest and checksum, every key exactly once)
  and compared key by key with the input. The resume's cost: killed run + rerun - clean run.

    python -m benchmarks.precompute_scale          # 5,000 64-px JPEGs in 20 tar shards, f16c16-narrow, CPU
    python -m benchmarks.precompute_scale --model f16c16-tiny --name precompute_scale_tiny   # the data path alone
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from benchmarks.report import write_results
from latent_vae import LatentCodec, build_vae, save_vae
from latent_vae.images.reading import load_image
from latent_vae.latents.encoding import prepare_image
from latent_vae.latents.format import read_manifests
from latent_vae.latents.options import PrecomputeOptions
from latent_vae.latents.sources import open_source
from latent_vae.latents.verify import verify_latents

NAME = "precompute_scale"
REPO = Path(__file__).resolve().parents[1]


def make_shards(folder: Path, shards: int, per_shard: int, size: int, seed: int = 0) -> list[str]:
    """img2dataset's layout: NNNNN.tar holding KEY.jpg, KEY.txt, KEY.json per sample. Returns the keys."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{shard:05d}{i:04d}"
                base = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(base).resize((size, size), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
                for suffix, data in (("jpg", buffer.getvalue()), ("txt", f"sample {key}".encode()),
                                     ("json", json.dumps({"key": key}).encode())):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                keys.append(key)
    return keys


def bare_encode_rate(model: Path, shards: Path, count: int, options: PrecomputeOptions) -> float:
    """images/s of LatentCodec.encode alone with one thread (as each precompute process runs), on `count` images
    decoded and cropped beforehand (not timed)."""
    torch.set_num_threads(1)
    first_shard = open_source(str(shards)).shards[0]  # read as precompute reads it
    pixels = [prepare_image(load_image(sample.image), options).pixels for sample in first_shard.samples()]
    pixels = torch.stack((pixels * (count // len(pixels) + 1))[:count]).float().div(127.5).sub(1.0)
    codec = LatentCodec.from_pretrained(str(model), device="cpu", max_batch_size=options.batch_size)
    codec.encode(pixels[: options.batch_size])  # warm-up
    start = time.perf_counter()
    for batch in pixels.split(options.batch_size):
        codec.encode(batch)
    return count / (time.perf_counter() - start)


def bare_encode_processes(model: Path, shards: Path, count: int, options: PrecomputeOptions, processes: int) -> float:
    """images/s of `processes` bare encoders running at once (one thread each), as the runs do."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    argv = [sys.executable, "-m", "benchmarks.precompute_scale", "--bare-worker", str(model), str(shards), str(count),
            str(options.resolution), str(options.batch_size)]
    workers = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    return sum(float(worker.communicate()[0].split()[-1]) for worker in workers)


def start_runs(argv: list[str], processes: int, log: Path) -> list[subprocess.Popen]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return [subprocess.Popen([sys.executable, "-m", "latent_vae", "precompute", *argv], env=env, start_new_session=True,
                             stdout=open(log.with_suffix(f".{i}.out"), "w"), stderr=subprocess.STDOUT)
            for i in range(processes)]


def wait_all(runs: list[subprocess.Popen]) -> None:
    for run in runs:
        if run.wait() not in (0, 1):
            raise RuntimeError(f"a precompute process exited with {run.returncode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--per-shard", type=int, default=250)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--model", default="f16c16-narrow",
                        help="preset (fresh weights); f16c16-narrow makes the encoder the bottleneck, as on real data")
    parser.add_argument("--name", default=NAME, help="results file stem")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per process")
    parser.add_argument("--kill-at", type=float, default=0.5, help="SIGKILL once this share of the shards is committed")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--bare-worker", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_worker:  # one of the bare encoders (a subprocess of this script)
        model, shards, count, resolution, batch = args.bare_worker
        options = PrecomputeOptions(resolution=int(resolution), batch_size=int(batch))
        print(bare_encode_rate(Path(model), Path(shards), int(count), options))
        return

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="precompute_scale_"))
    try:
        shards, model = workdir / "shards", workdir / "model"
        keys = make_shards(shards, args.shards, args.per_shard, args.size)
        save_vae(build_vae(args.model, seed=0), model)
        options = PrecomputeOptions(resolution=args.size, batch_size=args.batch_size)
        bare_before = bare_encode_processes(model, shards, 1000, options, args.processes)

        def argv(out: Path) -> list[str]:
            return ["--model", str(model), "--data", str(shards), "--out", str(out), "--resolution", str(args.size),
                    "--batch-size", str(args.batch_size), "--num-workers", str(args.workers), "--device", "cpu",
                    "--no-progress"]

        clean_out = workdir / "clean"
        start = time.perf_counter()
        wait_all(start_runs(argv(clean_out), args.processes, workdir / "clean"))
        clean = time.perf_counter() - start
        bare_after = bare_encode_processes(model, shards, 1000, options, args.processes)
        bare = (bare_before + bare_after) / 2
        print(f"bare encode: {bare_before:.0f} images/s before the clean run, {bare_after:.0f} after")
        loop_rate = sum(float(re.search(r"\[([\d.]+) img/s", log.read_text()).group(1))
                        for log in workdir.glob("clean.*.out"))  # each process's encoding loop, start-up excluded
        clean_report = verify_latents(clean_out)
        print(f"clean run: {clean:.1f} s, {clean_report.line()}")

        out = workdir / "killed"
        runs = start_runs(argv(out), args.processes, workdir / "killed")
        start = time.perf_counter()
        while len(list((out / "manifests").glob("*.json"))) < args.kill_at * args.shards:
            if all(run.poll() is not None for run in runs):
                raise RuntimeError("the runs ended before they could be killed")
            time.sleep(0.02)
        for run in runs:
            os.killpg(run.pid, signal.SIGKILL)  # the process and its DataLoader worker
            run.wait()
        killed_after = time.perf_counter() - start
        committed = len(read_manifests(out))
        in_flight = len(list((out / "claims").glob("*.claim")))
        start = time.perf_counter()
        wait_all(start_runs(argv(out), args.processes, workdir / "rerun"))
        rerun = time.perf_counter() - start
        report = verify_latents(out)
        stored = Counter(k for f in (out / "data").glob("*.parquet") for k in pq.read_table(f, columns=["key"])["key"].to_pylist())
        exactly_once = stored == Counter(keys)
        print(f"killed after {killed_after:.1f} s ({committed} shards committed, {in_flight} in flight), rerun "
              f"{rerun:.1f} s; {report.line()}; every key exactly once: {exactly_once}")
        if not (report.ok and exactly_once and clean_report.ok):
            raise RuntimeError(f"the dataset is wrong: {report.problems} {clean_report.problems}")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    images = len(keys)
    lost = killed_after + rerun - clean
    rows = [
        {"variant": f"bare LatentCodec.encode (decoded tensors), {args.processes} processes x 1 thread",
         "seconds": images / bare,
         "images/s": bare, "relative": 1.0},
        {"variant": f"clean run: {args.processes} processes, one --out, encoding loops", "seconds": "",
         "images/s": loop_rate, "relative": loop_rate / bare},
        {"variant": f"clean run: {args.processes} processes, one --out, wall (with start-up)", "seconds": clean,
         "images/s": images / clean, "relative": images / clean / bare},
        {"variant": f"killed at {killed_after:.0f} s ({committed}/{args.shards} shards committed, {in_flight} in flight)",
         "seconds": killed_after, "images/s": "", "relative": ""},
        {"variant": "rerun to completion", "seconds": rerun, "images/s": "", "relative": ""},
        {"variant": "killed + rerun", "seconds": killed_after + rerun, "images/s": images / (killed_after + rerun),
         "relative": images / (killed_after + rerun) / bare},
    ]
    notes = (f"{images:,} JPEGs of {args.size}x{args.size} in {args.shards} img2dataset-style tar shards; "
             f"{args.model} (fresh weights), batch {args.batch_size}, {args.processes} processes with 1 thread and "
             f"{args.workers} DataLoader worker each, started together into one --out. Verified after the rerun: "
             f"{report.line().split(': ', 1)[1]}; keys compared with the input: every key exactly once = {exactly_once}. Time the resume "
             f"lost (killed + rerun - clean): {lost:.1f} s, of which about 2 x the start-up of a process (imports, "
             "model) and the shards in flight at the kill. Wall times include process start-up. The DataLoader "
             f"workers share the two cores with the encoders. Bare encode: {bare_before:.0f} images/s before the clean run, "
             f"{bare_after:.0f} after (the machine is shared with other jobs).")
    write_results(args.name, rows, notes=notes, columns=["variant", "seconds", "images/s", "relative"],
                  extra={"images": images, "bare_before": bare_before, "bare_after": bare_after, "shards": args.shards, "lost_seconds": lost, "committed_at_kill": committed,
                         "in_flight_at_kill": in_flight, "verified": report.ok, "exactly_once": exactly_once,
                         "args": vars(args)})


if __name__ == "__main__":
    main()
