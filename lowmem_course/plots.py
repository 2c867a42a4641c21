"""Charts of memory: stacked breakdowns, before/after comparisons, predicted against measured.

Every function takes plain numbers in bytes (a measurement's or an estimate's ``breakdown`` dict),
picks a readable binary unit for the axis, and returns the matplotlib ``Axes`` it drew on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from lowmem_course.units import GiB, KiB, MiB

COLORS = {
    "weights": "#4c72b0", "parameters": "#4c72b0", "buffers": "#8c8c8c", "gradients": "#dd8452",
    "optimizer": "#55a868", "activations": "#c44e52", "temporaries": "#8172b3", "kv_cache": "#937860",
    "logits": "#da8bc3", "other": "#ccb974",
}


def _unit(max_bytes: float) -> tuple[str, int]:
    for name, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if max_bytes >= size:
            return name, size
    return "bytes", 1


def breakdown_bars(breakdowns: Mapping[str, Mapping[str, int]], title: str = "",
                   ax: Axes | None = None) -> Axes:
    """One stacked bar per label, one colour per component (parameters, gradients, ...).

    ``breakdowns`` maps a bar's label (e.g. "fp32", "bf16 autocast") to its breakdown in bytes;
    a single entry draws one measurement, several draw a before/after comparison.
    """
    ax = ax or plt.subplots(figsize=(1.6 + 1.4 * len(breakdowns), 4))[1]
    components = [c for c in dict.fromkeys(k for b in breakdowns.values() for k in b)
                  if c != "total" and any(b.get(c, 0) for b in breakdowns.values())]
    unit, size = _unit(max(sum(v for k, v in b.items() if k != "total") for b in breakdowns.values()))
    bottoms = [0.0] * len(breakdowns)
    for component in components:
        heights = [b.get(component, 0) / size for b in breakdowns.values()]
        ax.bar(list(breakdowns), heights, bottom=bottoms, label=component, color=COLORS.get(component))
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_ylabel(f"memory ({unit})")
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return ax


def predicted_vs_measured(predicted: Sequence[int], measured: Sequence[int], labels: Sequence[str] = (),
                          tolerance: float = 0.05, title: str = "", ax: Axes | None = None) -> Axes:
    """Scatter of predicted against measured bytes, with the line y = x and a +-``tolerance`` band."""
    ax = ax or plt.subplots(figsize=(5, 5))[1]
    unit, size = _unit(max([*predicted, *measured]))
    xs = [m / size for m in measured]
    ys = [p / size for p in predicted]
    top = max(xs + ys) * 1.1
    ax.plot([0, top], [0, top], color="black", linewidth=1, label="predicted = measured")
    ax.fill_between([0, top], [0, top * (1 - tolerance)], [0, top * (1 + tolerance)], color="grey",
                    alpha=0.2, label=f"±{tolerance:.0%}")
    ax.scatter(xs, ys, zorder=3)
    for x, y, label in zip(xs, ys, labels):
        ax.annotate(label, (x, y), fontsize="x-small", xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"measured peak ({unit})")
    ax.set_ylabel(f"predicted peak ({unit})")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return ax


def lines(xs: Sequence[float], series: Mapping[str, Sequence[float]], xlabel: str, ylabel: str,
          title: str = "", ax: Axes | None = None) -> Axes:
    """Several named curves over the same x values (memory or time against sequence length, ...)."""
    ax = ax or plt.subplots(figsize=(6, 4))[1]
    for name, ys in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    return ax
