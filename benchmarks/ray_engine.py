"""The Ray engine on this machine: its throughput against the local engine's, and against its number of decode CPUs.

- `engines`: the same img2dataset-style tar shards through `precompute_latents` with the local engine (one DataLoader
  worker, encoding in the main process) and with `engine="ray"` (a local Ray of 2 CPUs: decode tasks and one
  encoder actor), alternately, `--repeats` times each. Every encoder runs one torch thread. A run's rate is its
  steady state, read from the manifests (each records when its shard was committed): the rows of the shards
  committed after the first quarter's last commit up to the third quarter's last, over that time (no start-up, no
  tail); its start-up is the rest of its wall time (the model, and for Ray the pipeline's worker processes, which
  import torch and load the model; `ray.init` is reported apart). A first Ray run, not timed, starts the session's
  workers (later runs reuse the task workers).
- `decode CPUs`: a cheap encoder (the tiny model at a small resolution) behind large JPEGs, so that decoding is the
  bottleneck; Ray's throughput with 1, 2, ... decode tasks (`decoders`), the cluster declared with enough logical
  CPUs for them and the encoder. The machine's free cores bound what more decode tasks can give.

    python -m benchmarks.ray_engine                       # both parts, CPU
    python -m benchmarks.ray_engine --part decode --decoders 1 2 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.precompute_scale import make_shards
from benchmarks.report import write_results
from latent_vae import build_vae, save_vae
from latent_vae.latents.format import read_manifests
from latent_vae.latents.precompute import precompute_latents

NAME = "ray_engine"


def steady_rate(out: Path) -> float:
    """Rows of the shards committed after the first quarter's last commit up to the third quarter's last, per second."""
    commits = sorted((m.written_at, m.rows) for m in read_manifests(out).values())
    first, last = len(commits) // 4, 3 * len(commits) // 4
    return sum(rows for _, rows in commits[first + 1:last + 1]) / (commits[last][0] - commits[first][0])


def timed_run(model: Path, shards: Path, out: Path, **options) -> dict:
    """Wall time, steady rate and start-up of one precompute into an empty `out` (removed afterwards)."""
    start = time.perf_counter()
    summary = precompute_latents(str(model), str(shards), out, progress=False, **options)
    wall = time.perf_counter() - start
    if not summary.complete or summary.failures:
        raise RuntimeError(f"{out}: {summary.line()} {summary.problems}")
    rate = steady_rate(out)
    shutil.rmtree(out)
    return {"rate": rate, "startup": wall - summary.rows / rate, "wall": wall, "rows": summary.rows}


def init_ray(cpus: int) -> float:
    """A local Ray of `cpus` logical CPUs (the engine uses a Ray already started); seconds it took."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.shutdown()
    start = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING")
    return time.perf_counter() - start


def engines(args, workdir: Path) -> tuple[list[dict], dict]:
    """Local against Ray on the same shards, alternately."""
    shards = workdir / "engines"
    make_shards(shards, args.shards, args.per_shard, args.size)
    common = {"resolution": args.resolution, "batch_size": args.batch_size}
    init_seconds = init_ray(2)
    torch.set_num_threads(1)  # as the Ray encoder actor (1 CPU): one torch thread each
    timed_run(workdir / "model", shards, workdir / "out", engine="ray", **common)  # warm-up: Ray's first workers
    runs: dict[str, list[dict]] = {"local": [], "ray": []}
    for _ in range(args.repeats):
        for engine in ("local", "ray"):
            extra = {"engine": "ray"} if engine == "ray" else {"num_workers": 1, "device": "cpu"}
            runs[engine].append(timed_run(workdir / "model", shards, workdir / "out", **common, **extra))
            print(f"{engine}: {runs[engine][-1]}")
    local_rate = median([r["rate"] for r in runs["local"]])
    rows = []
    for engine, label in (("local", "local engine: 1 DataLoader worker, encoder in the main process"),
                          ("ray", "Ray engine: local Ray, 2 CPUs, decode tasks + 1 encoder actor")):
        rate = median([r["rate"] for r in runs[engine]])
        rates = [r["rate"] for r in runs[engine]]
        rows.append({"part": "engines", "variant": label, "images/s": rate, "runs' range": f"{min(rates):.3g}-{max(rates):.3g}",
                     "relative": rate / local_rate, "start-up s": median([r["startup"] for r in runs[engine]])})
    rows.append({"part": "engines", "variant": "ray.init(num_cpus=2): a local Ray's start", "images/s": "",
                 "relative": "", "start-up s": init_seconds})
    return rows, {"engines_runs": runs, "ray_init_seconds": init_seconds}


def decode_scaling(args, workdir: Path) -> tuple[list[dict], dict]:
    """Ray's throughput against its decode tasks, with an encoder that costs little."""
    shards = workdir / "decode"
    make_shards(shards, args.decode_shards, args.decode_per_shard, args.decode_size)
    init_ray(max(args.decoders) + 1)
    timed_run(workdir / "model", shards, workdir / "out", engine="ray", resolution=args.decode_resolution)  # warm-up
    runs = {}
    for decoders in args.decoders:
        runs[decoders] = timed_run(workdir / "model", shards, workdir / "out", engine="ray", decoders=decoders,
                                   resolution=args.decode_resolution, batch_size=args.batch_size)
        print(f"decoders {decoders}: {runs[decoders]}")
    first = runs[args.decoders[0]]["rate"]
    rows = [{"part": "decode CPUs", "variant": f"Ray engine, {d} decode task(s), 1 encoder actor", "images/s": r["rate"],
             "relative": r["rate"] / first, "start-up s": r["startup"]} for d, r in runs.items()]
    return rows, {"decode_runs": {str(k): v for k, v in runs.items()}}


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "engines", "decode"], default="all")
    parser.add_argument("--model", default="f16c16-tiny", help="preset (fresh weights)")
    parser.add_argument("--shards", type=int, default=24)
    parser.add_argument("--per-shard", type=int, default=32)
    parser.add_argument("--size", type=int, default=384, help="engines: JPEG side in pixels")
    parser.add_argument("--resolution", type=int, default=256, help="engines: the crop encoded")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decoders", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--decode-shards", type=int, default=24)
    parser.add_argument("--decode-per-shard", type=int, default=32)
    parser.add_argument("--decode-size", type=int, default=1024, help="decode CPUs: JPEG side in pixels")
    parser.add_argument("--decode-resolution", type=int, default=32, help="decode CPUs: the (cheap) crop encoded")
    parser.add_argument("--name", default=NAME, help="results file stem")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ray_engine_"))
    rows, extra = [], {"args": vars(args)}
    try:
        save_vae(build_vae(args.model, seed=0), workdir / "model")
        if args.part in ("all", "engines"):
            part_rows, part_extra = engines(args, workdir)
            rows += part_rows
            extra.update(part_extra)
        if args.part in ("all", "decode"):
            part_rows, part_extra = decode_scaling(args, workdir)
            rows += part_rows
            extra.update(part_extra)
    finally:
        import ray

        ray.shutdown()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    import ray

    command = " ".join(["python -m benchmarks.ray_engine", *sys.argv[1:]])
    notes = (f"Command: `{command}`. {args.model} (fresh weights), "
             f"batch {args.batch_size}, CPU only (no GPU was used), Ray {ray.__version__}. images/s: the steady rate, "
             "the rows of the shards committed from the first quarter's last commit to the third quarter's last over "
             "that time (from the manifests); start-up: the rest of the wall time. engines: "
             f"{args.shards * args.per_shard} JPEGs of {args.size}x{args.size} in {args.shards} tar shards, crops "
             f"of {args.resolution}, median of {args.repeats} alternating runs, relative to the local engine. decode "
             f"CPUs: {args.decode_shards * args.decode_per_shard} JPEGs of {args.decode_size}x{args.decode_size} in "
             f"{args.decode_shards} shards, crops of {args.decode_resolution} (decoding dominates), relative to the "
             "first row. The machine has 2 cores shared with other jobs: decode tasks beyond the cores left free "
             "cannot add throughput.")
    notes += f" Load average (1, 5, 15 min) at the end: {', '.join(f'{v:.1f}' for v in os.getloadavg())}."
    write_results(args.name, rows, notes=notes, columns=["part", "variant", "images/s", "runs' range", "relative", "start-up s"],
                  extra=extra)


if __name__ == "__main__":
    main()
