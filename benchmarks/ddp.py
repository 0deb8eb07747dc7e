"""One training run in 2 processes (DistributedDataParallel over gloo) against 1 process, on this machine.

The same run — fast-cnn with BN before every activation, Adam, 128 examples per step, one pass
over the first ``--train-images`` Fashion-MNIST images — three ways, through the CLI as a user
runs it: 1 process with 2 torch threads (``--batch-size 128``); 2 processes with 1 thread each
and per-process BN (``--nproc 2 --batch-size 64``); the same with bnlab's SyncBatchNorm
(``--sync-bn``). Each pass's training time is the epoch's own clock (``seconds`` of the history,
so process start-up and data loading are left out); rounds alternate the three, medians are
reported with their ratios to the single process, and SyncBN's cost per step against per-process BN.

On a 2-core machine DDP is for correctness (the same result as a bigger machine would give),
not for speed: both ways use both cores.

    python benchmarks/ddp.py [--rounds 3] [--train-images 10000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

WAYS = {"1 process x 2 threads": ["--batch-size", "128"],
        "2 processes x 1 thread, BN per process": ["--nproc", "2", "--batch-size", "64"],
        "2 processes x 1 thread, SyncBN": ["--nproc", "2", "--batch-size", "64", "--sync-bn"]}


def one_pass(extra: list[str], images: int) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "bnlab", "train", "--model", "fast-cnn", "--bn", "before", "--optimizer", "adam",
           "--lr", "0.001", "--epochs", "1", "--train-limit", str(images), "--test-limit", "100", "--json", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    report = json.loads(out.stdout.strip().splitlines()[-1])
    return report["epochs"][0]["seconds"], report["steps"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="passes of each way (median reported)")
    ap.add_argument("--train-images", type=int, default=10000, help="training images per pass")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    times: dict[str, list[float]] = {w: [] for w in WAYS}
    steps = 0
    for _ in range(args.rounds):
        for way, extra in WAYS.items():
            t, steps = one_pass(extra, args.train_images)
            times[way].append(t)
    med = {w: statistics.median(v) for w, v in times.items()}
    base = med["1 process x 2 threads"]
    local, sync = med["2 processes x 1 thread, BN per process"], med["2 processes x 1 thread, SyncBN"]
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "train_images": args.train_images,
              "steps": steps, "rounds": args.rounds, "seconds": med, "ratio_to_1_process": {w: m / base for w, m in med.items()},
              "syncbn_ms_per_step": (sync - local) / steps * 1000, "syncbn_ratio_to_local": sync / local}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"fast-cnn, bn before, {steps} steps of 128 examples ({args.train_images} images), median of {args.rounds}:")
    for w, m in med.items():
        print(f"  {w:<42} {m:6.2f} s   x{m / base:.2f} of 1 process")
    print(f"  SyncBN vs per-process BN: x{sync / local:.2f}, {(sync - local) / steps * 1000:+.2f} ms per step")


if __name__ == "__main__":
    main()
