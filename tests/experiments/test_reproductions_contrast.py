"""Reproductions whose claim is a set of contrasts between cases (santurkar, renorm): the recipes
at a size smaller than --quick, end to end — recipe, store, figure, contrasts, verdict, report."""

import html
import math

import pytest

from bnlab.cli import main
from bnlab.experiments import RunStore, load_config, run_sweep
from bnlab.experiments.reproduce import contrast_comparison, probe_series
from bnlab.report.reproductions import format_comparison, reproduction_figure
from tests.conftest import FMNIST_DIR

pytestmark = pytest.mark.skipif(not __import__("os").path.isdir(FMNIST_DIR), reason="Fashion-MNIST not installed")


def _run(name, tmp_path, **small):
    cfg = load_config(name).quick_size().override(small)
    db = str(tmp_path / f"{name}.db")
    run_sweep(cfg, db, log=lambda m: None)
    with RunStore(db) as store:
        c = contrast_comparison(store, cfg)
        probes = probe_series(store, cfg)
        fig = reproduction_figure(store, cfg, tmp_path / f"{name}.png")
    return cfg, db, c, probes, fig


def _check_contrasts(c, n_seeds):
    for level, st in c["levels"].items():
        for m in c["metrics"]:
            assert st[m]["n"] == n_seeds and math.isfinite(st[m]["mean"]), (level, m)
    for x in c["contrasts"]:
        assert math.isfinite(x["diff"])
        a, b = c["levels"][x["a"]][x["metric"]]["mean"], c["levels"][x["b"]][x["metric"]]["mean"]
        assert x["diff"] == pytest.approx(a - b)
        if math.isnan(x["p"]) and x["expect"] != "similar":
            assert x["holds"] is None  # no spread to test: undecided, never a verdict by default
            continue
        # each contrast's verdict follows from the numbers it prints
        sig = x["p"] < 0.05
        expected = {"higher": sig and x["diff"] > 0, "lower": sig and x["diff"] < 0,
                    "not_higher": not (sig and x["diff"] > 0), "not_lower": not (sig and x["diff"] < 0),
                    "similar": abs(x["diff"]) <= x.get("within", 0),
                    "recovers": sig and x["diff"] * x.get("gap", 0) > 0 and x.get("fraction", 0) >= 0.5
                    and x.get("gap_p", 1) < 0.05}[x["expect"]]
        assert x["holds"] == expected, x
    held = sum(bool(x["holds"]) for x in c["contrasts"])
    decided = sum(x["holds"] is not None for x in c["contrasts"])
    word = ("No verdict" if not decided else "Reproduces" if held == len(c["contrasts"]) else "Partly" if held
            else "Does not reproduce")
    assert c["verdict"].startswith(word)


def test_santurkar_smaller_than_quick_end_to_end(tmp_path):
    cfg, db, c, probes, fig = _run("santurkar", tmp_path, train_limit=640, test_limit=256, track_every=2)
    assert list(c["levels"]) == ["Standard", "BN", "Noisy BN"] and c["by"] == "case"
    assert c["metrics"] == ["test_acc", "summary.loss_range", "summary.beta", "summary.ics_cos"]
    _check_contrasts(c, 2)
    # the landscape probe ran every 2 steps of the 5 per run, in every case
    assert set(probes) == {"Standard", "BN", "Noisy BN"}
    for series in probes.values():
        assert [s for s, _ in series["beta"]] == [1, 2, 4]
        assert all(v > 0 and math.isfinite(v) for _, v in series["loss_range"])
        assert all(-1 <= v <= 1 for _, v in series["ics_cos"])
    assert fig.read_bytes()[:4] == b"\x89PNG"
    text = format_comparison({**c, "figure": str(fig)})
    assert "Noisy BN" in text and "(claim: within 2 points)" in text and text.rstrip().endswith(c["verdict"])
    # the sweep report opens with the same contrasts and verdict and draws the probes
    page = tmp_path / "s.html"
    assert main(["report", "--store", db, "--sweep", cfg.name, "-o", str(page)]) == 0
    doc = page.read_text()
    verdict_section = doc.split('<section id="verdict">')[1].split("</section>")[0]
    assert html.escape(c["verdict"]) in verdict_section and verdict_section.count("<li>") == 5
    assert "The compared levels and the landscape probes over training</h2><img" in doc.replace("\n", "")


def test_renorm_smaller_than_quick_end_to_end(tmp_path, capsys):
    cfg, db, c, probes, fig = _run("renorm", tmp_path, train_limit=320, test_limit=256)
    assert list(c["levels"]) == ["BN", "Batch Renorm", "BN, micro-batches of 4", "Batch Renorm, micro-batches of 4",
                                 "BN, non-i.i.d.", "Batch Renorm, non-i.i.d."]
    runs = {cfg.case_label(r.settings.to_dict()): r.settings for r in cfg.runs()}
    assert runs["Batch Renorm, micro-batches of 4"].norm == "ghost-renorm"
    assert runs["BN, non-i.i.d."].batch_classes == 2 and runs["BN"].batch_classes is None
    _check_contrasts(c, 2)
    recover = [x for x in c["contrasts"] if x["expect"] == "recovers"]
    assert len(recover) == 2 and all(x["of"] == "BN" for x in recover)
    for x in recover:
        gap = c["levels"]["BN"]["test_acc"]["mean"] - c["levels"][x["b"]]["test_acc"]["mean"]
        if x.get("gap") is not None:
            assert x["gap"] == pytest.approx(gap) and x["fraction"] == pytest.approx(x["diff"] / gap)
    assert probes == {} and fig.read_bytes()[:4] == b"\x89PNG"


def test_a_contrast_that_names_no_level_is_refused_when_the_config_loads(tmp_path):
    from bnlab.errors import ConfigError

    text = (load_config("renorm").source.read_text() if hasattr(load_config("renorm").source, "read_text")
            else open(load_config("renorm").source).read())
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace('b = "BN, non-i.i.d."', 'b = "BN non-iid"'))
    with pytest.raises(ConfigError, match=r"claim contrast 4: b = 'BN non-iid' is not a level of this sweep; "
                                          r"levels: BN, Batch Renorm"):
        load_config(str(bad))
    bad.write_text(text.replace('expect = "recovers"', 'expect = "recover"', 1))
    with pytest.raises(ConfigError, match="claim contrast 2: expect = 'recover'; choose one of higher"):
        load_config(str(bad))


def test_syncbn_runs_data_parallel_runs_from_a_sweep(tmp_path):
    """A sweep's run with nproc = 2 starts its own 2 processes; SyncBN on 2 x 4 gives what one
    process on 8 gives, run by run."""
    import dataclasses

    from bnlab.experiments.reproduce import runs_of

    cfg = load_config("syncbn").quick_size().override({"train_limit": 160, "test_limit": 200})
    cfg = dataclasses.replace(cfg, seeds=[0])
    db = str(tmp_path / "syncbn.db")
    run_sweep(cfg, db, log=lambda m: None)
    with RunStore(db) as store:
        c = contrast_comparison(store, cfg)
        rows_ = runs_of(store, cfg)
        fig = reproduction_figure(store, cfg, tmp_path / "syncbn.png")
    assert len(rows_) == 6 and all(r["status"] == "done" for r in rows_)
    by = {cfg.case_label(r): r for r in rows_}
    assert by["2 x 4, SyncBN"]["nproc"] == 2 and by["1 x 8"]["nproc"] == 1
    for sync, one in (("2 x 4, SyncBN", "1 x 8"), ("2 x 8, SyncBN", "1 x 16")):
        assert by[sync]["test_acc"] == pytest.approx(by[one]["test_acc"], abs=0.01)
        assert by[sync]["train_loss"] == pytest.approx(by[one]["train_loss"], rel=1e-3)
    assert by["2 x 4, BN per process"]["train_loss"] != pytest.approx(by["1 x 8"]["train_loss"], rel=1e-3)
    similar = [x for x in c["contrasts"] if x["expect"] == "similar"]
    assert len(similar) == 2 and all(x["holds"] for x in similar)
    assert all(x["holds"] is None for x in c["contrasts"] if x["expect"] != "similar")  # one seed: no test
    assert "undecided" in c["verdict"] and fig.read_bytes()[:4] == b"\x89PNG"


def test_more_batch_classes_than_the_data_has_is_refused_before_any_run(tmp_path):
    from bnlab.errors import ConfigError

    from bnlab.experiments import parse_config

    cfg = parse_config({"name": "skew", "dataset": "fashion-mnist", "seeds": [0],
                        "fixed": {"model": "keras-mlp", "bn": "after", "batch_size": 24, "batch_classes": 12}})
    with pytest.raises(ConfigError, match="batch_classes = 12 but fashion-mnist has 10 classes"):
        run_sweep(cfg, str(tmp_path / "r.db"), log=lambda m: None)
    assert not (tmp_path / "r.db").exists()
