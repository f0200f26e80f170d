"""Resumable checkpoints: everything a run needs to continue exactly, written atomically.

    OUTPUT_DIR/checkpoint-0001000/   one complete checkpoint (only ever created by a rename)
        vae.safetensors, ema.safetensors, discriminator.safetensors   weights (safetensors)
        optimizer.pt, disc_optimizer.pt   optimiser states (torch.save; read back with weights_only=True)
        trainer_state.json   step, data position, counters, schedulers, scaler, EMA settings, config
        rng-RANK.safetensors + rng-RANK.json   each rank's torch / numpy / python RNG state
        manifest.json   every other file's size and SHA-256, written last
    OUTPUT_DIR/latest        the name of the newest complete checkpoint

A checkpoint is written under `.checkpoint-N.tmp` and renamed when complete, so a run killed while
writing leaves the previous checkpoint (and `latest`) intact; the stale temporary folder is removed
by the next save. `--resume latest` checks the newest checkpoint against its manifest (a disk that
lost or damaged a file after the rename) and falls back to the newest intact one, saying which it
skipped and why. Only our own files are read, and pickles only with `weights_only=True`.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from latent_vae.utils.atomic import atomic_write_text, file_sha256, fsync_path, fsync_tree

PREFIX = "checkpoint-"
LATEST = "latest"  # the newest checkpoint's name, for people and scripts; resuming checks the folders themselves
MANIFEST = "manifest.json"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def complete_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints (temporary folders never match the prefix), oldest first."""
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def write_manifest(folder: Path) -> None:
    """Record every file's size and SHA-256, so that a later resume can tell an intact checkpoint from a damaged one."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    atomic_write_text(folder / MANIFEST, json.dumps({"files": files}, indent=1))


def checkpoint_problem(folder: Path) -> str | None:
    """Why this checkpoint cannot be resumed from (a file missing, of the wrong size or content), or None if intact."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        records = [(name, int(record["bytes"]), str(record["sha256"])) for name, record in files.items()]
    except FileNotFoundError:
        # Written before manifests: check what can be checked without one.
        return None if (folder / "trainer_state.json").is_file() else "trainer_state.json is missing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"{MANIFEST} is unreadable ({error})"
    for name, size, sha256 in records:
        path = folder / name
        try:
            actual = path.stat().st_size
            if actual != size:
                return f"{name} is {actual} bytes, {size} were written"
            if file_sha256(path) != sha256:
                return f"{name} is damaged (its SHA-256 is not the one recorded when it was written)"
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as error:
            return f"{name} cannot be read ({error.strerror or error})"
    return None


def find_checkpoint(out_dir: Path, resume: str, report=print) -> Path | None:
    """`resume` = "latest": the newest intact checkpoint of the run (each damaged one skipped and reported through
    `report`), or None when the run has none yet; otherwise a checkpoint folder, which must be intact."""
    if resume != "latest":
        path = Path(resume).expanduser()
        if not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (no trainer_state.json)")
        problem = checkpoint_problem(path)
        if problem:
            raise ValueError(f"--resume {resume}: damaged checkpoint: {problem}")
        return path
    found = complete_checkpoints(out_dir)
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        report(f"skipping damaged checkpoint {path}: {problem}")
    if found:
        # Starting fresh would soon delete them (keep_checkpoints): let the person decide.
        raise ValueError(f"--resume latest: none of the {len(found)} checkpoints in {out_dir} is intact (see above); "
                         "delete them to start fresh, or pass --resume with another checkpoint folder")
    report(f"--resume latest: no checkpoint in {out_dir} yet, starting fresh")
    return None


def _named_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [version, list(internal), gauss_next]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["cuda"]))
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_checkpoint(accelerator, out_dir: Path, step: int, *, vae, discriminator, ema, optimizers: dict,
                    trainer_state: dict, keep: int) -> Path:
    """Every rank calls this (each writes its RNG state); the main process writes the rest."""
    out_dir = Path(out_dir)
    final = out_dir / checkpoint_name(step)
    tmp = out_dir / f".{checkpoint_name(step)}.tmp"
    if accelerator.is_main_process:
        for stale in out_dir.glob(f".{PREFIX}*.tmp"):  # left by a run killed while writing
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rank = accelerator.process_index
    tensors, meta = rng_state()
    save_file(tensors, str(tmp / f"rng-{rank}.safetensors"))
    (tmp / f"rng-{rank}.json").write_text(json.dumps(meta))
    if accelerator.is_main_process:
        save_file(_named_tensors(vae), str(tmp / "vae.safetensors"))
        if discriminator is not None:
            save_file(_named_tensors(discriminator), str(tmp / "discriminator.safetensors"))
        state = dict(trainer_state)
        if ema is not None:
            ema_state = ema.state_dict()
            names = [name for name, _ in vae.named_parameters()]
            shadow = ema_state.pop("shadow_params")
            save_file({n: p.detach().contiguous().cpu() for n, p in zip(names, shadow)}, str(tmp / "ema.safetensors"))
            state["ema"] = ema_state
        for name, optimizer in optimizers.items():
            torch.save(optimizer.state_dict(), tmp / f"{name}.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_manifest(tmp)
        fsync_tree(tmp)  # on disk before the rename makes the checkpoint visible
        if final.exists():  # the same step saved again (after a resume, or over a damaged one): replace it
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_path(out_dir)
        atomic_write_text(out_dir / LATEST, final.name)
        for old in complete_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, rank: int, *, vae, discriminator, ema, optimizers: dict) -> dict:
    """Restore weights, optimisers, EMA and this rank's RNG in place; returns trainer_state.json's dict."""
    path = Path(path)
    state = json.loads((path / "trainer_state.json").read_text())
    vae.load_state_dict(load_file(str(path / "vae.safetensors")), strict=True)
    if discriminator is not None:
        discriminator.load_state_dict(load_file(str(path / "discriminator.safetensors")), strict=True)
    if ema is not None:
        shadow = load_file(str(path / "ema.safetensors"))
        names = [name for name, _ in vae.named_parameters()]
        device = next(vae.parameters()).device
        ema.load_state_dict({**state["ema"], "shadow_params": [shadow[n].to(device) for n in names]})
    for name, optimizer in optimizers.items():
        # Our own file, and weights_only=True unpickles tensors and plain containers only.
        optimizer.load_state_dict(torch.load(path / f"{name}.pt", map_location="cpu", weights_only=True))
    rng_file = path / f"rng-{rank}.safetensors"
    if rng_file.is_file():
        set_rng_state(load_file(str(rng_file)), json.loads((path / f"rng-{rank}.json").read_text()))
    else:  # resumed on more processes than saved: this rank starts a fresh, distinct stream
        torch.manual_seed(state["seed"] + rank + 7919 * state["step"])
    return state
