"""Running the command line in-process as a hostile user would, and checking what it promises: the exit status,
one line naming the bad input, no traceback, and nothing written outside `--out` (shared by test_hostile_options
and test_fuzz)."""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np
from helpers import smooth_image
from PIL import Image

from latent_vae.cli import main


def run_cli(*argv) -> tuple[int, str, str]:
    """`latent-vae ARGV` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def error_lines(err: str) -> list[str]:
    """The lines that report a failure: `PROG: error: ...` (nothing could run) and `failed: ...` (one input)."""
    return [line for line in err.splitlines() if line.startswith("failed: ") or ": error: " in line]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `root`: relative path -> (size, mtime_ns); a folder's size is 0."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            stat = path.lstat()
            found[str(path.relative_to(root))] = (0 if path.is_dir() else stat.st_size, stat.st_mtime_ns)
    return found


def changed_outside(before: dict, after: dict, *outs: str) -> list[str]:
    """Paths created, changed or removed under the root other than `outs` and what is below them."""
    def inside(path: str) -> bool:
        return any(path == out or path.startswith(out.rstrip("/") + "/") for out in outs)

    changed = [p for p in set(before) | set(after) if before.get(p) != after.get(p)]
    return sorted(p for p in changed if not inside(p))


def check_promises(code: int, err: str, *, allowed: tuple[int, ...] = (0, 1, 2)) -> list[str]:
    """The command line's promises for any input: a documented status, no traceback, and each failure on one
    line. Returns the failure lines."""
    assert code in allowed, (code, err[-2000:])
    assert "Traceback" not in err and "internal error" not in err, err[-2000:]
    lines = error_lines(err)
    if code == 2:
        assert len([line for line in lines if ": error: " in line]) == 1, err
    if code == 1:
        assert any(line.startswith("failed: ") or "not complete" in line for line in err.splitlines()), err
    return lines


def png_bytes(seed: int, height: int = 32, width: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(smooth_image(height, width, seed=seed)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: Path, seed: int = 0, height: int = 32, width: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(seed, height, width))
    return path


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def random_bytes(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
