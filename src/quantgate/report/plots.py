"""Charts as inline SVG (matplotlib, Agg backend): nothing to fetch when the page opens."""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Sequence

from quantgate.results import Result

GIB = 2**30
COLORS = ["#0969da", "#1a7f37", "#bf8700", "#8250df", "#cf222e", "#1b7c83", "#953800", "#57606a", "#e16f24"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "svg.fonttype": "none", "axes.spines.top": False,
                         "axes.spines.right": False})
    return plt


def _svg(fig) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    _pyplot().close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and doctype for inline use


def memory_bars(results: Sequence[Result], target_reduction: float) -> str | None:
    """Per model: transformer footprint and end-to-end peak per scheme, with the bf16/x line."""
    plt = _pyplot()
    by_model: dict[str, dict[str, tuple[int | None, int | None]]] = defaultdict(dict)
    for r in results:
        if r.scope != "end_to_end" or r.batch != min(x.batch for x in results) or r.variant != "eager":
            continue
        by_model[r.model].setdefault(r.scheme, (r.footprint, r.peak_allocated))
    if not by_model:
        return None
    fig, axes = plt.subplots(1, len(by_model), figsize=(5.5 * len(by_model), 3.6), squeeze=False)
    for ax, (model, schemes) in zip(axes[0], sorted(by_model.items()), strict=True):
        names = list(schemes)
        xs = range(len(names))
        foot = [(schemes[n][0] or 0) / GIB for n in names]
        peak = [(schemes[n][1] or 0) / GIB for n in names]
        ax.bar([x - 0.2 for x in xs], foot, width=0.4, color=COLORS[0], label="transformer footprint")
        ax.bar([x + 0.2 for x in xs], peak, width=0.4, color=COLORS[2], label="peak allocated (prompt to image)")
        if "bf16" in schemes and schemes["bf16"][0]:
            line = schemes["bf16"][0] / GIB / target_reduction
            ax.axhline(line, color=COLORS[4], linestyle="--", linewidth=1)
            ax.text(-0.45, line, f" bf16 / {target_reduction:g} = {line:.2f} GiB", color=COLORS[4],
                    ha="left", va="bottom", fontsize=8, backgroundcolor="white")
        ax.set_xticks(list(xs), names, rotation=30, ha="right")
        ax.set_ylabel("GiB")
        ax.set_title(model)
        ax.legend(fontsize=7, loc="upper right", frameon=False)
    return _svg(fig)


def latency_bars(results: Sequence[Result], scope: str) -> str | None:
    """Per model: median time of each scheme/variant at the smallest batch, IQR as error bars."""
    plt = _pyplot()
    chosen = [r for r in results if r.scope == scope]
    if not chosen:
        return None
    batch = min(r.batch for r in chosen)
    by_model: dict[str, dict[str, Result]] = defaultdict(dict)
    for r in chosen:
        if r.batch == batch:
            by_model[r.model].setdefault(r.label, r)
    fig, axes = plt.subplots(1, len(by_model), figsize=(5.5 * len(by_model), 0.35 * max(map(len, by_model.values())) + 1.2),
                             squeeze=False)
    for ax, (model, entries) in zip(axes[0], sorted(by_model.items()), strict=True):
        ordered = sorted(entries.values(), key=lambda r: r.median)
        ys = range(len(ordered))
        ax.barh(list(ys), [r.median for r in ordered], xerr=[[r.median - r.q1 for r in ordered],
                                                             [r.q3 - r.median for r in ordered]],
                color=[COLORS[1] if r.variant == "compile" else COLORS[0] for r in ordered], capsize=2)
        ax.set_yticks(list(ys), [r.label for r in ordered])
        ax.set_xlabel(f"median seconds per call ({scope}, batch {batch}); error bars: IQR")
        ax.set_title(model)
    return _svg(fig)


def batch_scaling(results: Sequence[Result], scope: str = "transformer") -> str | None:
    """Per model: time per image against batch size for each scheme/variant measured at several."""
    plt = _pyplot()
    series: dict[str, dict[str, list[Result]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        if r.scope == scope:
            series[r.model][r.label].append(r)
    series = {m: {k: sorted(v, key=lambda r: r.batch) for k, v in s.items() if len({r.batch for r in v}) > 1}
              for m, s in series.items()}
    series = {m: s for m, s in series.items() if s}
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 3.4), squeeze=False)
    for ax, (model, lines) in zip(axes[0], sorted(series.items()), strict=True):
        for color, (label, points) in zip(COLORS, sorted(lines.items()), strict=False):
            xs = [p.batch for p in points]
            ys = [p.median / p.batch * 1e3 for p in points]
            err = [[(p.median - p.q1) / p.batch * 1e3 for p in points], [(p.q3 - p.median) / p.batch * 1e3 for p in points]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=color, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({p.batch for pts in lines.values() for p in pts}))
        ax.get_xaxis().set_major_formatter(__import__("matplotlib").ticker.ScalarFormatter())
        ax.set_xlabel("batch size")
        ax.set_ylabel(f"ms per image ({scope}); error bars: IQR")
        ax.set_title(model)
        ax.legend(fontsize=7, frameon=False)
    return _svg(fig)


def trend(points: Sequence[tuple[str, float, float, float]], title: str) -> str:
    """One case over its history: (label, median, q1, q3) per run, oldest first."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 2.6))
    xs = range(len(points))
    ax.errorbar(list(xs), [p[1] for p in points], yerr=[[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]],
                marker="o", capsize=3, color=COLORS[0])
    ax.set_xticks(list(xs), [p[0] for p in points], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("median s (IQR)")
    ax.set_title(title, fontsize=8)
    return _svg(fig)
