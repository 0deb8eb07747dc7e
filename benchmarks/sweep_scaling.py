"""Sweep throughput: the same 4 small runs with 1 worker (2 threads) vs 2 workers (1 thread each).

Small runs: the BN paper's MLP on Fashion-MNIST, batch 60, 4 epochs (4,000 steps, ~5 s), with and
without BN, 2 seeds. A second case runs 4 deeplizard CNNs (batch 100, 10,000 images, 2 epochs),
where one process already keeps both cores busy. Both sweeps write to fresh stores; the wall
time includes spawning the workers and loading the data in them.

    python benchmarks/sweep_scaling.py [--rounds 2] [--mlp-epochs 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bnlab.experiments import parse_config, run_sweep

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


def timed(config: dict, workers: int) -> float:
    cfg = parse_config(config)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run_sweep(cfg, str(Path(tmp) / "s.db"), workers=workers, log=lambda m: None)
        return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--mlp-epochs", type=int, default=4, help="epochs per MLP run (start-up is amortized over them)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    CONFIGS["mlp"]["fixed"]["epochs"] = args.mlp_epochs
    results = {}
    for case, config in CONFIGS.items():
        one, two = [], []
        for _ in range(args.rounds):
            one.append(timed(config, 1))
            two.append(timed(config, 2))
        r = {"one_worker_s": statistics.median(one), "two_workers_s": statistics.median(two), "runs": 4,
             "all": {"one": one, "two": two}}
        r["speedup"] = r["one_worker_s"] / r["two_workers_s"]
        results[case] = r
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for case, r in results.items():
        print(f"{case}: 4 runs, 1 worker {r['one_worker_s']:.1f} s, 2 workers {r['two_workers_s']:.1f} s "
              f"(medians of {args.rounds}): throughput x{r['speedup']:.2f} (goal >= 1.8)")


if __name__ == "__main__":
    main()
