"""report.html read as a document: the answer first, settings as a table, human words, nothing fetched."""

import re
import statistics
from html.parser import HTMLParser
from unittest.mock import ANY

import pytest

from bnlab.experiments import RunStore, compare, parse_config, run_sweep
from bnlab.experiments.reproduce import comparison
from bnlab.report.sweeps import _claimed_difference, _effect_words, html_report

FIXED = {"model": "keras-mlp", "epochs": 2, "batch_size": 32, "train_limit": 300, "test_limit": 200}
CLAIM = {"text": "BN <b>wins</b> & the tutorial says so", "by": "bn", "metric": "test_acc", "epoch": 2}


class Page(HTMLParser):
    """The parts of a page the tests look at: tables (rows of cell texts), every src/href, scripts."""

    def __init__(self, text):
        super().__init__()
        self.tables, self.links, self.scripts = [], [], []
        self._cell = self._script = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.links += [a[k] for k in ("src", "href") if a.get(k)]
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "script":
            self._script = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell)
            self._cell = None
        elif tag == "script":
            self.scripts.append(self._script)
            self._script = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._script is not None:
            self._script += data

    def table(self, first_header: str) -> list[list[str]]:
        return next(t for t in self.tables if t and t[0][0] == first_header)


def run(store, name, grid, claim=None, **fixed):
    cfg = parse_config({"name": name, "dataset": "digits", "seeds": [0, 1, 2], "fixed": {**FIXED, **fixed},
                        "grid": grid, **({"claim": claim} if claim else {})})
    run_sweep(cfg, store, workers=1, threads=1, log=lambda *_: None)  # 1 thread: fast on a busy machine
    return cfg


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """{sweep name: report.html text} of a two-axis sweep, a one-axis one and two with a claim (the
    runs of the last three are runs of the first: equal settings are shared, nothing trains again)."""
    d = tmp_path_factory.mktemp("report")
    store = d / "s.db"
    run(store, "two", {"bn": ["none", "after"], "lr": [0.0001, 0.03]})
    run(store, "one", {"bn": ["none", "after"]}, lr=0.03)
    cfg = run(store, "wrong", {"bn": ["none", "after"]}, {**CLAIM, "values": {"none": 0.01, "after": 0.02}}, lr=0.03)
    with RunStore(store) as st:
        measured = {lv["bn"]: lv["measured_mean"] for lv in comparison(st, cfg)["levels"]}
    run(store, "right", {"bn": ["none", "after"]}, {**CLAIM, "values": {"after": measured["after"]}}, lr=0.03)
    with RunStore(store) as st:
        return {name: html_report(st, name, d / f"{name}.html").read_text()
                for name in ("one", "two", "wrong", "right")}


def verdict(page: str) -> str:
    return re.search(r'<section id="verdict">(.*?)</section>', page, re.S).group(1)


@pytest.mark.parametrize("name", ["one", "two", "wrong"])
def test_verdict_comes_first_and_nothing_is_fetched(pages, name):
    page = pages[name]
    assert page.index('<section id="verdict">') < page.index("<img")
    assert re.findall(r"<h2>(.*?)</h2>", page)[0] == "Verdict"
    parsed = Page(page)
    assert [x for x in parsed.links if not x.startswith("data:")] == []
    assert not re.search(r"""<(script|link|img|iframe)[^>]+(src|href)=["']?(https?:)?//""", page)


def test_one_grid_axis_has_a_verdict_in_words_and_no_plotly(pages):
    page = pages["one"]
    assert re.search(r"bn=(none|after) is (better than|ahead of) bn=(none|after) by [0-9.]+ points of test accuracy "
                     r"\(95% CI -?[0-9.]+ to -?[0-9.]+\), Welch p = [0-9.e-]+", verdict(page))
    assert "plotly-graph-div" not in page and "Plotly" not in page


def test_two_grid_axes_get_the_plotly_view_inlined_with_a_log_lr_axis(pages):
    page = pages["two"]
    assert page.count("plotly-graph-div") == 2  # parallel coordinates, test accuracy against lr
    assert max(len(s) for s in Page(page).scripts) > 1_000_000  # plotly.js itself, not a CDN link
    assert '"type":"parcoords"' in page and '"type":"log"' in page
    assert '"ticktext":["after","none"]' in page  # the categorical setting on a numbered, labelled axis
    assert '"text":"test accuracy"' in page
    # the effect of bn, once per learning rate: different experiments are never pooled
    assert re.findall(r"<b>Runs with (lr=[0-9.]+):</b> (?:No clear difference: )?bn=", verdict(page)) == [
        "lr=0.0001", "lr=0.03"]


def test_settings_are_a_table_with_the_gridded_ones_marked(pages):
    rows_ = Page(pages["two"]).table("setting")
    assert rows_[0] == ["setting", "value(s)", "gridded"]
    settings = {r[0]: r[1:] for r in rows_[1:]}
    assert settings["bn"] == ["none, after", "yes (2 values)"] and settings["lr"] == ["0.0001, 0.03", "yes (2 values)"]
    assert settings["model"] == ["keras-mlp", ""] and settings["dataset"] == ["digits", ""]
    assert "<pre>" not in pages["one"] and '"fixed"' not in pages["one"]  # no raw JSON config


def test_metrics_are_named_in_words(pages):
    page = pages["one"]
    headings = re.findall(r"<h[1-6]>(.*?)</h[1-6]>", page)
    assert "Test accuracy over epochs" in headings and not [h for h in headings if re.search(r"_acc|_loss", h)]
    assert "test accuracy" in Page(page).table("run")[0] and 'alt="test accuracy"' in page


def test_claim_is_shown_against_the_measurement_and_judged(pages):
    for name, answer, per_level in (("wrong", "does not reproduce", {"none": ("1.00%", "does not reproduce"),
                                                                     "after": ("2.00%", "does not reproduce")}),
                                    ("right", "reproduces", {"none": ("-", "no number claimed"),
                                                             "after": (ANY, "reproduces")})):
        v = verdict(pages[name])
        assert "BN &lt;b&gt;wins&lt;/b&gt; &amp; the tutorial says so" in v and "<b>wins</b>" not in v
        assert f"the claim <b>{answer}</b>" in v
        claimed = Page(v).table("bn")
        assert claimed[0] == ["bn", "claimed", "measured test accuracy at epoch 2", "seeds", "verdict"]
        assert {r[0]: (r[1], r[4]) for r in claimed[1:]} == per_level
        assert all(re.fullmatch(r"[0-9.]+% ± [0-9.]+", r[2]) and r[3] == "3" for r in claimed[1:])
    assert "Claimed: bn=after higher than bn=none by 1.00 points. Measured: " in verdict(pages["wrong"])


def runs(after, none, metric="test_acc"):
    """Rows of finished runs with bn=after and bn=none scoring ``after`` and ``none`` (one per seed)."""
    return [{"run_id": f"{bn}{i}", "status": "done", "seed": i, "bn": bn, metric: v}
            for bn, vals in (("after", after), ("none", none)) for i, v in enumerate(vals)]


@pytest.mark.parametrize("none, status", [([0.88, 0.87, 0.86], "same"), ([0.95, 0.96, 0.97], "reversed"),
                                          ([0.88, 0.95, 0.85], "unclear")])
def test_claimed_difference_is_judged_by_its_welch_test(none, status):
    c = {"by": "bn", "metric": "test_acc",
         "levels": [{"bn": "none", "claimed": 0.91}, {"bn": "after", "claimed": 0.937}]}
    got, words = _claimed_difference(c, runs([0.91, 0.93, 0.92], none))
    assert got == status and words.startswith("Claimed: bn=after higher than bn=none by 2.70 points. Measured: ")


def effect(after, none, metric="test_acc"):
    return _effect_words(compare(runs(after, none, metric), "bn", metric))


@pytest.mark.parametrize("b, words", [([0.88, 0.87, 0.86], "bn=after is better than bn=none"),
                                      ([0.88, 0.90, 0.85], "No clear difference: bn=after is ahead of bn=none")])
def test_effect_in_words_with_scipy_welch_interval(b, words):
    from scipy import stats

    a = [0.91, 0.93, 0.92]
    res = stats.ttest_ind(a, b, equal_var=False)
    lo, hi = (x * 100 for x in res.confidence_interval())
    diff = (statistics.fmean(a) - statistics.fmean(b)) * 100
    assert effect(a, b) == (f"{words} by {diff:.2f} points of test accuracy (95% CI {lo:.2f} to {hi:.2f}), "
                            f"Welch p = {res.pvalue:.2g}")
    assert (res.pvalue < 0.05) == words.startswith("bn=after is better")


def test_effect_in_words_for_a_loss_and_for_one_seed():
    loss = effect([0.3, 0.32], [0.2, 0.21], "test_loss")
    assert loss.startswith("bn=none is better than bn=after by 0.105 of test loss (95% CI ")
    assert effect([0.9], [0.8]) == ("bn=after is ahead of bn=none by 10.00 points of test accuracy, but with 1 seed(s) "
                                    "per side there is no test: run more seeds")
