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
