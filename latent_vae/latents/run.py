"""What a precompute run is, whatever its engine: its start (the inputs, `latents.json`), the work on one input
shard (claim it, turn its samples into items: a prepared image or a failure, commit its output shard once), and its
summary. The local engine (`precompute`) and the Ray engine (`ray_engine`) both call these, so that a dataset is the
same whichever engine made it."""

from __future__ import annotations

import json
import os
import sys
import tarfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from ..codec.posterior import PosteriorStats, warn_if_noisy
from ..images.reading import load_image
from ..utils.dtypes import dtype_name
from ..utils.errors import ImageError, printable
from . import format as fmt
from .claims import HOST, ClaimBeat, Claims, Owner
from .encoding import SkipImage, failure_reason, make_buckets, prepare_image
from .metadata import BAD_METADATA, MetadataError, MetadataFitter
from .options import PrecomputeOptions
from .sources import Sample, Source, open_source
from .storage import (
    CLAIM_DIR,
    CLAIM_SUFFIX,
    DATA_DIR,
    DATA_SUFFIX,
    MANIFEST_DIR,
    DatasetStore,
    manifest_key,
    shard_of_data_file,
)
from .verify import count_dataset, verify_latents
from .writer import ShardWriter, clean_staging, commit_shard, remove_orphans, shard_state

# What reading a damaged input shard raises (a truncated tar or parquet file, a parquet file whose schema differs
# from the first one's): the shard's one failure.
SHARD_READ_ERRORS = (OSError, EOFError, tarfile.TarError, ValueError, KeyError, zlib.error, pa.ArrowException)


def claim_shard(out: DatasetStore, claims: Claims, name: str) -> bool:
    """Claim shard `name` if it is not complete; True when this process now holds it and must do it. A manifest
    whose data file was lost is removed, so the shard is done again."""
    if shard_state(out, name) == "complete" or not claims.try_claim(name):
        return False
    state = shard_state(out, name)  # again, now that no one else can be committing it
    if state == "complete":
        claims.release(name)
        return False
    if state == "broken":
        out.remove(manifest_key(name))
    return True


def unfinished(store: DatasetStore, names: list[str], indices: list[int]) -> list[int]:
    """The indices of the shards not complete, in order. Listings narrow it down: a shard with no manifest listed
    is not done; on an object store (a request per shard would take hours for 100k shards) a shard with a listed
    manifest and a listed data file counts as done. A listing that lags only sends a worker to a shard that it
    then finds complete (it checks each shard by name before and after claiming it)."""
    listed = {f.removesuffix(".json") for f in store.list(MANIFEST_DIR, ".json")}
    if store.stages_data:  # a local folder: each listed shard checked (and a commit cut short finished)
        return [i for i in indices if names[i] not in listed or shard_state(store, names[i]) != "complete"]
    with_data = {shard_of_data_file(f) for f in store.list(DATA_DIR, DATA_SUFFIX)}
    return [i for i in indices if names[i] not in listed or names[i] not in with_data]


def unclaimed(store: DatasetStore, claims: Claims, names: list[str], indices: list[int]) -> list[int]:
    """The indices of the shards no live process holds: one listing of claims/, then a read of each listed claim
    (not a request for every shard left)."""
    listed = {f.removesuffix(CLAIM_SUFFIX) for f in store.list(CLAIM_DIR, CLAIM_SUFFIX)}
    return [i for i in indices if names[i] not in listed or not claims.held(names[i])]


def unique_keys(samples: Iterator[Sample], shard: str = "") -> Iterator[Sample]:
    """An input shard's samples with unique keys, by the documented rule: a key seen before in the shard is
    stored as KEY#2, KEY#3, ... (the first sample keeps KEY), and the shard's renamed keys are named in one line
    on stderr when it has been read. Repeats across shards are found by the verification that ends every run."""
    seen: set[str] = set()
    repeats: dict[str, int] = {}
    renamed: list[str] = []
    for sample in samples:
        key = sample.key
        while key in seen:
            repeats[sample.key] = repeats.get(sample.key, 1) + 1
            key = f"{sample.key}#{repeats[sample.key]}"
        seen.add(key)
        if key != sample.key:
            renamed.append(key)
        yield sample if key == sample.key else Sample(key, sample.image, sample.name, sample.passthrough)
    if renamed:
        shown = ", ".join(printable(k) for k in renamed[:5]) + (f" and {len(renamed) - 5} more" if len(renamed) > 5 else "")
        print(f"latent-vae: {printable(shard)}: {len(renamed)} repeated key(s) in the shard, stored as KEY#n: {shown}",
              file=sys.stderr)


def prepare_sample(shard: str, sample: Sample, fit_metadata: MetadataFitter, options: PrecomputeOptions,
                   buckets) -> dict:
    """One sample -> its item: {"kind": "image", "prepared", "metadata"} or {"kind": "failure", "key", "source",
    "reason", "message"}; a bad image or bad metadata is this sample's failure, never its shard's."""
    def failure(reason: str, message: str) -> dict:
        return {"kind": "failure", "shard": shard, "key": sample.key, "source": sample.name, "reason": reason,
                "message": message}

    if sample.image is None:  # a tar sample without an image member, a null in the image column
        return failure("missing", f"{sample.name}: no image")
    try:  # before decoding: a sample whose metadata fits no column is one failed input, never the shard's
        passthrough = fit_metadata(sample.passthrough)
    except MetadataError as error:
        return failure(BAD_METADATA, f"{sample.name}: {error}")
    try:
        image = load_image(sample.image, max_pixels=options.max_pixels, name=sample.name)
        prepared = prepare_image(image, options, buckets)
    except ImageError as error:
        return failure(failure_reason(error, sample.name), str(error))
    except SkipImage as skip:
        return failure(skip.reason, f"{sample.name}: {skip}")
    return {"kind": "image", "shard": shard, "prepared": prepared, "metadata": {fmt.KEY: sample.key, **passthrough}}


def unreadable_shard(shard, error: BaseException) -> dict:
    """The failure item of a shard that could not be read to the end (what was read before stays)."""
    where = getattr(shard, "path", shard.name)
    return {"kind": "failure", "shard": shard.name, "key": f"{shard.name}#unread", "source": shard.name,
            "reason": "unreadable_shard",
            "message": f"{where}: could not be read to the end ({type(error).__name__}: {error})"}


def failure_record(item: dict) -> dict:
    """A failure item as a manifest (and failures.jsonl) lists it."""
    return {k: item[k] for k in ("key", "source", "reason", "message")}


@dataclass
class OpenShard:
    """An output shard being written: its rows stream into a staged file, its failures are kept for its manifest."""

    writer: ShardWriter
    source: str
    beat: ClaimBeat  # what the heartbeat refreshes while the shard is open
    failures: list[dict] = field(default_factory=list)
    posterior: PosteriorStats = field(default_factory=PosteriorStats)  # of its rows, for its manifest


def open_shard(out: DatasetStore, claims: Claims, name: str, source: str, features,
               beat: ClaimBeat | None = None) -> OpenShard:
    """Start writing output shard `name` (claimed by this process), under a data file name of this attempt; `beat`:
    the claim's heartbeat handle, when it was taken at claiming time."""
    return OpenShard(ShardWriter(out, name, features, claims.owner.run_id[:12]), source, beat or claims.handle(name))


def commit_open_shard(out: DatasetStore, owner: Owner, name: str, shard: OpenShard) -> bool:
    """Finish the shard's data file and commit it by its manifest; False when another process committed `name` first."""
    staged, checksum = shard.writer.finish()
    manifest = fmt.Manifest(name, str(shard.source), shard.writer.rows, shard.failures, checksum,
                            staged.key.rsplit("/", 1)[-1] if staged.key != staged.final else "", HOST, os.getpid(),
                            owner.run_id, time.time(), staged.file, shard.posterior.record())
    return commit_shard(out, manifest, staged)


# -- a run's start and end --------------------------------------------------------------------------------------


def open_inputs(data, options: PrecomputeOptions, storage_options: dict | None = None) -> Source:
    return open_source(data, image_column=options.image_column, key_column=options.key_column,
                       caption_column=options.caption_column, split=options.split, shard_size=options.shard_size,
                       reserved=fmt.RESERVED_COLUMNS, storage_options=storage_options)


def open_output(codec, model_source: str | None, source: Source, out: DatasetStore, options: PrecomputeOptions):
    """Check the options against the model, write `latents.json` (or check it against a dataset begun before) and
    clean what dead processes left in staging/; returns the buckets (None: square crops)."""
    factor = codec.downsampling_factor
    step = options.bucket_step or factor
    if step % factor:
        raise ValueError(f"bucket_step {step} is not a multiple of the model's downsampling factor {factor}")
    if options.resolution % factor:
        raise ValueError(f"resolution {options.resolution} is not a multiple of the model's downsampling factor {factor}")
    buckets = make_buckets(options.resolution, step, options.max_aspect) if options.buckets else None
    info = fmt.LatentInfo(
        fingerprint=codec.fingerprint, normalization=codec.normalization.to_config(),
        latent_channels=codec.latent_channels, downsampling_factor=factor, resolution=options.resolution,
        buckets=[list(b) for b in buckets] if buckets else None, flip=options.flip,
        storage_dtype=dtype_name(fmt.storage_dtype(options.dtype)), encode_dtype=dtype_name(codec.dtype),
        max_upscale=options.max_upscale, image_column=source.image_column,
        key_column=source.key_column, passthrough=list(source.passthrough),
        input_shards=[s.name for s in source.shards], shard_size=None if source.sharded else options.shard_size,
        input_digest=source.keys_digest,
        model_source=model_source, data_source=source.description)
    fmt.create_or_check(out, info)
    clean_staging(out)
    return buckets


@dataclass
class RunCounts:
    """What one process (a rank, or the Ray driver) did."""

    encoded: int
    failed: int
    committed: int
    seconds: float


@dataclass
class PrecomputeSummary:
    """What a run did (this run) and what the dataset holds (all runs so far)."""

    out: str
    shards: int  # input shards
    shards_done_before: int  # complete before this run started
    rows: int  # latents in the dataset
    failures: int  # inputs that could not be used (each listed in failures.jsonl)
    failure_reasons: dict[str, int]
    encoded_this_run: int
    failed_this_run: int
    shards_this_run: int  # shards this run committed
    seconds: float
    images_per_second: float  # encoded this run / seconds, all ranks together
    world_size: int = 1
    complete: bool = True  # every shard committed and the closing verification found no problem
    problems: list[str] = field(default_factory=list)  # what that verification found (`verify_latents`)
    posterior_noise: float | None = None  # how far a posterior sample lies from its mean (`codec.posterior`)

    def line(self) -> str:
        """One line for a terminal."""
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.failure_reasons.items()))
        return (f"{self.rows} latents ({self.encoded_this_run} this run), {self.failures} failed"
                f"{f' ({reasons})' if reasons else ''}, {self.shards} shards ({self.shards_done_before} done before, "
                f"{self.shards_this_run} this run) -> {self.out}  [{self.images_per_second:.1f} img/s, "
                f"{self.seconds:.1f} s, {self.world_size} process(es)]"
                + ("" if self.posterior_noise is None else f", posterior noise {self.posterior_noise:.3g}"))


def finish_run(out: DatasetStore, names: list[str], done_before: int, per_process: list[RunCounts],
               is_main: bool = True) -> PrecomputeSummary:
    """The end of every run: (the main process) removes what lost attempts left, verifies the dataset, records
    the posterior's noise in latents.json (saying so when a sample would be mostly noise), writes failures.jsonl
    and summary.json. Returns the summary."""
    if is_main:  # what attempts that lost a commit (or were killed) left beside the winners' data
        remove_orphans(out, {n: m.data_file for n, m in fmt.read_manifests(out, names).items()})
    counts = count_dataset(out)
    # Every run ends by verifying what the dataset holds (manifests, row counts, every key once; `--verify` also
    # checks every file's sha256), so that it never calls complete a dataset that `--verify` rejects.
    problems = verify_latents(out, checksums=False, posterior_warning=False).problems if is_main else []
    noise = counts.posterior.noise_ratio()
    wall = max(r.seconds for r in per_process)
    encoded = sum(r.encoded for r in per_process)
    summary = PrecomputeSummary(
        out=out.where(), shards=counts.shards, shards_done_before=done_before, rows=counts.rows,
        failures=counts.failures, failure_reasons=counts.failure_reasons, encoded_this_run=encoded,
        failed_this_run=sum(r.failed for r in per_process), shards_this_run=sum(r.committed for r in per_process),
        seconds=wall, images_per_second=encoded / wall if wall > 0 else 0.0, world_size=len(per_process),
        complete=counts.complete and not problems, problems=problems, posterior_noise=noise)
    if is_main:
        info = fmt.LatentInfo.read(out)
        info.posterior = counts.posterior.record()
        out.write(fmt.INFO_FILE, info.to_json().encode())
        warn_if_noisy(noise, info.model_source or info.fingerprint, where=out.where(),
                      advice="train on the stored means (load_latents(..., sample=False))")
        failures = fmt.read_failures(out)
        out.write(fmt.FAILURES_FILE, "".join(json.dumps(f) + "\n" for f in failures).encode())
        out.write(fmt.SUMMARY_FILE, json.dumps(asdict(summary), indent=2).encode())
    return summary
