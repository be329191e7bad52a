"""Paper figures from the results tables (matplotlib ``Figure`` objects, no pyplot state).

* :func:`stream_figure` — error per segment along the stream, one line per method (mean over
  seeds, min–max band), round boundaries dashed, gradual severity as a grey step;
* :func:`mean_bars_figure` — mean error per method, std error bars, one dot per seed, published
  means as white diamonds;
* :func:`heatmap_figure` — method × domain values, best per column in bold;
* :func:`batch_curve_figure` — per-batch error within a run (batches.csv), smoothed per segment;
* :func:`source_eval_figure` — error on the clean source test set after each segment (forgetting).

Colours are Okabe–Ito (colour-blind safe); every method also has its own marker and line style,
so figures stay readable in greyscale. ``source`` is always grey and dashed.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from ..errors import CTTAError
from .store import RunInfo, is_finite
from .tables import METRIC_NAMES, ResultsTable, Row, short_domain

#: Okabe & Ito (2008) colour-blind-safe palette, yellow last (weak on white).
OKABE_ITO = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]
SOURCE_COLOR = "#7F7F7F"
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
LINESTYLES = ["-", "-", "-", "-.", "-", ":", "-", "-."]
FIG_FORMATS = ("png", "pdf", "svg")

RC = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "axes.grid.axis": "y", "grid.alpha": 0.3, "grid.linewidth": 0.6,
    "legend.frameon": False, "pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "path",
    "figure.dpi": 100, "savefig.dpi": 200, "axes.axisbelow": True,
}


def _rc():
    import matplotlib

    return matplotlib.rc_context(RC)


def label_styles(labels: Sequence[str], methods: Sequence[str], source_method: str = "source") -> dict[str, dict]:
    """label → {color, marker, linestyle}; source grey dashed, others Okabe–Ito in order."""
    out, i = {}, 0
    for label, method in zip(labels, methods):
        if label in out:
            continue
        if method == source_method:
            out[label] = {"color": SOURCE_COLOR, "marker": "o", "linestyle": "--"}
            continue
        out[label] = {"color": OKABE_ITO[i % len(OKABE_ITO)], "marker": MARKERS[i % len(MARKERS)],
                      "linestyle": LINESTYLES[i % len(LINESTYLES)]}
        i += 1
    return out


def parse_formats(spec: str) -> list[str]:
    fmts = [f.strip().lower().lstrip(".") for f in spec.split(",") if f.strip()]
    bad = [f for f in fmts if f not in FIG_FORMATS]
    if bad or not fmts:
        raise CTTAError(f"--fig-format takes a comma list of {', '.join(FIG_FORMATS)}; got '{spec}'")
    return list(dict.fromkeys(fmts))


def save_figure(fig, stem: Path, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Write ``stem.<fmt>`` for each format, each atomically (:func:`ctta_bench.results.atomic_write`)."""
    from ..results import atomic_write

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    with _rc():
        for fmt in formats:
            target = stem.with_name(f"{stem.name}.{fmt}")
            atomic_write(target, lambda fh, fmt=fmt: fig.savefig(
                fh, format=fmt, bbox_inches="tight", dpi=RC["savefig.dpi"], facecolor="white"), "wb")
            written.append(target)
    return written


def _metric_label(metric: str) -> str:
    return f"{METRIC_NAMES.get(metric, metric)} (%)"


def _tick_step(n: int, most: int = 40) -> int:
    return max(1, math.ceil(n / most))


def _run_label_order(runs: Sequence[RunInfo], present: set[str]) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for r in runs:
        if r.label in present and r.label not in seen:
            seen[r.label] = r.method
    return list(seen.items())


# --------------------------------------------------------------------------- along the stream


def stream_figure(segs, runs: Sequence[RunInfo], metric: str = "error", source_method: str = "source"):
    """Error of each segment along the stream per method; ``None`` when only mixed runs exist."""
    from matplotlib.figure import Figure

    data = segs[segs["setting"] != "mixed"]
    if data.empty:
        return None
    order = _run_label_order(runs, set(data["label"]))
    styles = label_styles([l for l, _ in order], [m for _, m in order], source_method)
    first_id = next(r.run_id for r in runs if r.run_id in set(data["run_id"]))
    layout = data[data["run_id"] == first_id].sort_values("index").drop_duplicates("index")
    n = len(layout)
    gradual = (layout["setting"] == "gradual").any()
    multi_sev = layout["severity"].nunique() > 1
    with _rc():
        fig = Figure(figsize=(max(6.0, min(14.0, 0.32 * n + 2.5)), 3.8))
        ax = fig.add_subplot(111)
        if gradual:
            ax2 = ax.twinx()
            ax2.fill_between(layout["index"], 0, layout["severity"], step="mid", color="#BBBBBB", alpha=0.25, lw=0)
            ax2.set_ylim(0, 5 * 4)  # keep the severity band in the lower quarter
            ax2.set_yticks([1, 3, 5])
            ax2.set_ylabel("severity", color="#888888", loc="bottom")
            ax2.tick_params(axis="y", colors="#888888", labelsize=7)
            ax2.grid(False)
            ax2.spines["right"].set_visible(True)
            ax2.spines["right"].set_color("#BBBBBB")
            ax.set_zorder(ax2.get_zorder() + 1)
            ax.patch.set_visible(False)
        for label, _ in order:
            d = data[data["label"] == label]
            g = d.groupby("index")["value"]
            mean, lo, hi = g.mean(), g.min(), g.max()
            st = styles[label]
            nseeds = d["run_id"].nunique()
            ax.plot(mean.index, mean.values, color=st["color"], linestyle=st["linestyle"], lw=1.6,
                    marker=st["marker"] if len(mean) <= 45 else None, ms=4,
                    label=f"{label} (n={nseeds})" if nseeds > 1 else label)
            if nseeds > 1:
                ax.fill_between(mean.index, lo.values, hi.values, color=st["color"], alpha=0.15, lw=0)
        rounds_marked = _mark_rounds(ax, layout)
        # ticks: every segment when few, else domain starts (thinned)
        if gradual or n > 40:
            # one tick per contiguous domain block, at its centre; thin lines between blocks
            block = (layout["domain"] != layout["domain"].shift()).cumsum()
            starts = layout.groupby(block, sort=False).agg(index=("index", "mean"), first=("index", "min"),
                                                           domain=("domain", "first"), severity=("severity", "first"))
            for x in starts["first"].iloc[1:]:
                ax.axvline(x - 0.5, color="#DDDDDD", lw=0.6, zorder=0)
        else:
            starts = layout
        step = _tick_step(len(starts))
        starts = starts.iloc[::step]
        ax.set_xticks(starts["index"].tolist())
        ax.set_xticklabels([short_domain(d) + (f"·{s}" if multi_sev and not gradual else "")
                            for d, s in zip(starts["domain"], starts["severity"])],
                           rotation=45, ha="right", rotation_mode="anchor")
        ax.set_xlim(layout["index"].min() - 0.6, layout["index"].max() + 0.6)
        ax.set_ylabel(_metric_label(metric))
        ax.set_xlabel("domain along the stream" + (" (grey: severity of each segment)" if gradual else ""))
        suite = data["suite"].iloc[0]
        ax.set_title(f"{suite}: {METRIC_NAMES.get(metric, metric).lower()} per segment along the stream", loc="left",
                     pad=16 if rounds_marked else 6)
        ax.set_ylim(bottom=0)
        ax.legend(loc="upper left", bbox_to_anchor=(1.06 if gradual else 1.01, 1.0))
    return fig


def _mark_rounds(ax, layout) -> bool:
    rounds = layout.drop_duplicates("round")
    if len(rounds) < 2:
        return False
    for _, r in rounds.iterrows():
        x = r["index"] - 0.5
        if r["round"] > 1:
            ax.axvline(x, color="#444444", lw=1.0, ls="--", zorder=0)
        ax.annotate(f"round {int(r['round'])}", xy=(x + 0.3, 1.0), xycoords=("data", "axes fraction"),
                    va="bottom", ha="left", fontsize=8, color="#444444")
    return True


# ------------------------------------------------------------------------------------ bars


def _summary_rows(table: ResultsTable) -> list[Row]:
    """Measured rows of the overall block(s): "All rounds" when rounds are split."""
    rows = [r for r in table.rows if r.kind == "run"]
    if any(r.round == 0 for r in rows):
        rows = [r for r in rows if r.round == 0]
    return rows


def mean_bars_figure(table: ResultsTable):
    """Mean metric per method: bar = mean over seeds, error bar = std, dots = seeds, ◇ = published."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    rows = [r for r in _summary_rows(table) if r.mean.ok]
    if not rows:
        return None
    labels = list(dict.fromkeys(r.label for r in rows))
    methods = [next(r.method for r in rows if r.label == l) for l in labels]
    blocks = list(dict.fromkeys(r.severity for r in rows))
    styles = label_styles(labels, methods, table.source_method)
    published = [r for r in table.rows if r.kind == "published"]
    nb = len(blocks)
    width = 0.8 / nb
    rng = np.random.default_rng(0)
    with _rc():
        fig = Figure(figsize=(max(4.0, 0.9 * len(labels) * max(1, nb * 0.7) + 1.5), 3.6))
        ax = fig.add_subplot(111)
        top = 0.0
        for bi, sev in enumerate(blocks):
            for li, label in enumerate(labels):
                row = next((r for r in rows if r.label == label and r.severity == sev), None)
                if row is None:
                    continue
                c = row.mean
                x = li + (bi - (nb - 1) / 2) * width
                color = styles[label]["color"] if nb == 1 else OKABE_ITO[bi % len(OKABE_ITO)]
                ax.bar(x, c.mean, width * 0.9, color=color, alpha=0.85, edgecolor="black", lw=0.5,
                       hatch="//" if row.method == table.source_method and nb == 1 else None,
                       yerr=c.std if is_finite(c.std) else None, capsize=3, error_kw={"lw": 1})
                if c.n > 1:
                    jitter = rng.uniform(-width * 0.2, width * 0.2, size=len(c.values))
                    ax.scatter(x + jitter, c.values, s=10, color="black", zorder=3, lw=0)
                hi = c.mean + (c.std if is_finite(c.std) else 0.0)
                ax.annotate(f"{c.mean:.{table.precision}f}", (x, hi), xytext=(0, 2), textcoords="offset points",
                            ha="center", va="bottom", fontsize=7)
                top = max(top, hi)
                pub = _matching_published(published, row)
                if pub is not None and nb == 1:
                    ax.scatter([x], [pub.mean.mean], marker="D", s=36, facecolor="white", edgecolor="black",
                               lw=1.2, zorder=4)
                    top = max(top, pub.mean.mean)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=20 if max(map(len, labels)) > 8 else 0,
                           ha="right" if max(map(len, labels)) > 8 else "center")
        ax.set_ylabel(f"mean {_metric_label(table.metric).lower()}")
        ax.set_ylim(0, top * 1.15 if top > 0 else 1)
        ax.set_title(f"{table.suite}: mean {METRIC_NAMES[table.metric].lower()} per method", loc="left")
        handles = []
        if any(r.mean.n > 1 for r in rows):
            handles.append(Line2D([], [], marker="o", color="black", ls="", ms=3, label="seed"))
            handles.append(Line2D([], [], marker="_", color="black", ls="", ms=8, label="± std over seeds"))
        if published and nb == 1 and any(_matching_published(published, r) for r in rows):
            handles.append(Line2D([], [], marker="D", markerfacecolor="white", markeredgecolor="black", ls="",
                                  ms=6, label="published"))
        if nb > 1:
            from matplotlib.patches import Patch

            handles += [Patch(color=OKABE_ITO[i % len(OKABE_ITO)], label=f"severity {s}") for i, s in enumerate(blocks)]
        if handles:
            ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _matching_published(published: list[Row], row: Row) -> Optional[Row]:
    cands = [p for p in published if p.method == row.method and p.mean.ok]
    same = [p for p in cands if p.setting == row.setting]
    return (same or cands or [None])[0]


# --------------------------------------------------------------------------------- heatmap


def heatmap_figure(table: ResultsTable):
    """Method × domain heatmap of the measured rows (mean over seeds), mean column at the right."""
    import numpy as np
    from matplotlib.figure import Figure

    rows = _summary_rows(table)
    cols = [c for c in table.columns if not c.summary] + [c for c in table.columns if c.key == (0, "mean")]
    if not rows or not cols:
        return None
    multi = len({r.severity for r in rows}) > 1
    ylabels = [r.label + (f" · sev {r.severity}" if multi else "") for r in rows]
    mat = np.array([[r.cells[c.key].mean if c.key in r.cells and r.cells[c.key].ok else np.nan for c in cols]
                    for r in rows], dtype=float)
    xlabels = [(f"R{c.round} " if c.round else "") + c.label for c in cols]
    finite = mat[np.isfinite(mat)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmax - vmin < 1e-9:
        vmax = vmin + 1.0
    cmap_name = "viridis" if table.higher_is_better else "viridis_r"
    with _rc():
        import matplotlib

        cmap = matplotlib.colormaps[cmap_name].with_extremes(bad="#EEEEEE")
        fig = Figure(figsize=(max(4.5, 0.55 * len(cols) + 2.8), max(2.2, 0.42 * len(rows) + 1.4)))
        ax = fig.add_subplot(111)
        im = ax.imshow(np.ma.masked_invalid(mat), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        ax.grid(False)
        for s in ax.spines.values():
            s.set_visible(False)
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels(xlabels, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(ylabels)
        ax.tick_params(length=0)
        fs = 7 if len(cols) <= 20 else 5.5
        for i, r in enumerate(rows):
            for j, c in enumerate(cols):
                v = mat[i, j]
                if not np.isfinite(v):
                    continue
                rgba = cmap((v - vmin) / (vmax - vmin))
                lum = 0.2126 * rgba[0] + 0.7152 * rgba[1] + 0.0722 * rgba[2]
                ax.text(j, i, f"{v:.{table.precision}f}", ha="center", va="center", fontsize=fs,
                        color="black" if lum > 0.5 else "white",
                        fontweight="bold" if c.key in r.best else "normal")
        if (0, "mean") in [c.key for c in cols]:
            ax.axvline(len(cols) - 1.5, color="white", lw=3)
        cb = fig.colorbar(im, ax=ax, fraction=0.035, pad=0.02)
        cb.set_label(_metric_label(table.metric))
        cb.outline.set_visible(False)
        ax.set_title(f"{table.suite}: {METRIC_NAMES[table.metric].lower()} per domain "
                     f"({'higher' if table.higher_is_better else 'lower'} is better; bold = best)", loc="left")
    return fig


# ----------------------------------------------------------------------------- batch curves


def batch_curve_figure(batches, runs: Sequence[RunInfo], smooth: Optional[int] = None, source_method: str = "source"):
    """Per-batch error along one run of each method (its lowest seed); ``None`` without batches.csv.

    Thin lines: raw per-batch error; thick: rolling mean of ``smooth`` batches within each segment.
    """
    from matplotlib.figure import Figure

    if batches is None or batches.empty:
        return None
    order = _run_label_order(runs, set(batches["label"]))
    styles = label_styles([l for l, _ in order], [m for _, m in order], source_method)
    picks = {}
    for label, _ in order:
        d = batches[batches["label"] == label]
        seed = d["seed"].min()
        run_id = d[d["seed"] == seed]["run_id"].iloc[0]
        picks[label] = (seed, d[d["run_id"] == run_id].sort_values(["index", "batch"]).reset_index(drop=True))
    ref = max(picks.values(), key=lambda p: len(p[1]))[1]
    total = len(ref)
    per_segment = int(ref.groupby("index").size().median())
    w = smooth if smooth else max(1, min(25, per_segment // 10))
    with _rc():
        fig = Figure(figsize=(max(6.0, min(14.0, total / 25 + 3)), 3.8))
        ax = fig.add_subplot(111)
        for label, (seed, d) in picks.items():
            st = styles[label]
            x = range(len(d))
            if w > 1:
                ax.plot(x, d["value"], color=st["color"], lw=0.6, alpha=0.35)
            sm = d.groupby("index", sort=False)["value"].transform(lambda s: s.rolling(w, min_periods=1, center=True).mean())
            seeds = batches[batches["label"] == label]["seed"].nunique()
            ax.plot(x, sm, color=st["color"], linestyle=st["linestyle"], lw=1.8,
                    label=f"{label}" + (f" (seed {seed})" if seeds > 1 else ""))
        # segment and round boundaries from the longest run
        seg_start = ref.index[ref["index"] != ref["index"].shift()].tolist()
        rnd_start = ref.index[ref["round"] != ref["round"].shift()].tolist()
        for s in seg_start[1:]:
            is_round = s in rnd_start
            ax.axvline(s - 0.5, color="#444444" if is_round else "#CCCCCC", lw=1.0 if is_round else 0.6,
                       ls="--" if is_round else "-", zorder=0)
        centres = [(a + b - 1) / 2 for a, b in zip(seg_start, seg_start[1:] + [total])]
        names = [short_domain(ref.loc[s, "domain"]) for s in seg_start]
        step = _tick_step(len(seg_start), 30)
        top = ax.secondary_xaxis("top")
        top.set_xticks(centres[::step])
        top.set_xticklabels(names[::step], rotation=45, ha="left", rotation_mode="anchor", fontsize=7)
        top.tick_params(length=0)
        ax.set_xlim(-0.5, total - 0.5)
        ax.set_ylim(bottom=0)
        what = f"thick: rolling mean of {w} batches within each segment" if w > 1 else "one point per batch"
        if len(rnd_start) > 1:
            what += "; dashed: round boundaries"
        ax.set_xlabel(f"batch along the stream ({what})")
        ax.set_ylabel(_metric_label("error"))
        ax.set_title(f"{batches['suite'].iloc[0]}: per-batch error within one run", loc="left", pad=28)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def source_eval_figure(source_eval, runs: Sequence[RunInfo], source_method: str = "source"):
    """Error on the clean source test set after each segment (forgetting); ``None`` without data."""
    from matplotlib.figure import Figure

    if source_eval is None or source_eval.empty:
        return None
    order = _run_label_order(runs, set(source_eval["label"]))
    styles = label_styles([l for l, _ in order], [m for _, m in order], source_method)
    with _rc():
        fig = Figure(figsize=(6.5, 3.4))
        ax = fig.add_subplot(111)
        for label, _ in order:
            d = source_eval[source_eval["label"] == label]
            g = d.groupby("after_index")["value"]
            m = g.mean()
            st = styles[label]
            ax.plot(m.index, m.values, color=st["color"], linestyle=st["linestyle"], marker=st["marker"], ms=4,
                    lw=1.5, label=label)
            if d["run_id"].nunique() > 1:
                ax.fill_between(m.index, g.min().values, g.max().values, color=st["color"], alpha=0.15, lw=0)
        first = source_eval[source_eval["label"] == order[0][0]].drop_duplicates("after_index").sort_values("after_index")
        step = _tick_step(len(first))
        ax.set_xticks(first["after_index"].tolist()[::step])
        ax.set_xticklabels([short_domain(d) for d in first["domain"]][::step], rotation=45, ha="right",
                           rotation_mode="anchor")
        ax.set_xlabel("after adapting to")
        ax.set_ylabel("clean source error (%)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{source_eval['suite'].iloc[0]}: forgetting (error on the clean source test set)", loc="left")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


# ------------------------------------------------------------------------------ all at once


def write_figures(out: Path, runs: Sequence[RunInfo], segs, table: ResultsTable, batches=None, source_eval=None,
                  formats: Sequence[str] = ("png", "pdf"), smooth: Optional[int] = None,
                  notes: Optional[list[str]] = None) -> list[Path]:
    """Every figure that the data supports, into ``out``; returns the files written."""
    notes = notes if notes is not None else []
    written: list[Path] = []
    makers = [
        ("error_along_stream", lambda: stream_figure(segs, runs, table.metric, table.source_method),
         "only mixed-stream runs: no along-the-stream figure"),
        ("mean_error", lambda: mean_bars_figure(table), "no complete mean: no bar chart"),
        ("heatmap", lambda: heatmap_figure(table), "no rows: no heatmap"),
        ("batch_error", lambda: batch_curve_figure(batches, runs, smooth, table.source_method),
         "no batches.csv in the runs: no per-batch figure"),
        ("source_error", lambda: source_eval_figure(source_eval, runs, table.source_method), None),
    ]
    for name, make, why_not in makers:
        fig = make()
        if fig is None:
            if why_not:
                notes.append(why_not)
            continue
        written += save_figure(fig, Path(out) / name, formats)
    return written
