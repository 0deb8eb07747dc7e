"""What `bnlab reproduce` shows: the claim next to the measured figures, and each recipe's figure."""

from __future__ import annotations

from pathlib import Path

from bnlab.experiments import RunStore
from bnlab.experiments.config import SweepConfig
from bnlab.experiments.reproduce import fig1_data


def format_comparison(c: dict) -> str:
    """The claim, a table of claimed vs measured values per level, and the verdicts."""
    def pct(v):
        return "-" if v is None else f"{v * 100:.2f}%"

    reached = {lv["at_epoch"] for lv in c["levels"] if lv["at_epoch"]}
    at = f" @ epoch {c['epoch']}" if c["epoch"] and c["epoch"] in reached else " (final)"
    metric = c["metric"] + at
    notes = []
    if c["epoch"] and reached and c["epoch"] not in reached:
        notes.append(f"note: the claim is at epoch {c['epoch']}; these runs stopped at epoch "
                     f"{', '.join(map(str, sorted(reached)))}, so the measured values are final ones")
    if c.get("claim_dataset") and c["claim_dataset"] != c["dataset"]:
        notes.append(f"note: the claim is for {c['claim_dataset']}; these runs are on {c['dataset']}, so the claimed "
                     "numbers are not expected here (the shape of the result is what compares)")
    lines = [f"{c['sweep']} on {c['dataset']}", f"claim: {c['claim']}", *notes, "",
             f"{c['by']:<10} {'claimed':>9} {'measured ' + metric:>30} {'n':>3} {'final train':>12} {'final test':>11}"]
    for lv in c["levels"]:
        m = lv["measured_mean"]
        meas = "-" if m is None else f"{pct(m)}" + (f" ± {lv['measured_ci95'] * 100:.2f}" if lv["measured_ci95"] else "")
        if lv["at_epoch"] and c["epoch"] in reached and lv["at_epoch"] != c["epoch"]:
            meas += f" (epoch {lv['at_epoch']})"
        lines.append(f"{str(lv[c['by']]):<10} {pct(lv['claimed']):>9} {meas:>30} {lv['n']:>3} "
                     f"{pct(lv['final_train_acc']):>12} {pct(lv['final_test_acc']):>11}")
    lines.append("(± is the 95% confidence half-width over seeds)")
    if c.get("figure"):
        lines.append(f"figure written to {c['figure']}")
    lines += [""] + [t["verdict"] for t in c["tests"]]
    return "\n".join(lines)


def reproduction_figure(store: RunStore, cfg: SweepConfig, path: str | Path) -> Path | None:
    """The recipe's own figure, if it has one (ioffe: Fig. 1 of the BN paper); else ``None``."""
    from bnlab.report.plots import ioffe_fig1

    if not cfg.fixed.get("track_activations"):
        return None
    data = fig1_data(store, cfg)
    if data is None:
        return None
    return ioffe_fig1(data["accuracy"], data["without"], data["with"], path,
                      title=f"{cfg.name} on {cfg.dataset}: Fig. 1 of Ioffe & Szegedy (accuracy: mean of "
                            f"{data['seeds']} seed(s); percentiles: first seed)")
