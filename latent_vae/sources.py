"""Datasets on disk, read one way for training and for precompute: a `save_to_disk` folder, `.parquet` or
`.arrow` files, or a folder of them; an image folder is left to the caller (`open_saved_dataset` -> None)."""

from __future__ import annotations

from pathlib import Path

from .images import IMAGE_SUFFIXES

TABLE_SUFFIXES = (".parquet", ".arrow")
# What `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write at the top of their folder.
SAVED_MARKERS = ("state.json", "dataset_dict.json")


def open_saved_dataset(path: str | Path, split: str | None = None, cache_dir: str | None = None):
    """A datasets.Dataset for a save_to_disk folder, a .parquet/.arrow file, or a folder holding such files and
    no images; None for anything else (an image folder). ValueError names what is wrong (a bad suffix, a
    split that is not there)."""
    import datasets

    path = Path(path).expanduser()
    if path.is_file():
        return read_table_files([path], str(path), cache_dir)
    if any((path / marker).is_file() for marker in SAVED_MARKERS):
        return pick_split(datasets.load_from_disk(str(path)), split, str(path))
    tables = sorted(p for p in path.rglob("*") if p.suffix in TABLE_SUFFIXES)
    if tables and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*")):
        return read_table_files(tables, str(path), cache_dir)
    return None


def read_table_files(files: list[Path], where: str, cache_dir: str | None = None):
    """One datasets.Dataset from .parquet files or from .arrow files (not a mix)."""
    import datasets

    if not files:
        raise ValueError(f"{where}: matches no files")
    suffixes = {f.suffix for f in files}
    if suffixes == {".parquet"}:
        return datasets.Dataset.from_parquet([str(f) for f in files], cache_dir=cache_dir)
    if suffixes == {".arrow"}:
        return datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in files])
    raise ValueError(f"{where}: expected .parquet or .arrow files (or an image folder), got {', '.join(sorted(suffixes))}")


def pick_split(dataset, split: str | None, where: str):
    """The split of a DatasetDict (default: "train", or the only one); a Dataset is returned as it is."""
    import datasets

    if not isinstance(dataset, datasets.DatasetDict):
        return dataset
    if split is None:
        if "train" in dataset or len(dataset) == 1:
            split = "train" if "train" in dataset else next(iter(dataset))
        else:
            raise ValueError(f"{where} has splits {', '.join(dataset)}: choose one with --split")
    if split not in dataset:
        raise ValueError(f"{where} has no split {split!r} (it has {', '.join(dataset)})")
    return dataset[split]
