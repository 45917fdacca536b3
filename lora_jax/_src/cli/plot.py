"""The loss plot of ``lora-jax train`` as a self-contained SVG file (no plotting library).

Each curve is drawn against the fraction of its phase's steps, on a log-scale
loss axis with decade (or, for a narrow range, 2-5-10) ticks, with a legend.
Any browser or image viewer opens it.
"""

from __future__ import annotations

import math
import pathlib
from xml.sax.saxutils import escape

from lora_jax._src.io import atomic

_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")
_W, _H = 700, 400
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 20, 40, 50


def _log_ticks(lo: float, hi: float) -> list[float]:
  ticks = []
  for exponent in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
    for mantissa in (1, 2, 5):
      value = mantissa * 10.0 ** exponent
      if lo <= value <= hi:
        ticks.append(value)
  return ticks or [lo, hi]


def loss_svg(curves: dict[str, list[float]], title: str) -> str:
  """The SVG text of a log-scale plot of ``curves`` (name -> losses in step order)."""
  values = [v for curve in curves.values() for v in curve if math.isfinite(v) and v > 0]
  lo, hi = (min(values), max(values)) if values else (1.0, 10.0)
  if hi <= lo * 1.01:
    lo, hi = lo / 1.5, hi * 1.5
  span = math.log(hi) - math.log(lo)
  plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
  x_of = lambda f: _LEFT + f * plot_w  # noqa: E731
  y_of = lambda v: _TOP + (math.log(hi) - math.log(v)) / span * plot_h  # noqa: E731
  out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
         f'viewBox="0 0 {_W} {_H}" font-family="sans-serif" font-size="12">',
         f'<rect width="{_W}" height="{_H}" fill="white"/>',
         f'<text x="{_W / 2}" y="22" text-anchor="middle" font-size="14">'
         f"lora-jax train: {escape(title)}</text>",
         f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" fill="none" '
         'stroke="black"/>']
  for tick in _log_ticks(lo, hi):
    y = y_of(tick)
    out.append(f'<line x1="{_LEFT - 4}" x2="{_LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
               'stroke="#ddd"/>')
    out.append(f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:g}</text>')
  for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
    x = x_of(fraction)
    out.append(f'<text x="{x:.1f}" y="{_TOP + plot_h + 16}" text-anchor="middle">'
               f"{fraction:g}</text>")
  out.append(f'<text x="{_LEFT + plot_w / 2}" y="{_H - 10}" text-anchor="middle">'
             "fraction of the phase's steps</text>")
  out.append(f'<text x="16" y="{_TOP + plot_h / 2}" text-anchor="middle" '
             f'transform="rotate(-90 16 {_TOP + plot_h / 2})">training loss (log)</text>')
  for i, (name, curve) in enumerate(curves.items()):
    color = _COLORS[i % len(_COLORS)]
    n = max(len(curve) - 1, 1)
    points = " ".join(f"{x_of(j / n):.1f},{y_of(v):.1f}" for j, v in enumerate(curve)
                      if math.isfinite(v) and v > 0)
    out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{points}"/>')
    y = _TOP + 16 + 16 * i
    out.append(f'<line x1="{_W - 150}" x2="{_W - 130}" y1="{y - 4}" y2="{y - 4}" '
               f'stroke="{color}" stroke-width="2"/>')
    out.append(f'<text x="{_W - 125}" y="{y}">{escape(name)}</text>')
  out.append("</svg>")
  return "\n".join(out) + "\n"


def write_loss_svg(curves: dict[str, list[float]], path: pathlib.Path, title: str) -> None:
  """Writes ``loss_svg(curves, title)`` to ``path``."""
  atomic.write_file(path, loss_svg(curves, title))
