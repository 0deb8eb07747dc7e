"""Cost of activation tracking: one epoch with tracking off vs on, measured alternately.

deeplizard BN CNN on Fashion-MNIST (batch 1000, 60 steps per epoch) and the BN paper's MLP
(batch 60, 1000 steps per epoch), tracking the input of every nonlinearity (first 64 examples of
the batch) at the default every 100 steps and at a dense every 10 steps.

    python benchmarks/track_overhead.py [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bnlab import models
from bnlab.data import load_splits
from bnlab.inspect import ActivationTracker
from bnlab.train import fit

CASES = [("deeplizard-cnn", "tutorial", 1000, "adam", 0.01, 100, "zscore"),
         ("deeplizard-cnn", "tutorial", 1000, "adam", 0.01, 10, "zscore"),
         ("ioffe-mlp", "tutorial", 60, "sgd", 0.5, 100, "scale"),
         ("ioffe-mlp", "tutorial", 60, "sgd", 0.5, 10, "scale")]


def epoch(train, name, bn, bs, opt, lr, every, track):
    torch.manual_seed(0)
    m = models.build(name, bn=bn, input_shape=train.input_shape, num_classes=10)
    cbs = [ActivationTracker(every=every)] if track else []
    t0 = time.perf_counter()
    fit(m, train, None, optimizer=opt, lr=lr, batch_size=bs, epochs=1, callbacks=cbs, progress=False)
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    out = []
    for name, bn, bs, opt, lr, every, std in CASES:
        train, _ = load_splits("fashion-mnist", standardize=std)
        off, on = [], []
        for _ in range(args.rounds):
            off.append(epoch(train, name, bn, bs, opt, lr, every, False))
            on.append(epoch(train, name, bn, bs, opt, lr, every, True))
        r = {"model": name, "batch_size": bs, "every": every, "off_s": statistics.median(off),
             "on_s": statistics.median(on)}
        r["overhead"] = r["on_s"] / r["off_s"] - 1
        out.append(r)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for r in out:
        print(f"{r['model']:<15} batch {r['batch_size']:>4}, every {r['every']:>3} steps: off {r['off_s']:.2f} s, "
              f"on {r['on_s']:.2f} s, overhead {r['overhead'] * 100:+.1f}% (goal <= +10%)")


if __name__ == "__main__":
    main()
