"""`latent-vae inspect`'s page: one self-contained HTML file (pictures as base64 PNG, plots as inline SVG)
that opens from disk in any browser, with one column per model."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from ..utils.atomic import atomic_write_text
from .measures import ACTIVE_THRESHOLD, HALF_NYQUIST
from .svg_plots import Series, bar_chart, line_plot

# The measuring side (and diffusers with it) is imported where it is used: `latent-vae --help` reads FIGURES.
if TYPE_CHECKING:
    from .report import ModelInspection

# One line per figure: the page shows these, and `latent-vae inspect --help` lists them.
FIGURES = {
    "summary": "the headline numbers of each model side by side, each with what it means for diffusion",
    "spectrum": "radially averaged power spectra of the normalised latents and of the images at latent size "
                "(white noise = 1); energy right of half Nyquist is what diffusion finds hard",
    "channels": "per latent channel: activity (variance of the posterior mean across images, Burda et al.), "
                "mean, std, KL to N(0, 1) and posterior std; grey bars are inactive channels",
    "reconstruction": "original | reconstruction | bicubic at equal values | error x4, with PSNR",
    "equivariance": "downsample(x) | decode(downsample(z)) | error: a scale-equivariant decoder (Skorokhodov et "
                    "al. 2025) makes the first two equal",
    "interpolation": "images decoded along the straight path between two latents; even steps mean a smooth space",
    "pca": "each image's latent, its first three principal components (over positions) shown as RGB",
}

REPORT_FILES = ("index.html", "report.json")  # what `write_report` writes into its folder

STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1800px; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 32px; }
p.figure { color: #555; margin-top: 0; }
table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
td.text, th.text { text-align: left; }
tr.inactive td { color: #999; }
.models { display: flex; gap: 24px; flex-wrap: wrap; align-items: flex-start; }
.model { flex: 1 1 0; min-width: 520px; }
.model svg { max-width: 100%; height: auto; }
.wide { overflow-x: auto; }
.model h3 { margin: 8px 0; }
img { max-width: 100%; image-rendering: auto; border: 1px solid #eee; }
.note { background: #fff6d5; padding: 6px 10px; border-left: 4px solid #e0b000; }
"""


def png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _number(value, digits: int = 3, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value}{suffix}"
    return f"{value:.{digits}f}{suffix}"


def _equivariance(factor: int, key: str = "psnr_mean") -> Callable[[dict], str]:
    return lambda n: _number(n["scale_equivariance"].get(f"{factor}x", {}).get(key), 2, " dB")


# (measure, how to read it from a model's numbers, what it means)
SUMMARY_ROWS: list[tuple[str, Callable[[dict], str], str]] = [
    ("latent shape", lambda n: " x ".join(map(str, n["latent_shape"])), "channels x height x width"),
    ("compression", lambda n: _number(n["reconstruction"]["compression"], 1, " x"), "pixel values per latent value"),
    ("reconstruction PSNR", lambda n: _number(n["reconstruction"]["psnr_mean"], 2, " dB"), "fidelity: higher is better"),
    ("reconstruction SSIM", lambda n: _number(n["reconstruction"]["ssim_mean"], 3), "structure: 1 is perfect"),
    ("bicubic PSNR, equal values", lambda n: _number(n["reconstruction"]["bicubic_psnr_mean"], 2, " dB"),
     "the baseline with as many numbers as the latent: a VAE should beat it"),
    ("bicubic SSIM, equal values", lambda n: _number(n["reconstruction"]["bicubic_ssim_mean"], 3), ""),
    ("latent high-frequency share", lambda n: _number(n["spectrum"]["latent"]["high_frequency_share"], 3),
     f"energy above {HALF_NYQUIST:g} x Nyquist: lower diffuses better (Skorokhodov et al.)"),
    ("image high-frequency share", lambda n: _number(n["spectrum"]["image"]["high_frequency_share"], 3),
     "the same for the images at latent size: a latent near it is as smooth as its image"),
    ("white noise high-frequency share", lambda n: _number(n["spectrum"]["white_noise_high_frequency_share"], 3),
     "the share of the frequency plane above the cutoff"),
    ("scale equivariance 2x", _equivariance(2), "PSNR of decode(downsample(z)) against downsample(x)"),
    ("  downsampled reconstruction 2x", _equivariance(2, "reconstruction_downsampled_psnr_mean"),
     "the same for the full reconstruction downsampled: the ceiling"),
    ("scale equivariance 4x", _equivariance(4), "where the latent is large enough"),
    ("  downsampled reconstruction 4x", _equivariance(4, "reconstruction_downsampled_psnr_mean"), ""),
    ("active channels", lambda n: f"{n['channels']['active_count']} of {n['description']['latent_channels']}",
     f"activity above {ACTIVE_THRESHOLD:g} of the mean channel's: the rest carry nothing"),
    ("KL to N(0, 1)", lambda n: _number(n["channels"]["kl_mean"], 2, " nats"), "per latent value, raw posterior"),
    ("normalised latent std", lambda n: _number(sum(n["channels"]["std"]) / len(n["channels"]["std"]), 3),
     "mean over channels; a diffusion model wants about 1"),
    ("interpolation unevenness", lambda n: _number(n["interpolation"]["variation_mean"], 3),
     "std / mean of the image change between frames: 0 is perfectly even"),
    ("PCA 1-3 variance share", lambda n: ", ".join(f"{v:.2f}" for v in n["pca_variance_share_mean"]),
     "of a latent's channels over its positions: how few directions it uses"),
]


def _summary(inspections: Sequence[ModelInspection]) -> str:
    header = "".join(f"<th>{escape(i.label)}</th>" for i in inspections)
    rows = [f'<tr><th class="text">measure</th>{header}<th class="text">meaning</th></tr>']
    for name, read, meaning in SUMMARY_ROWS:
        cells = "".join(f"<td>{escape(read(i.numbers))}</td>" for i in inspections)
        rows.append(f'<tr><td class="text">{escape(name)}</td>{cells}<td class="text">{escape(meaning)}</td></tr>')
    return "<table>" + "".join(rows) + "</table>"


def _spectrum(inspections: Sequence[ModelInspection]) -> str:
    series = []
    for i in inspections:
        spectrum = i.spectra["latent"]
        average = sum(spectrum.power) / sum(spectrum.counts)  # per frequency: the level of white noise of that power
        series.append(Series(f"{i.label}: latent", spectrum.centres, [p / average for p in spectrum.mean_power]))
    image = inspections[0].spectra["image"]
    average = sum(image.power) / sum(image.counts)
    series.append(Series("images at latent size", image.centres, [p / average for p in image.mean_power], dashed=True))
    return line_plot(series, title="radially averaged power spectrum", x_label="frequency / Nyquist",
                     y_label="power / white noise of equal energy", log_y=True,
                     vertical_line=(HALF_NYQUIST, "half Nyquist"))


def _channels(inspection: ModelInspection) -> str:
    stats = inspection.channels
    labels = [str(c) for c in range(len(stats.activity))]
    chart = bar_chart([max(a, 0.0) for a in stats.activity], labels, title=f"{inspection.label}: channel activity",
                      y_label="activity / mean channel's", log_y=True, highlight=stats.active,
                      threshold=(ACTIVE_THRESHOLD, f"active above {ACTIVE_THRESHOLD:g}"))
    head = ("<tr><th>ch</th><th>active</th><th>activity</th><th>mean</th><th>std</th><th>KL nats</th>"
            "<th>posterior std</th><th>posterior std (normalised)</th><th>high-freq share</th></tr>")
    rows = []
    for c in range(len(stats.activity)):
        values = [stats.activity[c], stats.mean[c], stats.std[c], stats.kl[c], stats.posterior_std[c],
                  stats.posterior_std_normalised[c], stats.high_frequency_share[c]]
        cells = "".join(f"<td>{_number(v, 4) if abs(v or 0) < 1000 else f'{v:.3g}'}</td>" for v in values)
        rows.append(f'<tr class="{"" if stats.active[c] else "inactive"}"><td>{c}</td>'
                    f"<td>{_number(stats.active[c])}</td>{cells}</tr>")
    return chart + '<div class="wide"><table>' + head + "".join(rows) + "</table></div>"


def _picture(inspection: ModelInspection, key: str) -> str:
    picture = inspection.pictures.get(key)
    if picture is None:
        return "<p>not measured at this size (the latent is too small)</p>"
    return f'<img alt="{escape(key)}" src="{png_data_uri(picture)}">'


def _equivariance_pictures(inspection: ModelInspection) -> str:
    factors = [key.removeprefix("equivariance_") for key in inspection.pictures if key.startswith("equivariance_")]
    if not factors:
        return _picture(inspection, "equivariance_2x")
    return "".join(f"<h4>{escape(f)}: {_equivariance(int(f[:-1]))(inspection.numbers)}</h4>"
                   + _picture(inspection, f"equivariance_{f}") for f in factors)


def _interpolation(inspection: ModelInspection) -> str:
    lines = [f"path {p + 1}: unevenness {e.variation:.3f}, largest step {e.max_over_mean:.2f} x the mean; steps "
             + ", ".join(f"{s:.3f}" for s in e.steps) for p, e in enumerate(inspection.evenness)]
    return _picture(inspection, "interpolation") + "".join(f"<p>{escape(line)}</p>" for line in lines)


def _notes(inspection: ModelInspection) -> str:
    notes = []
    description = inspection.numbers["description"]
    if description["normalization_neutral"]:
        notes.append("normalisation is neutral (scale 1, shift 0): the latent statistics are the raw network's; "
                     "`latent-vae calibrate` measures the constants a diffusion model needs")
    stats = inspection.channels
    noisy = [c for c, active in enumerate(stats.active) if active and stats.posterior_std_normalised[c] > stats.std[c]]
    if noisy:
        notes.append(f"the posterior's std is above the latent's own std in active channels {noisy}: a posterior "
                     "sample (encode with sample=True) is mostly noise there; the mode (the default) is not")
    if not inspection.numbers["scale_equivariance"]:
        notes.append("scale equivariance not measured: the latent is too small to downsample (use a larger --resolution)")
    return "".join(f'<p class="note">{escape(n)}</p>' for n in notes)


def _per_model(inspections: Sequence[ModelInspection], body: Callable[[ModelInspection], str]) -> str:
    columns = "".join(f'<div class="model"><h3>{escape(i.label)}</h3>{body(i)}</div>' for i in inspections)
    return f'<div class="models">{columns}</div>'


def _section(title: str, key: str, content: str) -> str:
    return f'<h2 id="{key}">{escape(title)}</h2><p class="figure">{escape(FIGURES[key])}</p>{content}'


def render_page(inspections: Sequence[ModelInspection], *, data: str, image_count: int, resolution: int) -> str:
    """The whole page as one string."""
    from .. import __version__

    names = " vs ".join(i.label for i in inspections)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sources = "; ".join(f"{escape(i.label)} = {escape(i.numbers['description']['model'])} (fingerprint "
                        f"{escape(i.numbers['description']['fingerprint'])})" for i in inspections)
    sections = [
        _section("Summary", "summary", _summary(inspections) + _per_model(inspections, _notes)),
        _section("Spectrum", "spectrum", _spectrum(inspections)),
        _section("Latent channels", "channels", _per_model(inspections, _channels)),
        _section("Reconstruction", "reconstruction", _per_model(inspections, lambda i: _picture(i, "reconstruction"))),
        _section("Scale equivariance", "equivariance", _per_model(inspections, _equivariance_pictures)),
        _section("Interpolation", "interpolation", _per_model(inspections, _interpolation)),
        _section("Latent picture", "pca", _per_model(inspections, lambda i: _picture(i, "pca"))),
    ]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>latent-vae inspect: {escape(names)}'
            f"</title><style>{STYLE}</style></head><body><h1>Latent space: {escape(names)}</h1>"
            f"<p>{image_count} images of {escape(data)} at {resolution}x{resolution}; {sources}. "
            f"latent-vae {__version__}, {when}. The same numbers are in report.json.</p>"
            + "".join(sections) + "</body></html>\n")


def write_report(out_dir: Path, inspections: Sequence[ModelInspection], *, data: str, image_names: Sequence[str],
                 resolution: int) -> tuple[Path, Path]:
    """OUT/index.html and OUT/report.json (the same numbers), each written atomically."""
    from .report import report_json

    out_dir.mkdir(parents=True, exist_ok=True)
    numbers = report_json(inspections, data=data, image_names=image_names, resolution=resolution)
    page_name, json_name = REPORT_FILES
    json_path = atomic_write_text(out_dir / json_name, json.dumps(numbers, indent=2, allow_nan=False) + "\n")
    page = render_page(inspections, data=data, image_count=len(image_names), resolution=resolution)
    return atomic_write_text(out_dir / page_name, page), json_path
