"""Resumable checkpoints: everything a run needs to continue exactly, written atomically.

    OUTPUT_DIR/checkpoint-0001000/   one complete checkpoint (only ever created by a rename)
        vae.safetensors, ema.safetensors, discriminator.safetensors   weights (safetensors)
        optimizer.pt, disc_optimizer.pt   optimiser states (torch.save; read back with weights_only=True)
        trainer_state.json   step, data position, counters, schedulers, scaler, EMA settings, config
        rng-RANK.safetensors + rng-RANK.json   each rank's torch / numpy / python RNG state
    OUTPUT_DIR/latest        the name of the newest complete checkpoint

A checkpoint is written under `.checkpoint-N.tmp` and renamed when complete, so a run killed while
writing leaves the previous checkpoint (and `latest`) intact; the stale temporary folder is removed
by the next save. Only our own files are read, and pickles only with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "checkpoint-"
LATEST = "latest"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def complete_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints (temporary folders never match the prefix), oldest first."""
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def find_checkpoint(out_dir: Path, resume: str) -> Path | None:
    """`resume` = "latest" (None when the run has no checkpoint yet) or a checkpoint folder."""
    if resume != "latest":
        path = Path(resume).expanduser()
        if not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (no trainer_state.json)")
        return path
    pointer = out_dir / LATEST
    if pointer.is_file():
        path = out_dir / pointer.read_text().strip()
        if (path / "trainer_state.json").is_file():
            return path
    # No pointer (or it names a folder that is gone): the newest complete checkpoint.
    found = complete_checkpoints(out_dir)
    return found[-1] if found else None


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
        if final.exists():  # the same step saved again (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text_atomic(out_dir / LATEST, final.name)
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
