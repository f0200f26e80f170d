"""Small inline SVG charts (a line plot, a bar chart) for self-contained HTML reports: no plotting library."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

# Tableau's first colours: distinguishable, and readable by most colour-blind viewers.
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
WIDTH, HEIGHT = 560, 320
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 28, 48
LEGEND_LINE = 16


@dataclass(frozen=True)
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float]
    dashed: bool = False


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    step = 10 ** math.floor(math.log10((high - low) / count))
    for multiple in (1, 2, 2.5, 5, 10):
        if (high - low) / (step * multiple) <= count:
            step *= multiple
            break
    first = math.ceil(low / step - 1e-9) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _format(value: float) -> str:
    return f"{value:g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.0e}"


def _frame(title: str, x_label: str, y_label: str, extra_height: int = 0) -> list[str]:
    """The SVG element, title, axis labels and plot box; `extra_height` pixels below for a legend."""
    height = HEIGHT + extra_height
    return [
        (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" '
         'font-family="sans-serif" font-size="11">'),
        f'<text x="{WIDTH / 2}" y="16" text-anchor="middle" font-size="13">{escape(title)}</text>',
        f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 8}" text-anchor="middle">{escape(x_label)}</text>',
        (f'<text transform="translate(14 {(TOP + HEIGHT - BOTTOM) / 2}) rotate(-90)" text-anchor="middle">'
         f'{escape(y_label)}</text>'),
        (f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" height="{HEIGHT - TOP - BOTTOM}" fill="none" '
         'stroke="#888"/>'),
    ]


def line_plot(series: Sequence[Series], *, title: str, x_label: str, y_label: str, log_y: bool = False,
              vertical_line: tuple[float, str] | None = None) -> str:
    """An SVG line plot of `series` (non-positive values are left out of a log axis), with a legend and an
    optional labelled vertical line (x, label)."""
    points = [(x, y) for s in series for x, y in zip(s.x, s.y) if not log_y or y > 0]
    if not points:
        return "\n".join(_frame(title, x_label, y_label) + ['<text x="200" y="160">no data</text>', "</svg>"])
    transform = (lambda y: math.log10(y)) if log_y else (lambda y: y)
    x_low, x_high = min(p[0] for p in points), max(p[0] for p in points)
    ys = [transform(p[1]) for p in points]
    y_low, y_high = min(ys), max(ys)
    if y_high - y_low < 1e-12:
        y_low, y_high = y_low - 1, y_high + 1
    if x_high - x_low < 1e-12:
        x_low, x_high = x_low - 1, x_high + 1
    if log_y:
        y_low, y_high = math.floor(y_low), math.ceil(y_high)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    px = lambda x: LEFT + (x - x_low) / (x_high - x_low) * plot_w
    py = lambda y: TOP + (1 - (y - y_low) / (y_high - y_low)) * plot_h
    parts = _frame(title, x_label, y_label, extra_height=LEGEND_LINE * len(series) + 4)
    for tick in _ticks(x_low, x_high):
        parts.append(f'<line x1="{px(tick):.1f}" y1="{TOP + plot_h}" x2="{px(tick):.1f}" y2="{TOP + plot_h + 4}" '
                     f'stroke="#888"/><text x="{px(tick):.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">'
                     f'{_format(tick)}</text>')
    y_ticks = range(int(y_low), int(y_high) + 1) if log_y else _ticks(y_low, y_high)
    for tick in y_ticks:
        label = _format(10.0**tick) if log_y else _format(tick)
        parts.append(f'<line x1="{LEFT}" y1="{py(tick):.1f}" x2="{LEFT + plot_w}" y2="{py(tick):.1f}" stroke="#eee"/>'
                     f'<text x="{LEFT - 4}" y="{py(tick) + 4:.1f}" text-anchor="end">{label}</text>')
    if vertical_line is not None and x_low <= vertical_line[0] <= x_high:
        x = px(vertical_line[0])
        parts.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + plot_h}" stroke="#555" '
                     f'stroke-dasharray="2 3"/><text x="{x + 3:.1f}" y="{TOP + 12}">{escape(vertical_line[1])}</text>')
    for i, s in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{px(x):.1f},{py(transform(y)):.1f}" for x, y in zip(s.x, s.y) if not log_y or y > 0)
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        legend_y = HEIGHT + LEGEND_LINE * (i + 1)  # below the plot: long labels keep the whole width
        parts.append(f'<line x1="{LEFT}" y1="{legend_y - 4}" x2="{LEFT + 20}" y2="{legend_y - 4}" stroke="{colour}" '
                     f'stroke-width="2"{dash}/><text x="{LEFT + 26}" y="{legend_y}">{escape(s.label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def bar_chart(values: Sequence[float], labels: Sequence[str], *, title: str, y_label: str, log_y: bool = False,
              threshold: tuple[float, str] | None = None, highlight: Sequence[bool] | None = None) -> str:
    """An SVG bar chart; `highlight` colours some bars (the others grey), `threshold` draws a labelled line."""
    shown = [v for v in values if not log_y or v > 0] + ([threshold[0]] if threshold else [])
    transform = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    if log_y:
        # a decade below the threshold at least, so that the threshold line is not the axis itself
        low = math.floor(min(transform(v) for v in shown)) if shown else -1
        if threshold is not None:
            low = min(low, math.floor(transform(threshold[0])) - 1)
        high = math.ceil(max(transform(v) for v in shown)) if shown else 0
        high = max(high, low + 1)
    else:
        low, high = 0.0, max(shown + [1e-12]) * 1.05
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    py = lambda v: TOP + (1 - (transform(v) - low) / (high - low)) * plot_h
    parts = _frame(title, "latent channel", y_label)
    ticks = [10.0**t for t in range(int(low), int(high) + 1)] if log_y else _ticks(low, high)
    for tick in ticks:
        parts.append(f'<line x1="{LEFT}" y1="{py(tick):.1f}" x2="{LEFT + plot_w}" y2="{py(tick):.1f}" stroke="#eee"/>'
                     f'<text x="{LEFT - 4}" y="{py(tick) + 4:.1f}" text-anchor="end">{_format(tick)}</text>')
    slot = plot_w / max(1, len(values))
    for i, (value, label) in enumerate(zip(values, labels)):
        colour = COLOURS[0] if highlight is None or highlight[i] else "#bbb"
        top = py(value) if not log_y or value > 0 else TOP + plot_h
        x = LEFT + i * slot + slot * 0.15
        parts.append(f'<rect x="{x:.1f}" y="{top:.1f}" width="{slot * 0.7:.1f}" height="{TOP + plot_h - top:.1f}" '
                     f'fill="{colour}"><title>{escape(label)}: {value:.4g}</title></rect>'
                     f'<text x="{x + slot * 0.35:.1f}" y="{TOP + plot_h + 14}" text-anchor="middle">{escape(label)}</text>')
    if threshold is not None:
        y = py(threshold[0])
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + plot_w}" y2="{y:.1f}" stroke="#d62728" '
                     f'stroke-dasharray="4 3"/><text x="{LEFT + plot_w - 4}" y="{y - 4:.1f}" text-anchor="end" '
                     f'fill="#d62728">{escape(threshold[1])}</text>')
    parts.append("</svg>")
    return "\n".join(parts)
