"""Sweep throughput: the same 4 small runs in 1 process (1 or 2 threads), 2 processes (1 thread each) and --workers auto.

Small runs: the BN paper's MLP on Fashion-MNIST, batch 60, 4 epochs (4,000 steps, ~5 s), with and
without BN, 2 seeds. A second case runs 4 deeplizard CNNs (batch 100, 10,000 images, 2 epochs),
where one process already keeps both cores busy. Every sweep is a ``bnlab sweep`` command, as
a user runs it, on a fresh store; its wall time includes starting Python and torch and the
workers and loading the data in them. The ratios are the best
single-process setting's time over the other's (above 1 = faster than one process can be). Each
line also says when the first run began (start-up: Python, torch, the workers) and how long the
command took after the last run ended (shutting down), from the store's clock of the runs.

    python benchmarks/sweep_scaling.py [--rounds 2] [--mlp-epochs 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bnlab.experiments import parse_config

CONFIGS = {
    "mlp": {"name": "scaling-mlp", "dataset": "fashion-mnist", "seeds": [0, 1],
            "fixed": {"model": "ioffe-mlp", "optimizer": "sgd", "lr": 0.5, "epochs": 4, "batch_size": 60,
                      "standardize": "scale"},
            "grid": {"bn": ["none", "tutorial"]}},
    "cnn": {"name": "scaling-cnn", "dataset": "fashion-mnist", "seeds": [0, 1],
            "fixed": {"model": "deeplizard-cnn", "epochs": 2, "batch_size": 100, "train_limit": 10000,
                      "test_limit": 2000},
            "grid": {"bn": ["none", "tutorial"]}},
}


def _toml(config: dict) -> str:
    lines = [f'name = "{config["name"]}"', f'dataset = "{config["dataset"]}"', f"seeds = {config['seeds']}", "[fixed]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in config["fixed"].items()]
    lines += ["[grid]"] + [f"{k} = {json.dumps(v)}" for k, v in config["grid"].items()]
    return "\n".join(lines) + "\n"


def timed(config: dict, workers, threads=None) -> tuple[float, float, float]:
    """``(wall seconds, seconds until the first run started, seconds after the last run ended)``
    of one ``bnlab sweep`` command (the two from the store's clock of its runs)."""
    import sqlite3

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.toml"
        path.write_text(_toml(config))
        cmd = [sys.executable, "-m", "bnlab", "sweep", str(path), "--store", str(Path(tmp) / "s.db"), "--quiet",
               "--workers", str(workers)] + (["--threads", str(threads)] if threads else [])
        t0, w0 = time.perf_counter(), time.time()
        subprocess.run(cmd, check=True, capture_output=True)
        wall = time.perf_counter() - t0
        with sqlite3.connect(Path(tmp) / "s.db") as db:
            first, last = db.execute("SELECT min(started), max(ended) FROM runs").fetchone()
        return wall, first - w0, w0 + wall - last


SETTINGS = {"1 process x 1 thread": (1, 1), "1 process x 2 threads": (1, 2), "2 processes x 1 thread": (2, 1),
            "auto": ("auto", None)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="sweeps of each setting (median reported)")
    ap.add_argument("--mlp-epochs", type=int, default=4, help="epochs per MLP run (start-up is amortized over them)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    CONFIGS["mlp"]["fixed"]["epochs"] = args.mlp_epochs
    from bnlab.experiments.sweep import auto_workers, check_runs

    results = {}
    for case, config in CONFIGS.items():
        measured = {k: [] for k in SETTINGS}  # (wall, until the first run, after the last) per round
        for _ in range(args.rounds):
            for k, (w, t) in SETTINGS.items():
                measured[k].append(timed(config, w, t))
        times = {k: [m[0] for m in v] for k, v in measured.items()}
        med, start_up, shut_down = ({k: statistics.median(m[i] for m in v) for k, v in measured.items()}
                                    for i in range(3))
        best = min(med["1 process x 1 thread"], med["1 process x 2 threads"])
        workers, threads, why = auto_workers(check_runs(parse_config(config)))
        results[case] = {"seconds": med, "all": times, "runs": 4, "auto_chose": f"{workers} x {threads} ({why})",
                         "ratio_to_best_single_process": {k: best / m for k, m in med.items()},
                         "until_first_run": start_up, "after_last_run": shut_down}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for case, r in results.items():
        print(f"{case}: 4 runs, medians of {args.rounds}; auto chose {r['auto_chose']}")
        for k, m in r["seconds"].items():
            print(f"  {k:<24} {m:6.1f} s   x{r['ratio_to_best_single_process'][k]:.2f} of the best single process"
                  f"   (first run began at {r['until_first_run'][k]:.1f} s, {r['after_last_run'][k]:.1f} s after the last"
                  " ended)")
    print("goals: mlp 2 processes (auto) >= x1.8; cnn auto >= x1.0")


if __name__ == "__main__":
    main()
