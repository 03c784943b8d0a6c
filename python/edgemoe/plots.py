"""The charts edgemoe-bench writes beside its tables: one function per subcommand, each drawing the
rows that subcommand printed into a PNG (matplotlib, Agg canvas: no display needed).

Every function takes the output path and plain rows (dicts, as listed in its docstring) and
returns the path written; bench.py only collects rows.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

# The Agg canvas directly, not pyplot: no display is needed and no global backend is changed.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

OURS, THEIRS, REFERENCE = "#1f77b4", "#ff7f0e", "#444444"
DPI = 120


def _figure(rows: int, *, width: float = 9.0, per_row: float = 0.42, base: float = 1.6):
    """A figure tall enough for `rows` horizontal bars (or a fixed aspect when rows is 0)."""
    height = base + per_row * rows if rows else 4.8
    fig = Figure(figsize=(width, max(height, 3.0)), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _legend_below(fig, ax, ncol: int) -> float:
    """The axes' legend centred under the whole figure (long bar names push the axes right); returns
    the fraction of the figure's height to keep free for it."""
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    return 0.45 / fig.get_figheight()


def _save(fig, path: str | Path, bottom: float = 0.0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, format="png")
    return path


def _labels_on_bars(ax, bars, fmt: str) -> None:
    for b in bars:
        w = b.get_width()
        ax.annotate(fmt.format(w), (w, b.get_y() + b.get_height() / 2), xytext=(3, 0),
                    textcoords="offset points", va="center", fontsize=8)


def pipeline(path, rows: Sequence[dict], title: str = "") -> Path:
    """edgemoe-bench pipeline. rows: {"config", "ms_per_token", "floor_ms"} in table order, the first
    IO-FREE. Horizontal bars of ms/token per configuration; a tick on each bar at its floor (the
    larger of all-resident compute time and its reads ÷ the storage bandwidth)."""
    fig, ax = _figure(len(rows))
    names = [r["config"] for r in rows][::-1]
    ms = [r["ms_per_token"] for r in rows][::-1]
    floor = [r["floor_ms"] for r in rows][::-1]
    y = range(len(rows))
    bars = ax.barh(y, ms, color=OURS, label="ms/token (median)")
    _labels_on_bars(ax, bars, "{:.2f}")
    ax.scatter(floor, y, marker="|", s=250, linewidths=2.5, color=REFERENCE, zorder=3,
               label="floor: max(IO-FREE compute, reads ÷ bandwidth)")
    if rows:
        ax.axvline(rows[0]["ms_per_token"], color=REFERENCE, linestyle=":", linewidth=1,
                   label="IO-FREE (all experts resident)")
    ax.set_yticks(list(y), names, fontsize=8)
    ax.set_xlabel("decode ms/token (lower is better)")
    ax.set_xlim(0, max(ms + floor + [1e-3]) * 1.18)
    ax.set_title(title or "Expert management: ms/token per configuration", fontsize=10)
    return _save(fig, path, _legend_below(fig, ax, 3))


def predictors(path, rows: Sequence[dict], title: str = "") -> Path:
    """edgemoe-bench predictors. rows: {"predictor", "count", "predicted" (fraction or None),
    "hit_rate"}. Grouped bars: the share of chosen experts the predictor named, and the cache hit rate."""
    fig, ax = _figure(0)
    labels = [r["predictor"] if r["predictor"] == "none" else f"{r['predictor']}\n{r['count']} named"
              for r in rows]
    x = list(range(len(rows)))
    w = 0.38
    predicted = [100 * (r["predicted"] or 0.0) for r in rows]
    hit = [100 * r["hit_rate"] for r in rows]
    b1 = ax.bar([i - w / 2 for i in x], predicted, w, color=OURS, label="experts predicted")
    b2 = ax.bar([i + w / 2 for i in x], hit, w, color=THEIRS, label="expert cache hit")
    for bars in (b1, b2):
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 112)
    ax.set_title(title or "Next-layer prediction hit rate per predictor", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def kernels(path, rows: Sequence[dict], memcpy_gbps: float, title: str = "") -> Path:
    """edgemoe-bench kernels. rows: {"kernel", "shape", "bits", "formulation", "us", "gbps"}.
    Horizontal bars of GB/s of packed weights streamed per kernel, against the memcpy rate."""
    fig, ax = _figure(len(rows))
    names = [f"{r['kernel']} {r['shape']} INT{r['bits']} ({r['formulation']})" for r in rows][::-1]
    gbps = [r["gbps"] for r in rows][::-1]
    us = [r["us"] for r in rows][::-1]
    y = list(range(len(rows)))
    bars = ax.barh(y, gbps, color=[OURS if "dot" in n else THEIRS for n in names])
    for b, t in zip(bars, us):
        ax.annotate(f"{b.get_width():.1f} GB/s, {t:.1f} µs", (b.get_width(), b.get_y() + b.get_height() / 2),
                    xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    ax.axvline(memcpy_gbps, color=REFERENCE, linestyle="--", linewidth=1.2,
               label=f"memcpy {memcpy_gbps:.1f} GB/s (read + write)")
    for colour, form in ((OURS, "int8 dot"), (THEIRS, "float dequant")):
        if any(form in n for n in names):
            ax.plot([], [], "s", color=colour, markersize=8, label=form)  # a legend entry per formulation
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlabel("GB/s of packed weights (higher is better)")
    ax.set_xlim(0, max(gbps + [memcpy_gbps]) * 1.35)
    ax.set_title(title or "Expert GEMV kernels against memcpy", fontsize=10)
    return _save(fig, path, _legend_below(fig, ax, 3))


def bitplans(path, rows: Sequence[dict], texts: Sequence[str], title: str = "") -> Path:
    """edgemoe-bench bitplans. rows: {"plan", "average_bits", "loss_pct": [per text], "searched"}.
    Perplexity loss over the float model against average expert bits, one colour per held-out text:
    uniform plans joined by a line, searched plans as diamonds, each plan named."""
    fig, ax = _figure(0)
    colours = [OURS, THEIRS, "#2ca02c", "#d62728", "#9467bd"]
    for t, text in enumerate(texts):
        colour = colours[t % len(colours)]
        uniform = sorted((r["average_bits"], r["loss_pct"][t]) for r in rows if not r["searched"])
        if uniform:
            ax.plot(*zip(*uniform), marker="o", color=colour, linewidth=1, zorder=3, label=f"{text}: uniform")
        searched = [(r["average_bits"], r["loss_pct"][t]) for r in rows if r["searched"]]
        if searched:
            ax.scatter(*zip(*searched), marker="D", s=40, color=colour, zorder=4, label=f"{text}: searched plans")
    for r in rows:  # named once, at the first text's point
        ax.annotate(r["plan"], (r["average_bits"], r["loss_pct"][0] if r["loss_pct"] else 0.0), xytext=(5, 4),
                    textcoords="offset points", fontsize=7)
    losses = [abs(v) for r in rows for v in r["loss_pct"]]
    if losses and max(losses) > 20:  # INT2 dwarfs the rest: linear to ±1 %, logarithmic beyond
        ax.set_yscale("symlog", linthresh=1.0)
    ax.axhline(0, color=REFERENCE, linewidth=0.8)
    ax.set_xlabel("average expert bits")
    ax.set_ylabel("held-out perplexity loss over float (%)")
    ax.set_title(title or "Perplexity loss against average bits", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def budget(path, rows: Sequence[dict], title: str = "") -> Path:
    """edgemoe-bench budget. rows: {"artifact", "average_bits", "ms_per_token", "hit_rate", "cache_slots"}.
    Horizontal bars of ms/token per artifact at the one budget, annotated with bits, slots and hit rate."""
    fig, ax = _figure(len(rows))
    names = [f"{r['artifact']}\n{r['average_bits']:.2f} bits" for r in rows][::-1]
    ms = [r["ms_per_token"] for r in rows][::-1]
    notes = [f"{r['ms_per_token']:.2f} ms · {r['cache_slots']} slots · {r['hit_rate']:.0%} hit" for r in rows][::-1]
    y = list(range(len(rows)))
    bars = ax.barh(y, ms, color=OURS)
    for b, note in zip(bars, notes):
        ax.annotate(note, (b.get_width(), b.get_y() + b.get_height() / 2), xytext=(3, 0),
                    textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlabel("decode ms/token (lower is better)")
    ax.set_xlim(0, max(ms + [1e-3]) * 1.6)
    ax.set_title(title or "Artifacts at one memory budget", fontsize=10)
    return _save(fig, path)


def llamacpp(path, rows: Sequence[dict], title: str = "", what: str = "decode") -> Path:
    """edgemoe-bench llamacpp. rows: {"label" (e.g. "INT4, 1 thread"), "ours", "theirs"} in tok/s of
    `what` ("decode", "prompt"). Side-by-side bars per artifact and thread count."""
    fig, ax = _figure(0)
    x = list(range(len(rows)))
    w = 0.38
    b1 = ax.bar([i - w / 2 for i in x], [r["ours"] for r in rows], w, color=OURS, label="EdgeMoE")
    b2 = ax.bar([i + w / 2 for i in x], [r["theirs"] for r in rows], w, color=THEIRS, label="llama.cpp")
    for bars in (b1, b2):
        ax.bar_label(bars, fmt="%.0f", fontsize=8, padding=2)
    ax.set_xticks(x, [r["label"] for r in rows], fontsize=8)
    ax.set_ylabel(f"{what} tok/s (higher is better)")
    ax.set_ylim(0, max([r["ours"] for r in rows] + [r["theirs"] for r in rows] + [1]) * 1.15)
    ax.set_title(title or "All experts resident: EdgeMoE against llama.cpp", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def soak(path, rows: Sequence[dict], title: str = "") -> Path:
    """edgemoe-bench soak. rows: {"build", "rss_first", "rss_last"} in bytes (a build that failed:
    both None). Resident memory after the first and the last round, per build."""
    fig, ax = _figure(0)
    x = list(range(len(rows)))
    w = 0.38
    mib = 1 / 2**20
    first = [(r["rss_first"] or 0) * mib for r in rows]
    last = [(r["rss_last"] or 0) * mib for r in rows]
    b1 = ax.bar([i - w / 2 for i in x], first, w, color=OURS, label="RSS after round 1")
    b2 = ax.bar([i + w / 2 for i in x], last, w, color=THEIRS, label="RSS after the last round")
    for bars in (b1, b2):
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    ax.set_xticks(x, [r["build"] + ("\n(failed)" if r["rss_first"] is None else "") for r in rows], fontsize=8)
    ax.set_ylabel("resident memory (MiB)")
    ax.set_ylim(0, max(first + last + [1]) * 1.2)
    ax.set_title(title or "Soak at the minimum budget: resident memory per build", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def sweep(path, rows: Sequence[dict], title: str = "") -> Path:
    """edgemoe-bench sweep. rows: {"config", "fraction" (None: all resident, 0: on demand), "ms_per_token",
    "bound_ms", "reads_per_token", "belady_reads_per_token"}. Left: ms/token against the expert budget per
    policy (dashed: its time bound), the budget-independent rows as horizontal lines; right: reads per
    token against Belady's MIN."""
    fig = Figure(figsize=(12, 4.8), dpi=DPI)
    FigureCanvasAgg(fig)
    time_ax, reads_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    policies = [c for c in dict.fromkeys(r["config"] for r in rows if r["fraction"] not in (None, 0.0))]
    colors = [OURS, THEIRS, "#2ca02c", "#9467bd", "#8c564b"]
    for i, name in enumerate(policies):
        pts = sorted((r for r in rows if r["config"] == name), key=lambda r: r["fraction"])
        x = [100 * r["fraction"] for r in pts]
        c = colors[i % len(colors)]
        time_ax.plot(x, [r["ms_per_token"] for r in pts], "o-", color=c, label=name)
        time_ax.plot(x, [r["bound_ms"] for r in pts], ":", color=c)
        reads_ax.plot(x, [r["reads_per_token"] for r in pts], "o-", color=c, label=name)
    belady = sorted((r for r in rows if r["config"] == policies[0]), key=lambda r: r["fraction"]) if policies else []
    reads_ax.plot([100 * r["fraction"] for r in belady], [r["belady_reads_per_token"] for r in belady], "s--",
                  color=REFERENCE, label="Belady's MIN")
    for r in rows:
        if r["fraction"] in (None, 0.0):
            time_ax.axhline(r["ms_per_token"], color=REFERENCE, lw=0.8, ls="--")
            time_ax.annotate(r["config"], (0, r["ms_per_token"]), xycoords=("axes fraction", "data"),
                             xytext=(3, 2), textcoords="offset points", fontsize=8, color=REFERENCE)
    time_ax.set_yscale("log")
    time_ax.set_xlabel("expert cache (% of experts)")
    time_ax.set_ylabel("ms/token (dotted: time bound)")
    reads_ax.set_xlabel("expert cache (% of experts)")
    reads_ax.set_ylabel("expert reads per token")
    time_ax.legend(fontsize=8)
    reads_ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def prefill(path, rows: Sequence[dict], title: str = "") -> Path:
    """edgemoe-bench prefill. rows: {"prompt_tokens", "fraction", "batch", "kernels" (optional), "ms",
    "records_read"}. Left: time to read each prompt against the expert budget, one line per prompt
    length, batch size and kernel form; right: the expert records read."""
    fig = Figure(figsize=(12, 4.8), dpi=DPI)
    FigureCanvasAgg(fig)
    time_ax, reads_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colors = [REFERENCE, OURS, THEIRS, "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]
    styles = ["o-", "s--", "^:", "d-."]
    lengths = list(dict.fromkeys(r["prompt_tokens"] for r in rows))
    series = list(dict.fromkeys((r["batch"], r.get("kernels", "")) for r in rows))
    for i, n in enumerate(lengths):
        for j, (b, kernels) in enumerate(series):
            pts = sorted((r for r in rows if r["prompt_tokens"] == n and (r["batch"], r.get("kernels", "")) == (b, kernels)),
                         key=lambda r: r["fraction"])
            x = [100 * r["fraction"] for r in pts]
            label = f"{n} tokens, " + ("token by token" if b == 1 else f"{b} at a time") + \
                (f", {kernels} kernels" if kernels and b > 1 else "")
            style, color = styles[i % len(styles)], colors[j % len(colors)]
            time_ax.plot(x, [r["ms"] for r in pts], style, color=color, label=label)
            reads_ax.plot(x, [r["records_read"] for r in pts], style, color=color, label=label)
    time_ax.set_yscale("log")
    reads_ax.set_yscale("log")
    time_ax.set_xlabel("expert cache (% of experts)")
    time_ax.set_ylabel("ms to read the prompt")
    reads_ax.set_xlabel("expert cache (% of experts)")
    reads_ax.set_ylabel("expert records read")
    time_ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
