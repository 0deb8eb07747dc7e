"""The interactive view of a sweep in report.html: plotly figures with plotly.js inlined.

The page must work offline and as a single file, so plotly.js (about 4.5 MB) is written into the
page once, never loaded from a CDN. Two figures:

- a parallel-coordinates plot: one line per finished run, through each setting that varies to
  the final metric (categorical settings become numbered axes labelled with their values);
- the metric against each numeric setting (mean over seeds, error bar ±1 std), one line per
  combination of the other settings that vary, on a log axis when the values span over 2 decades.
"""

from __future__ import annotations

import math

from bnlab.experiments import group
from bnlab.report.plots import metric_name

PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}  # no logo: it is a link to plotly.com


def is_numeric(values: list) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def log_scale(values: list) -> bool:
    """Whether positive numeric ``values`` span more than two decades (then they read best on a log axis)."""
    return is_numeric(values) and min(values) > 0 and max(values) / min(values) > 100


def _axis(values: list) -> dict:
    """A parallel-coordinates dimension's values and ticks: categories numbered 0, 1, ... and
    labelled; numbers as they are (log10 when they span over 2 decades), ticked at the grid values."""
    levels = sorted(set(values), key=lambda v: (str(type(v)), v if v is not None else 0))
    if not is_numeric(levels):
        names = [str(v) for v in levels]
        return {"values": [names.index(str(v)) for v in values], "tickvals": list(range(len(names))),
                "ticktext": names}
    f = math.log10 if log_scale(levels) else float
    return {"values": [f(v) for v in values], "tickvals": [f(v) for v in levels],
            "ticktext": [f"{v:g}" for v in levels]}


def sweep_view(rows_: list[dict], settings: list[str], metric: str = "test_acc") -> str | None:
    """The HTML of the interactive view of finished ``rows_`` over ``settings`` (those that vary),
    or ``None`` when it adds nothing to the PNG curves: a single categorical setting (or none)."""
    import plotly.graph_objects as go

    rows_ = [r for r in rows_ if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    numeric = [k for k in settings if is_numeric([r[k] for r in rows_])]
    if not rows_ or not (len(settings) > 1 or numeric):
        return None
    name = metric_name(metric)
    scores = [r[metric] for r in rows_]
    dims = [{"label": k, **_axis([r[k] for r in rows_])} for k in settings] + [{"label": name, "values": scores}]
    parallel = go.Figure(go.Parcoords(line={"color": scores, "colorscale": "Viridis", "showscale": True,
                                            "colorbar": {"title": {"text": name}}}, dimensions=dims))
    parallel.update_layout(title=f"Every run: its settings and final {name}", height=420)
    figures = [parallel]
    for k in numeric:
        others = [o for o in settings if o != k]
        lines: dict[str, list[dict]] = {}
        for g in sorted(group(rows_, settings), key=lambda g: g[k]):
            lines.setdefault(", ".join(f"{o}={g[o]}" for o in others) or name, []).append(g)
        fig = go.Figure([go.Scatter(x=[g[k] for g in gs], y=[g[f"{metric}_mean"] for g in gs], name=label,
                                    mode="lines+markers",
                                    error_y={"type": "data", "array": [g[f"{metric}_std"] or 0 for g in gs]})
                         for label, gs in lines.items()])
        levels = sorted({r[k] for r in rows_})
        fig.update_layout(title=f"Final {name} against {k} (mean over seeds, bars ±1 std)", height=420,
                          xaxis={"title": {"text": k}, "type": "log" if log_scale(levels) else "linear",
                                 "tickvals": levels, "ticktext": [f"{v:g}" for v in levels]},
                          yaxis={"title": {"text": name}})
        figures.append(fig)
    return "\n".join(fig.to_html(full_html=False, include_plotlyjs=i == 0, config=PLOTLY_CONFIG)
                     for i, fig in enumerate(figures))
