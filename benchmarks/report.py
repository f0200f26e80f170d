"""Shared by the benchmark scripts: machine description, timing, and JSON + markdown output."""

from __future__ import annotations

import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import torch

from latent_vae.utils.atomic import atomic_write_text

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """What the numbers were measured on: name the card, the CPU and the thread count."""
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def device_label(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 1, repeats: int = 3) -> float:
    """Median seconds of `fn()` after `warmup` untimed calls (the median resists a noisy shared machine)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def save_figure(fig, stem: str, dpi: int = 120) -> Path:
    """`results/STEM.png` from a matplotlib figure."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    path = RESULTS_DIR / f"{stem}.png"
    fig.savefig(path, dpi=dpi)
    print(f"wrote {path}")
    return path


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    columns = list(columns or rows[0].keys())

    def cell(value) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(
    name: str, rows: Sequence[dict], *, notes: str = "", columns: Sequence[str] | None = None,
    out_dir: Path = RESULTS_DIR, extra: dict | None = None,
) -> tuple[Path, Path]:
    """`results/NAME.json` (rows + machine + notes) and `results/NAME.md` (a table for benchmarks/README.md)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"benchmark": name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine()}
    json_path = out_dir / f"{name}.json"
    # Atomic: a benchmark killed while writing leaves the previous results, not half a file.
    atomic_write_text(json_path, json.dumps({**meta, **(extra or {}), "notes": notes, "rows": list(rows)}, indent=2))
    where = meta["machine"].get("gpu") or f"{meta['machine']['cpu']}, {meta['machine']['torch_threads']} threads"
    md = f"### {name}\n\nMeasured {meta['date']} on {where}, torch {meta['machine']['torch']}.\n\n"
    md += markdown_table(rows, columns) + "\n"
    if notes:
        md += f"\n{notes}\n"
    md_path = out_dir / f"{name}.md"
    atomic_write_text(md_path, md)
    print(md)
    return json_path, md_path


def photo_folder() -> Path:
    """Where the quality benchmarks find real photographs: `$LATENT_VAE_PHOTOS`, a folder holding the
    CBSD68 and Set14 test photos as `cbsd68/` and `cset14/` (default: `photos/` in the working folder)."""
    return Path(os.environ.get("LATENT_VAE_PHOTOS", "photos"))
