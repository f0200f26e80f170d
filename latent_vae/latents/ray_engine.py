"""`precompute_latents(..., engine="ray")`: the same latent dataset, made by a Ray Data pipeline on a Ray cluster.

    the driver claims input shards, one at a time, as readers take them (a `ray.util.queue.Queue`)
      -> read_shards     Ray tasks: a claimed shard's samples, undecoded (num_cpus=0: reading waits on I/O)
      -> decode_samples  Ray tasks of one CPU each (at most `decoders` at once): decode, resize, crop
      -> Encoder         an actor pool: `encoders` actors, each holding one model on `gpus_per_encoder` GPUs
      -> the driver      rows into each output shard's writer; a shard is committed once all its items are in

Why this shape: decoding and resizing a 1024 px JPEG costs far more CPU than encoding it costs GPU, so Ray Data
scales the two stages apart, each with its own resources, with backpressure between them. A shard is committed
whole by the process that has seen all of its rows, so the driver writes, with the local engine's writer and
commit: its rows are latents, 12x fewer bytes than the pixels that stay in the cluster (f16c16, bf16 mean and
std against uint8 pixels).

Exactly once, as in the local engine: the driver claims a shard (its own claim, heartbeated by its own thread)
just before a reader takes it, so two jobs into one `--out` share the work and a killed driver leaves only the
shards in flight claimed (stale at once on its host: its process is gone). Ray retries a failed task and restarts
a killed encoder actor, retrying its batch; an item delivered twice is kept once (keys are unique in a shard),
and a shard whose items did not all arrive is dropped at the end of the pass and done again. Whatever happens,
a shard's rows count only once its manifest is published exclusively (`writer.commit_shard`).

A bad image is its item's failure, caught inside the decode task: one image never fails its block.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..codec.posterior import PosteriorStats
from ..utils.errors import StorageError, storage_failure
from . import format as fmt
from .claims import ClaimBeat, Claims, Heartbeat, Owner
from .encoding import encode_moments, make_codec, moment_rows
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

RAY_MISSING = "--engine ray needs Ray Data: pip install 'latent-vae[ray]'"

# The one column between the stages: a pickled item. Items differ by kind (sample, image, row, failure, end) and
# carry the source's metadata with its own Python types, which one Arrow schema per block cannot hold.
ITEM = "item"


def import_ray():
    """The `ray` module, or one line saying how to install it."""
    try:
        import ray
        import ray.data  # the part this engine needs
    except ImportError:
        raise ValueError(RAY_MISSING) from None
    return ray


def _pack(items: list[dict]) -> dict[str, np.ndarray]:
    return {ITEM: np.array([pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL) for item in items], dtype=object)}


def _unpack(batch: dict[str, np.ndarray]) -> list[dict]:
    return [pickle.loads(data) for data in batch[ITEM]]


# -- the stages (run in Ray workers) --------------------------------------------------------------------------------


def read_shards(batch: dict, *, source: Source, queue, chunk: int) -> Iterator[dict]:
    """A reader: the samples of each shard the driver puts in `queue`, in chunks, then the shard's "end" (how many
    items it has); stops at None. `batch` is this reader's slot (one row)."""
    while (index := queue.get()) is not None:
        shard = source.shards[index]
        items, count = [], 0
        try:
            for sample in unique_keys(shard.samples(), shard.name):
                items.append({"kind": "sample", "shard": shard.name, "sample": sample})
                count += 1
                if len(items) >= chunk:
                    yield _pack(items)
                    items = []
        except SHARD_READ_ERRORS as error:  # what was read stays; the rest is one failure of the shard
            items.append(unreadable_shard(shard, error))
            count += 1
        yield _pack([*items, {"kind": "end", "shard": shard.name, "items": count}])


def decode_samples(batch: dict, *, passthrough, options: PrecomputeOptions, buckets) -> dict:
    """Samples -> prepared images or failures (the local engine's `prepare_sample`); other items pass through."""
    fit_metadata = MetadataFitter(passthrough)
    items = []
    for item in _unpack(batch):
        if item["kind"] == "sample":
            sample = item["sample"]
            try:
                item = prepare_sample(item["shard"], sample, fit_metadata, options, buckets)
            except Exception as error:  # noqa: BLE001 -- one image never fails its block (and its neighbours)
                item = {"kind": "failure", "shard": item["shard"], "key": sample.key, "source": sample.name,
                        "reason": "error", "message": f"{sample.name}: {type(error).__name__}: {error}"}
        items.append(item)
    return _pack(items)


class Encoder:
    """An encoder actor: one model, on the GPU Ray gave it (else the CPU); prepared images -> rows, grouped by size."""

    def __init__(self, model: Any, options: PrecomputeOptions, fingerprint: str) -> None:
        import ray

        device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        self.codec, _ = make_codec(model, options, device)
        if self.codec.fingerprint != fingerprint:  # e.g. a model folder that differs between nodes
            raise ValueError(f"the model on {os.uname().nodename} is not the driver's (fingerprint "
                             f"{self.codec.fingerprint[:12]} against {fingerprint[:12]})")
        self.flip, self.storage = options.flip, fmt.storage_dtype(options.dtype)

    def __call__(self, batch: dict) -> dict:
        items = _unpack(batch)
        sizes: dict[tuple[int, ...], list[int]] = {}
        for i, item in enumerate(items):
            if item["kind"] == "image":
                sizes.setdefault(tuple(item["prepared"].pixels.shape), []).append(i)
        for indices in sizes.values():
            images = [items[i]["prepared"] for i in indices]
            mean, std = encode_moments(self.codec, images, flip=self.flip, dtype=self.storage)
            rows = moment_rows(images, [items[i]["metadata"] for i in indices], mean, std, flip=self.flip,
                               dtype=self.storage)
            for j, (i, row) in enumerate(zip(indices, rows)):
                posterior = PosteriorStats()  # the row's share of its shard's posterior sums (manifest)
                posterior.update(mean[j], std[j])
                items[i] = {"kind": "row", "shard": items[i]["shard"], "row": row, "posterior": posterior}
        return _pack(items)


# -- the driver -----------------------------------------------------------------------------------------------------


@dataclass
class _Output:
    """An output shard the driver is writing: the keys it has (an item delivered twice is kept once) and, once the
    reader's "end" is in, how many items the shard has."""

    shard: OpenShard
    keys: set[str] = field(default_factory=set)
    expected: int | None = None


class _Driver:
    """The Ray driver's part: claims, the pipeline's passes, writing and committing the shards."""

    def __init__(self, ray, model, source: Source, out: DatasetStore, options: PrecomputeOptions, buckets,
                 fingerprint: str) -> None:
        self.ray, self.model, self.source, self.out, self.options = ray, model, source, out, options
        self.buckets, self.fingerprint = buckets, fingerprint
        self.features = output_features(source.passthrough, options.flip)
        self.sources = {shard.name: shard for shard in source.shards}
        self.owner = Owner.this_process()
        self.claims = Claims(out, self.owner, options.claim_timeout)
        self.heartbeat = Heartbeat.of_this_process(options.claim_timeout / 4)
        self.claimed: dict[str, ClaimBeat] = {}  # claims this driver holds: released when committed or at a pass's end
        self.lock = threading.Lock()
        self.outputs: dict[str, _Output] = {}
        self.claim_error: BaseException | None = None  # what stopped the claiming thread
        self.encoded = self.failed = self.committed = 0

    def run(self) -> None:
        """Passes over the shards until every one is complete (waiting for those that other live processes hold)."""
        names = [s.name for s in self.source.shards]
        poll = min(2.0, max(0.2, self.options.claim_timeout / 20))
        left = unfinished(self.out, names, list(range(len(names))))
        while left:
            free = unclaimed(self.out, self.claims, names, left)
            if free:
                self._pass(free)
            else:  # live processes hold what is left: wait for them to finish, or for their claims to go stale
                time.sleep(poll)
            left = unfinished(self.out, names, left)
        self.claims.clear_stale()

    def _pass(self, order: list[int]) -> None:
        from ray.util.queue import Queue

        readers = min(len(order), self.options.decoders or max(1, int(self.ray.cluster_resources().get("CPU", 1))))
        queue = Queue(maxsize=readers)  # claims run at most `readers` shards ahead of the readers
        stop = threading.Event()
        claimer = threading.Thread(target=self._claim_into, args=(order, queue, readers, stop), name="claim",
                                   daemon=True)
        claimer.start()
        try:
            dataset = self._pipeline(queue, readers)
            dataset.context.enable_progress_bars = self.options.progress
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                for item in _unpack(batch):
                    self._take(item)
            if self.claim_error is not None:  # the readers stopped early, told so by the claiming thread
                raise self.claim_error
        finally:
            stop.set()
            claimer.join()
            queue.shutdown()
            for name in list(self.claimed):  # shards whose items did not all arrive: done again by the next pass
                output = self.outputs.pop(name, None)
                if output is not None:
                    output.shard.writer.abort()
                self._release(name)

    def _claim_into(self, order: list[int], queue, readers: int, stop: threading.Event) -> None:
        """Claim shards as the queue has room for them, then tell each reader to stop."""
        from ray.util.queue import Full

        def put(value) -> bool:
            while not stop.is_set():
                try:
                    queue.put(value, timeout=1.0)
                    return True
                except Full:
                    continue
            return False

        try:
            for index in order:
                name = self.source.shards[index].name
                self.heartbeat.check()  # a driver whose claims stopped beating claims nothing more
                if stop.is_set() or not claim_shard(self.out, self.claims, name):
                    continue
                beat = self.claims.handle(name)
                with self.lock:
                    self.claimed[name] = beat
                self.heartbeat.add(beat)
                if not put(index):
                    self._release(name)
        except BaseException as error:  # noqa: BLE001 -- raised again by the driver's thread, after the pass
            self.claim_error = error
        finally:
            for _ in range(readers):  # the readers stop, and the pass with them
                put(None)

    def _pipeline(self, queue, readers: int):
        """read -> decode -> encode, as one Ray Dataset (progress bars: Ray Data's, on with `options.progress`)."""
        options, ray = self.options, self.ray
        gpus = options.gpus_per_encoder
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        batch = options.batch_size
        decoders = ray.data.TaskPoolStrategy(size=options.decoders) if options.decoders else None
        return (
            ray.data.from_items([{"reader": r} for r in range(readers)])
            .map_batches(read_shards, batch_size=1, num_cpus=0, compute=ray.data.TaskPoolStrategy(size=readers),
                         fn_kwargs={"source": self.source, "queue": queue, "chunk": batch})
            .repartition(target_num_rows_per_block=batch)  # a shard's samples spread over the decode tasks
            .map_batches(decode_samples, batch_size=batch, num_cpus=1, compute=decoders,
                         fn_kwargs={"passthrough": self.source.passthrough, "options": options, "buckets": self.buckets})
            # A batch per block for the encoders; it also keeps Ray from fusing the decode tasks into the encoder
            # actors when both are CPU-only (decoding would then share the encoders' CPUs instead of its own).
            .repartition(target_num_rows_per_block=batch)
            # Ray Data restarts a killed actor and retries its batch (max_restarts=-1 for actor pools).
            .map_batches(Encoder, batch_size=batch, num_cpus=1, num_gpus=gpus,
                         compute=ray.data.ActorPoolStrategy(size=options.encoders),
                         fn_constructor_kwargs={"model": self.model, "options": options, "fingerprint": self.fingerprint}))

    def _take(self, item: dict) -> None:
        name = item["shard"]
        output = self.outputs.get(name)
        if output is None:
            source = getattr(self.sources[name], "path", name)
            shard = open_shard(self.out, self.claims, name, source, self.features, self.claimed[name])
            output = self.outputs[name] = _Output(shard)
        if item["kind"] == "end":
            output.expected = item["items"]
        else:
            key = item["row"][fmt.KEY] if item["kind"] == "row" else item["key"]
            if key in output.keys:
                return
            output.keys.add(key)
            if item["kind"] == "row":
                output.shard.writer.add(item["row"])
                output.shard.posterior = output.shard.posterior.merge(item["posterior"])
                self.encoded += 1
            else:
                output.shard.failures.append(failure_record(item))
                self.failed += 1
        if output.expected is not None and len(output.keys) == output.expected:
            self.heartbeat.check()  # a driver whose claims stopped beating commits nothing more
            if commit_open_shard(self.out, self.owner, name, self.outputs.pop(name).shard):
                self.committed += 1
            self._release(name)

    def _release(self, name: str) -> None:
        with self.lock:
            beat = self.claimed.pop(name, None)
        if beat is not None:
            self.heartbeat.discard(beat)
        try:
            self.claims.release(name)
        except store_errors():
            pass  # the store is failing: the claim goes stale, and is taken over, without this run


def _check_options(model: Any, options: PrecomputeOptions) -> None:
    from ..codec.latent_codec import LatentCodec

    if options.device is not None:
        raise ValueError("--device is the local engine's: a Ray encoder runs on the GPU Ray gives it "
                         "(--gpus-per-encoder), else on CPUs")
    if options.num_workers is not None:
        raise ValueError("--num-workers is the local engine's (DataLoader workers): with --engine ray, --decoders "
                         "bounds the decode tasks")
    if isinstance(model, LatentCodec):
        raise TypeError("--engine ray builds a codec in every encoder actor: pass a preset name, a model folder or "
                         "an AutoencoderKL, not a LatentCodec")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--engine ray runs one driver: start it once (not under torchrun or accelerate launch); "
                         "Ray spreads the work over the cluster")


def precompute_on_ray(model: Any, data: Any, out: DatasetStore, options: PrecomputeOptions,
                      storage_options: dict | None = None) -> PrecomputeSummary:
    """`precompute_latents` with `engine="ray"`: joins the cluster at `options.ray_address` (or RAY_ADDRESS), or
    starts a local Ray (shut down at the end); a Ray already initialised in this process is used as it is."""
    ray = import_ray()
    _check_options(model, options)
    source = open_inputs(data, options, storage_options)
    codec, model_source = make_codec(model, options, torch.device("cpu"))  # latents.json's facts, on the driver
    buckets = open_output(codec, model_source, source, out, options)
    names = [s.name for s in source.shards]
    done_before = len(names) - len(unfinished(out, names, list(range(len(names)))))

    started = not ray.is_initialized()
    if started:
        local = options.ray_address is None and "RAY_ADDRESS" not in os.environ
        ray.init(address=options.ray_address, **({"include_dashboard": False} if local else {}))
    try:
        driver = _Driver(ray, model_source or model, source, out, options, buckets, codec.fingerprint)
        start = time.perf_counter()
        try:
            driver.run()
        except store_errors() as error:  # the store failed past its retries: what is committed stays
            raise StorageError(storage_failure(out.where(), error)) from error
        seconds = time.perf_counter() - start
    finally:
        if started:
            ray.shutdown()
    return finish_run(out, names, done_before, [RunCounts(driver.encoded, driver.failed, driver.committed, seconds)])
