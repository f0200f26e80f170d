"""`latent-vae precompute`: encode a dataset's images once into a latent dataset (format: `latent_vae.latents.format`).

How the run is organised, and why:
- The unit of work is an input shard (a tar file, a parquet file, a stream shard, or `shard_size` rows of a
  folder or Dataset); it becomes one output shard of the same name. A process claims a shard with an
  exclusive-create claim file (owner, heartbeat), so two runs into one `--out`, or many ranks on many
  nodes, never work on the same shard at once; each rank first tries the shards that its global rank
  points to (RANK/WORLD_SIZE, as torchrun and accelerate set them), then helps with the others.
- DataLoader workers claim shards, read their samples and decode, resize and crop the images (through the
  project's one image reader; in a thread pool over the cores that idle workers leave) while the main process
  encodes batches, and a writer thread packs the latents and writes and commits the shards: decoding,
  encoding and writing overlap.
- A finished shard is committed by its manifest (an exclusive hard link: of two processes that ever
  finish one shard, only the first commits). A rerun skips complete shards and redoes the others; a run
  killed anywhere loses only the shards it had in flight (about one per DataLoader worker).
- A claim whose owner stopped heartbeating (or, on the same host, whose process is gone) is stale and is
  taken over, so a run waits for shards that another live process holds, and finishes those of the dead.
- `engine="ray"` runs the same shards through a Ray Data pipeline instead (`latent_vae.latents.ray_engine`); what a
  run is whatever its engine (claims, items, commits, the summary) is `latent_vae.latents.run`.
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..utils.errors import StorageError, storage_failure
from ..utils.option_values import resolve_device
from . import format as fmt
from .claims import Claims, Heartbeat, Owner
from .encoding import PreparedImage, encode_moments, make_codec, moment_rows
from .locations import open_store
from .metadata import MetadataFitter
from .options import PrecomputeOptions
from .run import (
    SHARD_READ_ERRORS,
    OpenShard,
    PrecomputeSummary,
    RunCounts,
    claim_shard,
    commit_open_shard,
    failure_record,
    finish_run,
    open_inputs,
    open_output,
    open_shard,
    prepare_sample,
    unclaimed,
    unfinished,
    unique_keys,
    unreadable_shard,
)
from .sources import Source
from .storage import DatasetStore, store_errors
from .writer import output_features

# Batches the writer thread may lag behind the encoder (each holds a batch of latents in host memory).
WRITES_AHEAD = 4

class ShardReader(torch.utils.data.IterableDataset):
    """Claims shards, then yields for each, in lists: {"kind": "start"}, its images (prepared) or failures, {"kind": "end"}.

    Runs in DataLoader workers (each its own shards, so a shard's items arrive in order); uint8 pixels cross
    the process boundary: 4x less than float.
    """

    def __init__(self, source: Source, order: list[int], out: str | Path | DatasetStore, owner: Owner,
                 options: PrecomputeOptions, buckets: list[tuple[int, int]] | None, decode_threads: int = 1) -> None:
        self.source, self.order, self.out, self.owner = source, order, open_store(out), owner
        self.options, self.buckets, self.decode_threads = options, buckets, decode_threads
        self.fit_metadata = MetadataFitter(source.passthrough)

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        claims = Claims(self.out, self.owner, self.options.claim_timeout)
        heartbeat = Heartbeat.of_this_process(self.options.claim_timeout / 4)
        start = worker_id * len(self.order) // workers  # workers start apart: fewer collisions on claims
        for index in self.order[start:] + self.order[:start]:
            shard = self.source.shards[index]
            heartbeat.check()  # a process whose claims no longer beat claims nothing more
            if not claim_shard(self.out, claims, shard.name):
                continue
            beat = claims.handle(shard.name)
            heartbeat.add(beat)
            # Items travel in lists of about a batch: one message per batch, not per image (small images are
            # otherwise bound by the DataLoader's per-message cost).
            chunk = [{"kind": "start", "shard": shard.name, "source": getattr(shard, "path", shard.name)}]
            try:
                for item in self._items(shard):
                    chunk.append(item)
                    if len(chunk) >= self.options.batch_size:
                        yield chunk
                        chunk = []
            except SHARD_READ_ERRORS as error:
                # A truncated download or a bad file: what was read stays, the rest is one failure of the shard.
                chunk.append(unreadable_shard(shard, error))
            finally:  # however this shard ends (an error, the run stopped), this process's heartbeat forgets it
                heartbeat.discard(beat)
            yield [*chunk, {"kind": "end", "shard": shard.name}]

    def _items(self, shard):
        """The shard's items in order. With several decode threads (Pillow decodes and resizes without the GIL),
        samples are read in this thread and decoded in a pool: a shard is not bound to one core (a small folder
        is one virtual shard: one core decoded it all while the GPU waited)."""
        if self.decode_threads <= 1:
            for sample in unique_keys(shard.samples(), shard.name):
                yield self._item(shard.name, sample)
            return
        with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode") as pool:
            pending, cut = deque(), None
            try:
                for sample in unique_keys(shard.samples(), shard.name):
                    pending.append(pool.submit(self._item, shard.name, sample))
                    if len(pending) >= 2 * self.decode_threads:  # bounded read-ahead: a few images a thread
                        yield pending.popleft().result()
            except SHARD_READ_ERRORS as error:
                cut = error  # raised after the images read before the cut: those are kept
            while pending:
                yield pending.popleft().result()
            if cut is not None:
                raise cut

    def _item(self, shard: str, sample) -> dict:
        return prepare_sample(shard, sample, self.fit_metadata, self.options, self.buckets)


def _passthrough_collate(item: dict) -> dict:
    """No batching in the loader (batches are formed per image size in the main process)."""
    return item


def shard_order(count: int, rank: int, world_size: int) -> list[int]:
    """Shard indices in the order a rank tries them: its own (index % world_size == rank) first, then the
    others starting at its own place, so that ranks done early help where the others are not."""
    mine = [i for i in range(count) if i % world_size == rank]
    others = [i for i in range(count) if i % world_size != rank]
    offset = rank * len(others) // max(1, world_size)
    return mine + others[offset:] + others[:offset]


# -- the run --------------------------------------------------------------------------------------------------


def _cpus_per_process() -> int:
    """This process's share of the cores (torchrun's LOCAL_WORLD_SIZE processes share one node's)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _default_workers() -> int:
    return max(1, min(16, _cpus_per_process() - 1))  # one core stays with the process that encodes


def _options(options: PrecomputeOptions | None, overrides: dict) -> PrecomputeOptions:
    unknown = sorted(set(overrides) - set(PrecomputeOptions.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown precompute option(s) {', '.join(map(repr, unknown))}; known: "
                         f"{', '.join(PrecomputeOptions.__dataclass_fields__)}")
    merged = PrecomputeOptions(**{**(asdict(options) if options else {}), **overrides})
    merged.validate()
    return merged


class _Run:
    """One process's part of a precompute: passes over the shards until every one is complete."""

    def __init__(self, codec, source: Source, out: DatasetStore, options: PrecomputeOptions, buckets, order: list[int],
                 features, progress) -> None:
        self.codec, self.source, self.out, self.options, self.buckets = codec, source, out, options, buckets
        self.order, self.features, self.progress = order, features, progress
        self.owner = Owner.this_process()
        self.claims = Claims(out, self.owner, options.claim_timeout)
        self.heartbeat = Heartbeat.of_this_process(options.claim_timeout / 4)
        self.storage = fmt.storage_dtype(options.dtype)
        self.encoded = self.failed = self.committed = 0
        self.open: dict[str, OpenShard] = {}
        self.groups: dict[tuple[int, ...], list[dict]] = {}
        # Rows are packed and shards written and committed in one background thread, in order, while this
        # thread feeds the accelerator the next batch (else it idles through every parquet write).
        self.writer_thread = ThreadPoolExecutor(1, thread_name_prefix="write")
        self.written: deque[Future] = deque()
        self.write_failed = False  # once a write fails, nothing after it runs: no shard may commit without its rows

    def run(self, workers: int) -> None:
        names = [s.name for s in self.source.shards]
        poll = min(2.0, max(0.2, self.options.claim_timeout / 20))
        left = unfinished(self.out, names, self.order)
        try:
            while left:
                free = unclaimed(self.out, self.claims, names, left)
                if free:
                    self._pass(free, workers)
                else:  # live processes hold what is left: wait for them to finish, or for their claims to go stale
                    time.sleep(poll)
                left = unfinished(self.out, names, left)
        finally:
            self.writer_thread.shutdown()
        self.claims.clear_stale()

    def _pass(self, order: list[int], workers: int) -> None:
        workers = min(workers, len(order))
        # Fewer shards than workers (a small folder is one virtual shard): the cores left idle decode in threads.
        threads = max(1, _cpus_per_process() // max(1, workers))
        loader = torch.utils.data.DataLoader(
            ShardReader(self.source, order, self.out, self.owner, self.options, self.buckets, threads),
            batch_size=None,
            num_workers=workers, collate_fn=_passthrough_collate,
            # two chunks (about a batch each) ready per worker, so the encoder never waits for a decode
            prefetch_factor=2 if workers else None)
        try:
            for chunk in loader:
                for item in chunk:
                    self._take(item)
            while self.written:
                self.written.popleft().result()  # a write's error is raised here
        finally:
            for future in self.written:  # an error or an interrupt: stop writing, then remove what is half-written
                future.cancel()
            wait(self.written)
            self.written.clear()
            for name, shard in self.open.items():
                shard.writer.abort()
                # The heartbeat is the process's, not the run's: a claim left in it would be beaten after this run,
                # and a store that fails by then would stop the next run's heartbeat in this process.
                self.heartbeat.discard(shard.beat)
                try:
                    self.claims.release(name)
                except store_errors():
                    pass  # the store is failing: the claim goes stale, and is taken over, without this run
            self.open.clear()
            self.groups.clear()

    def _in_writer(self, work, *args) -> None:
        """Run `work(*args)` in the writer thread after what was handed to it before; raise its earlier errors."""
        while self.written and (self.written[0].done() or len(self.written) > WRITES_AHEAD):
            self.written.popleft().result()
        self.written.append(self.writer_thread.submit(self._after_good_writes, work, *args))

    def _after_good_writes(self, work, *args) -> None:
        """Writes run in order; after one has failed (its error waits in its future for the main thread), the
        rest are skipped, since a commit queued behind it would publish its shard without the failed rows."""
        if self.write_failed:
            return
        try:
            work(*args)
        except BaseException:
            self.write_failed = True
            raise

    def _take(self, item: dict) -> None:
        kind, name = item["kind"], item["shard"]
        if kind == "start":
            self.heartbeat.check()
            self.open[name] = open_shard(self.out, self.claims, name, item["source"], self.features)
            self.heartbeat.add(self.open[name].beat)
        elif kind == "failure":
            self.open[name].failures.append(failure_record(item))
            self.failed += 1
            self.progress.update(1)
        elif kind == "image":
            size = tuple(item["prepared"].pixels.shape)
            self.groups.setdefault(size, []).append(item)
            if len(self.groups[size]) == self.options.batch_size:
                self._encode(size)
            elif sum(len(g) for g in self.groups.values()) >= 4 * self.options.batch_size:
                # Many buckets each short of a batch: encode the fullest rather than hold images without bound.
                self._encode(max(self.groups, key=lambda k: len(self.groups[k])))
        else:  # "end": encode what is left of the shard, then commit it
            for size in [s for s, group in self.groups.items() if any(i["shard"] == name for i in group)]:
                self._encode(size)
            self._in_writer(self._commit, name)

    def _encode(self, size: tuple[int, ...]) -> None:
        items = self.groups.pop(size)
        images = [i["prepared"] for i in items]
        moments = encode_moments(self.codec, images, flip=self.options.flip, dtype=self.storage)
        self._in_writer(self._write_rows, [self.open[i["shard"]] for i in items], items, images, moments)
        self.encoded += len(items)
        self.progress.update(len(items))

    def _write_rows(self, shards: list[OpenShard], items: list[dict], images: list[PreparedImage], moments) -> None:
        rows = moment_rows(images, [i["metadata"] for i in items], *moments, flip=self.options.flip, dtype=self.storage)
        mean, std = moments
        for i, (shard, row) in enumerate(zip(shards, rows)):
            shard.writer.add(row)
            shard.posterior.update(mean[i], std[i])

    def _commit(self, name: str) -> None:
        shard = self.open[name]
        if commit_open_shard(self.out, self.owner, name, shard):
            self.committed += 1
        del self.open[name]
        self.heartbeat.discard(shard.beat)
        self.claims.release(name)


def precompute_latents(model: Any, data: Any, out: str | os.PathLike, options: PrecomputeOptions | None = None, *,
                       storage_options: dict | None = None, single_writer: bool = False,
                       **overrides: Any) -> PrecomputeSummary:
    """Encode every image of `data` once into a latent dataset at `out` (read it with `load_latents`).

    Args:
        model: a preset name, model folder or .safetensors file, an AutoencoderKL, or a LatentCodec (used as is).
        data: WebDataset tar shards or parquet files (a path, glob, list or folder of them), an image folder
            (recursive; captions from metadata.jsonl or .txt beside images), a save_to_disk folder, arrow files,
            or a datasets.Dataset / IterableDataset; paths may be URLs (s3://BUCKET/shards/*.tar, gs://...).
        out: the output folder or URL (s3://BUCKET/PREFIX); running the same call again continues an interrupted
            run, and concurrent runs (or ranks, or nodes) into the same folder share the work.
        options, **overrides: see `PrecomputeOptions` (keywords override fields of `options`).
        storage_options: for URLs, the fsspec file system's options (credentials, `endpoint_url`...); by default
            the standard places (AWS_* variables, AWS_ENDPOINT_URL, ~/.aws, GOOGLE_APPLICATION_CREDENTIALS).
        single_writer: allow an `out` store without atomic conditional writes, promising that no other run
            writes into it at the same time.

    Under `torchrun` / `accelerate launch` every process, on every node, takes its share of the shards. With
    `engine="ray"` one driver runs a Ray Data pipeline on a Ray cluster instead (`ray_address`, `encoders`,
    `gpus_per_encoder`, `decoders`): the same dataset.
    Returns when every shard of the dataset is complete (waiting for shards other live processes hold).
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    opts = _options(options, overrides)
    out = open_store(out, storage_options, single_writer=single_writer)
    out.check(write=True)  # a missing bucket, credentials or permission: one line before any work
    if opts.engine == "ray":
        from .ray_engine import precompute_on_ray  # Ray is an optional extra: imported when asked for

        return precompute_on_ray(model, data, out, opts, storage_options)
    wanted = resolve_device(opts.device) if opts.device not in (None, "auto") else None
    state = PartialState(cpu=wanted is not None and wanted.type == "cpu")
    device = wanted or state.device
    if device.type == "cuda" and device.index is None and state.device.type == "cuda":
        device = state.device  # plain "cuda" under torchrun: this process's own GPU

    source = open_inputs(data, opts, storage_options)
    codec, model_source = make_codec(model, opts, device)
    bucket_list = open_output(codec, model_source, source, out, opts)

    if state.num_processes > 1:  # ranks start claiming together: one that loads its model first takes no one's share
        state.wait_for_everyone()
    names = [s.name for s in source.shards]
    done_before = len(names) - len(unfinished(out, names, list(range(len(names)))))
    order = shard_order(len(names), state.process_index, state.num_processes)
    workers = opts.num_workers if opts.num_workers is not None else _default_workers()
    progress = tqdm(unit="img", desc="precompute", dynamic_ncols=True,
                    disable=not (opts.progress and state.is_local_main_process))
    run = _Run(codec, source, out, opts, bucket_list, order, output_features(source.passthrough, opts.flip),
               progress)
    start = time.perf_counter()
    try:
        run.run(workers)
    except store_errors() as error:  # the store failed past its retries: what is committed stays
        raise StorageError(storage_failure(out.where(), error)) from error
    seconds = time.perf_counter() - start
    progress.close()

    mine = RunCounts(run.encoded, run.failed, run.committed, seconds)
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        per_process = gather_object([mine])
    else:
        per_process = [mine]
    return finish_run(out, names, done_before, per_process, is_main=state.is_main_process)
