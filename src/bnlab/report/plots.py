"""Figures written as PNG files.

Figures are built with matplotlib's object API (``matplotlib.figure.Figure``), never pyplot: no
screen is needed and importing bnlab does not switch the backend of a notebook that uses
matplotlib itself.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from matplotlib.figure import Figure

# metric names in the user's words, for axes and titles
from bnlab.experiments.analysis import METRIC_NAMES, metric_name  # noqa: F401 (re-exported)


def run_title(settings: dict) -> str:
    """``model, bn=..., norm=...`` of a run's settings, for figure titles."""
    parts = [settings.get("model", "?"), f"bn={settings.get('bn', '?')}"]
    if settings.get("bn", "none") != "none" and settings.get("norm", "batch") != "batch":
        parts.append(f"norm={settings['norm']}")
    return ", ".join(parts)


def _figure(rows: int = 1, cols: int = 1, figsize=(6.4, 4.2)):
    """A figure and its axes (a 2-D array), without pyplot."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _outside_legend(ax, **kw) -> None:
    """A legend to the right of the axes, where it cannot cover the data."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=kw.pop("fontsize", 8), loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, **kw)


def sample_grid(dataset, path: str | Path, n: int = 36, seed: int = 0, cols: int | None = None) -> Path:
    """Save a grid of ``n`` random images of ``dataset`` with their class names as titles."""
    if not dataset.is_image:
        from bnlab.errors import ConfigError

        raise ConfigError(f"{dataset.name} holds feature vectors, not images: there is no image grid to show")
    n = min(n, len(dataset))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:n]
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = _figure(rows, cols, figsize=(cols * 1.3, rows * 1.45))
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, idx.tolist()):
        img = dataset.x[i]
        if img.shape[0] == 1:
            ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_title(dataset.classes[int(dataset.y[i])], fontsize=7)
    fig.suptitle(f"{dataset.name} ({dataset.split}, {n} of {len(dataset)})", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    """Save a figure atomically (temporary file, then rename) in the format its suffix names."""
    from bnlab._files import atomic_path

    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        from bnlab.errors import ConfigError

        raise ConfigError(f"cannot write a figure as {path}: use one of .{', .'.join(sorted(supported))}")
    with atomic_path(path, suffix="." + fmt) as tmp:
        fig.savefig(tmp, dpi=110, format=fmt)
    return path


def confusion_matrix(cm, classes, path: str | Path, title: str = "") -> Path:
    """Save a confusion matrix (rows: true class, columns: predicted) with counts in the cells."""
    import numpy as np

    cm = np.asarray(cm)
    n = len(classes)
    fig, axes = _figure(figsize=(1.0 + 0.6 * n, 0.8 + 0.55 * n))
    ax = axes[0, 0]
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = cm.max() if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > top / 2 else "black")
    ax.set_title(title or "confusion matrix", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def learning_curves(series: dict, path: str | Path, metric: str = "test_acc", title: str = "",
                    ylabel: str | None = None) -> Path:
    """Mean curve with a band (min..max over seeds, or ±1 std with 3+ seeds) per group.

    ``series`` maps a group label to a list of per-seed curves, each a list of (epoch, value).
    """
    import numpy as np

    fig, axes = _figure(figsize=(7.6, 4.2))
    ax = axes[0, 0]
    for label, curves in series.items():
        curves = [c for c in curves if c]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        epochs = np.array([e for e, _ in curves[0][:n]])
        vals = np.array([[v for _, v in c[:n]] for c in curves], dtype=float)
        mean = np.nanmean(vals, axis=0)
        line, = ax.plot(epochs, mean, marker="o", ms=3, label=f"{label} (n={len(curves)})")
        if len(curves) >= 3:
            sd = np.nanstd(vals, axis=0, ddof=1)
            ax.fill_between(epochs, mean - sd, mean + sd, color=line.get_color(), alpha=0.2)
        elif len(curves) == 2:
            ax.fill_between(epochs, np.nanmin(vals, 0), np.nanmax(vals, 0), color=line.get_color(), alpha=0.2)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel or metric_name(metric))
    ax.grid(alpha=0.3)
    _outside_legend(ax)
    ax.set_title(title or metric_name(metric), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _layer_order(name: str) -> tuple:
    head = name.split(":", 1)[0]
    return tuple(int(p) if p.isdigit() else 0 for p in head.split("."))


def last_nonlinearity(records: list[dict]) -> str | None:
    """The tracked layer that comes last in the network (the paper's 'last hidden layer')."""
    layers = sorted({r["layer"] for r in records if "q" in r}, key=_layer_order)
    return layers[-1] if layers else None


def _percentile_keys(records) -> list[str]:
    keys = [k for k in records[0] if k.startswith("p") and k[1:].replace(".", "").isdigit()]
    return sorted(keys, key=lambda k: float(k[1:]))


def _draw_percentiles(ax, records, layer, title):
    rs = sorted((r for r in records if r["layer"] == layer), key=lambda r: r["step"])
    if not rs:
        ax.set_title(f"{title}: no data")
        return
    steps = [r["step"] for r in rs]
    for k in _percentile_keys(rs):
        ax.plot(steps, [r[k] for r in rs], label=f"{k[1:]}th percentile")
    ax.set_xlabel("training step")
    ax.set_ylabel("input value")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    _outside_legend(ax, fontsize=7)


def activation_percentiles(records: list[dict], path: str | Path, layer: str | None = None, title: str = "") -> Path:
    """The tracked percentiles of one layer's input over training (every layer if ``layer`` is None)."""
    from bnlab.errors import ConfigError

    layers = sorted({r["layer"] for r in records if "q" in r}, key=_layer_order)
    if not layers:
        raise ConfigError("this run has no activation records: train it with --track-activations")
    if layer is not None:
        match = [name for name in layers if name == layer or name.split(":", 1)[0] == layer]
        if not match:
            raise ConfigError(f"no tracked layer {layer!r}; tracked: {', '.join(layers)}")
        layers = match
    fig, axes = _figure(len(layers), 1, figsize=(7.6, 2.6 * len(layers)))
    for ax, name in zip(axes[:, 0], layers):
        _draw_percentiles(ax, records, name, f"input of {name}")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def ioffe_fig1(acc_series: dict, without_bn: list[dict], with_bn: list[dict], path: str | Path, title: str = "") -> Path:
    """The BN paper's Fig. 1 trio: (a) test accuracy over steps with and without BN, (b, c) the
    percentiles of the last hidden layer's sigmoid input over steps without and with BN.

    ``acc_series`` maps a label to [(step, test_acc)], averaged over seeds by the caller.
    """
    fig, axes = _figure(1, 3, figsize=(16, 3.8))
    axes = axes[0]
    for label, pts in acc_series.items():
        axes[0].plot([s for s, _ in pts], [a for _, a in pts], label=label)
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel("test accuracy")
    axes[0].set_title("(a) test accuracy", fontsize=9)
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    for ax, recs, name in ((axes[1], without_bn, "(b) without BN"), (axes[2], with_bn, "(c) with BN")):
        layer = last_nonlinearity(recs)
        _draw_percentiles(ax, recs, layer, f"{name}: input of {layer}")
    lo = min(min(ax.get_ylim()[0] for ax in axes[1:]), 0)
    hi = max(ax.get_ylim()[1] for ax in axes[1:])
    for ax in axes[1:]:
        ax.set_ylim(lo, hi)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def metric_vs_axis(series: dict, axis: str, metric: str, path: str | Path, *, by: str = "bn", title: str = "",
                   threshold: float | None = None) -> Path:
    """A metric against a numeric setting (learning rate, batch size): one line per level of
    ``by`` with its 95% CI as error bars, a log axis when the values span more than a decade,
    and the settings where runs diverged marked with an ``x`` on the axis (and counted).

    ``series`` maps a level to points ``{axis, "mean", "ci95", "diverged", "runs"}`` as
    :func:`bnlab.experiments.reproduce.axis_comparison` gives them.
    """
    fig, axes = _figure(figsize=(7.4, 4.2))
    ax = axes[0][0]
    marked = False
    for i, (level, pts) in enumerate(series.items()):
        color = f"C{i}"
        ok = [p for p in pts if p["mean"] is not None]
        name = level if by == "case" else f"{by}={level}"
        ax.errorbar([p[axis] for p in ok], [p["mean"] for p in ok], yerr=[p["ci95"] or 0 for p in ok], marker="o",
                    ms=4, capsize=3, color=color, label=name)
        div = [p for p in pts if p["diverged"]]
        if div:
            ax.scatter([p[axis] for p in div], [0.03 + 0.05 * i] * len(div), marker="x", s=60, color=color, clip_on=False,
                       transform=ax.get_xaxis_transform(), zorder=5,
                       label=f"{name}: diverged (" + ", ".join(f"{p['diverged']}/{p['runs']}" for p in div) + ")")
            marked = True
    xs = sorted({p[axis] for pts in series.values() for p in pts if p[axis] is not None})
    if xs and xs[0] > 0 and xs[-1] / xs[0] > 10:
        ax.set_xscale("log")
        ax.set_xlim(xs[0] / 1.6, xs[-1] * 1.6)  # every setting on the axis, diverged ones too
    elif xs:
        pad = (xs[-1] - xs[0]) * 0.05 or 1.0
        ax.set_xlim(xs[0] - pad, xs[-1] + pad)
    if metric.endswith(("acc", "error")):
        ax.set_ylim(0.0, 1.0)  # CIs of few seeds can reach past what an accuracy can be
    if threshold is not None:
        ax.axhline(threshold, color="0.5", lw=0.8, ls="--", label=f"usable: {threshold * 100:.1f}%"
                   if metric.endswith("acc") else f"usable: {threshold:.3g}")
    ax.set_xlabel(axis.replace("_", " ") + (" (log scale)" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel(metric_name(metric))
    ax.grid(alpha=0.3)
    _outside_legend(ax)
    if title:
        ax.set_title(title + ("; x = diverged" if marked else ""), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


PROBE_PANELS = (("loss_range", "loss range along the gradient"), ("beta", "effective beta-smoothness"),
                ("ics_l2", "gradient shift ||G - G'|| (mean over layers)"), ("ics_cos", "cos(G, G') (mean over layers)"))


def contrast_figure(levels: dict, metrics: list[str], path: str | Path, *, probes: dict | None = None,
                    title: str = "") -> Path:
    """The figure of a claim made of contrasts between levels: one bar chart per final metric
    (mean and 95% CI over seeds per level), and with ``probes`` the landscape probe's measures
    over training (mean over seeds per level, one panel each).

    Args:
        levels: ``{level: {metric: {"mean", "ci95", "n"}}}`` as
            :func:`bnlab.experiments.reproduce.contrast_comparison` gives them.
        metrics: the metrics to draw as bars (``summary.*`` ones are drawn over training
            instead when ``probes`` has them).
        probes: ``{level: {key: [(step, mean)]}}`` (:func:`bnlab.experiments.reproduce.probe_series`).
    """
    probe_keys = [k for k, _ in PROBE_PANELS if probes and any(k in s for s in probes.values())]
    bars = [m for m in metrics if not (m.startswith("summary.") and m[8:] in probe_keys)]
    n = len(bars) + len(probe_keys)
    cols = min(n, 3)
    rows = -(-n // cols)
    names = list(levels)
    width = max(4.6, 1.3 * len(names))  # room for every level's label under its bar
    fig, axes = _figure(rows, cols, figsize=(width * cols, 3.6 * rows))
    flat = [ax for row in axes for ax in row]
    for ax, metric in zip(flat, bars):
        pct = metric.endswith(("acc", "error", "gap"))
        means = [levels[lv][metric]["mean"] for lv in names]
        cis = [levels[lv][metric]["ci95"] or 0 for lv in names]
        xs = list(range(len(names)))
        ax.bar(xs, [m if m is not None else 0 for m in means], yerr=cis, capsize=3,
               color=[f"C{i}" for i in xs], alpha=0.85)
        values = [("no runs" if m is None else f"{m * 100:.1f}%" if pct else f"{m:.3g}") for m in means]
        ax.set_xticks(xs, [f"{lv.replace(', ', chr(10))}\n{v}" for lv, v in zip(names, values)], fontsize=7)
        ax.set_ylabel(metric_name(metric))
        if metric.endswith(("acc", "error")):
            lo = min((m for m in means if m is not None), default=0)
            ax.set_ylim(max(0.0, lo - 0.15), 1.0)
        ax.set_title(metric_name(metric), fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    for ax, key in zip(flat[len(bars):], probe_keys):
        for i, lv in enumerate(names):
            pts = (probes.get(lv) or {}).get(key) or []
            if pts:
                ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", ms=3, color=f"C{i}", label=lv)
        ax.set_xlabel("training step")
        ax.set_title(dict(PROBE_PANELS)[key], fontsize=9)
        if key in ("loss_range", "beta", "ics_l2"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in flat[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
