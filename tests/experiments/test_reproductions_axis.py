"""Reproductions whose claim is about a numeric setting (lr-range): the recipe at a size smaller
than --quick, end to end — recipe, store, figure, verdict — through the CLI."""

import json
import math

import pytest

from bnlab.cli import main
from tests.conftest import FMNIST_DIR

pytestmark = pytest.mark.skipif(not __import__("os").path.isdir(FMNIST_DIR), reason="Fashion-MNIST not installed")


def test_lr_range_quick_end_to_end(tmp_path, capsys):
    db, fig = tmp_path / "r.db", tmp_path / "lr.png"
    assert main(["reproduce", "lr-range", "--quick", "--seeds", "2", "--store", str(db), "-o", str(fig),
                 "--json"]) == 0
    c = json.loads(capsys.readouterr().out)
    assert c["axis"] == "lr" and c["by"] == "bn" and set(c["series"]) == {"none", "after"}
    for level, pts in c["series"].items():
        assert [p["lr"] for p in pts] == [0.01, 0.1, 1.0, 10.0]
        for p in pts:
            assert p["runs"] == 2 and p["n"] + p["diverged"] == 2
            assert p["mean"] is None or (0.0 <= p["mean"] <= 1.0 and math.isfinite(p["mean"]))
    assert 0 < c["threshold"] < 1
    assert c["verdict"].startswith("usable lr") and ("Reproduces" in c["verdict"] or "not reproduce" in c["verdict"])
    # the verdict follows from the ranges it prints
    widths = {lv: (r["decades"] if r else -1) for lv, r in c["ranges"].items()}
    assert ("Reproduces" in c["verdict"]) == (widths["after"] > widths["none"])
    assert fig.read_bytes()[:4] == b"\x89PNG"
    # the text form: one row per learning rate, the verdict last
    assert main(["reproduce", "lr-range", "--quick", "--seeds", "2", "--store", str(db), "-o", str(fig)]) == 0
    text = capsys.readouterr().out
    assert "bn=none" in text and "bn=after" in text and text.rstrip().endswith(c["verdict"].split(". ")[-1].rstrip())
    # the sweep report opens with the same verdict and draws the metric against the setting
    page = tmp_path / "r.html"
    assert main(["report", "--store", str(db), "--sweep", c["sweep"], "-o", str(page)]) == 0
    doc = page.read_text()
    verdict_section = doc.split('<section id="verdict">')[1].split("</section>")[0]
    assert __import__("html").escape(c["verdict"]) in verdict_section
    assert "Test accuracy against lr</h2><img" in doc.replace("\n", "")


def test_groupnorm_smaller_than_quick_end_to_end(tmp_path):
    """The groupnorm recipe's machinery at a test size: cases (linked norm + weight_std), the
    learning rate scaled with the batch, test error per case and batch size, the figure, and a
    verdict that follows from the changes it prints."""
    import dataclasses

    from bnlab.experiments import RunStore, load_config, run_sweep
    from bnlab.experiments.reproduce import axis_comparison
    from bnlab.report.reproductions import format_comparison, reproduction_figure

    cfg = load_config("groupnorm").quick_size().override({"train_limit": 256, "test_limit": 128})
    cfg = dataclasses.replace(cfg, grid={"batch_size": [4, 64]})
    runs = cfg.runs()
    assert len(runs) == 6 * 2 * 2
    lrs = {(r.settings.batch_size, r.settings.lr) for r in runs}
    assert lrs == {(4, 0.1 * 4 / 32), (64, 0.1 * 64 / 32)}  # the linear scaling rule
    assert {cfg.case_label(r.settings.to_dict()) for r in runs} == {"BN", "Batch Renorm", "GN", "GN+WS", "LN", "IN"}
    db = str(tmp_path / "g.db")
    run_sweep(cfg, db, log=lambda m: None)
    with RunStore(db) as store:
        c = axis_comparison(store, cfg)
        fig = reproduction_figure(store, cfg, tmp_path / "g.png")
    assert list(c["series"]) == ["BN", "Batch Renorm", "GN", "GN+WS", "LN", "IN"] and c["metric"] == "test_error"
    for pts in c["series"].values():
        assert [p["batch_size"] for p in pts] == [4, 64]
        assert all(p["n"] == 2 and 0 <= p["mean"] <= 1 for p in pts)
    bn = c["changes"]["BN"]
    assert bn["diff"] == pytest.approx(c["series"]["BN"][0]["mean"] - c["series"]["BN"][1]["mean"])
    assert c["verdict"].startswith("test error at the smallest batch_size vs the largest")
    assert any(w in c["verdict"] for w in ("Reproduces", "Partly", "Does not reproduce"))
    text = format_comparison({**c, "figure": str(fig)})
    assert "GN+WS" in text and text.rstrip().endswith(c["verdict"].split(". ")[-1].rstrip())
    assert fig.read_bytes()[:4] == b"\x89PNG"
