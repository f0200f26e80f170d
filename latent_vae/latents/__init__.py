"""Latents on disk: one latent per file, and latent datasets (encode a dataset's images once, train on their
latents many times).

One module per subject, from the disk up:
    single_file one latent per `.safetensors` file, with what is needed to decode it right
    storage     where a dataset lives: its folder's layout and the protocol's operations (DatasetStore,
                LocalStore for a folder)
    object_store  the same on s3:// and gs:// through fsspec (conditional writes, data named per attempt)
    locations   a path or a URL -> its store (`open_store`)
    provenance  which model made a latent: the one check, for a latent file and a dataset
    format      the dataset's records and columns: `latents.json` (LatentInfo), manifests, byte packing
    writer      the row schema, the streaming shard writer, and the exactly-once commit of a shard
    verify      counting and verifying a dataset against its own records
    readers     `load_latents` for training (map-style or streaming), collate, same-shape batches
    sources     the inputs: tar shards, parquet/arrow files, image folders (local or in a bucket), 🤗 datasets
    claims      which process works on which shard (claim records with heartbeats)
    options     `PrecomputeOptions`, one field per `latent-vae precompute` flag
    encoding    preprocessing and the pure per-batch function (images -> rows)
    run         what a precompute run is, whatever its engine: its start, one shard's claim, items and commit,
                its summary
    precompute  `precompute_latents` and the local engine: workers read and decode, the main process encodes,
                a writer thread commits
    ray_engine  the Ray engine: a Ray Data pipeline (read and decode tasks, encoder actors), the same dataset
"""
