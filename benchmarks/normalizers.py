"""Training time of fast-cnn on Fashion-MNIST with each normalizer, relative to batch norm.

The same network (bn=after, seed 0) with norm = batch, renorm, ghost, ghost-renorm, noisy, group, layer, instance
(instance only where every BN place is a feature map: fast-cnn has a dense BN, so it is
skipped and said so), group + weight standardization, and none; Adam, batch 128, one pass over
the first ``--train-images`` training images with bnlab.train.fit. Rounds alternate the
normalizers; the median pass time is reported with its ratio to batch norm.

    python benchmarks/normalizers.py [--rounds 3] [--train-images 6000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch

from bnlab import data as bdata
from bnlab import models
from bnlab.errors import ConfigError
from bnlab.train import fit

VARIANTS = {"batch": {}, "renorm": {"norm": "renorm"}, "ghost": {"norm": "ghost"},
            "ghost-renorm": {"norm": "ghost-renorm"}, "noisy": {"norm": "noisy"}, "group": {"norm": "group"},
            "group+WS": {"norm": "group", "weight_std": True}, "layer": {"norm": "layer"},
            "instance": {"norm": "instance"}, "none": {"norm": "none"}}


def network(model: str, options: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # group counts capped at small layers: said in the docs
        return models.build(model, bn="after", input_shape=(1, 28, 28), num_classes=10, seed=0, **options)


def one_pass(train, model: str, options: dict, batch_size: int) -> float:
    net = network(model, options)
    t0 = time.perf_counter()
    fit(net, train, None, lr=0.01, batch_size=batch_size, epochs=1, seed=0, progress=False)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported (default 3)")
    ap.add_argument("--train-images", type=int, default=6000, help="training images per timed pass (default 6000)")
    ap.add_argument("--batch-size", type=int, default=128, help="training batch size (default 128)")
    ap.add_argument("--model", default="fast-cnn", help="the network (default fast-cnn)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    train = bdata.load("fashion-mnist", "train").subset(args.train_images)
    train = train.standardized(bdata.Standardizer.fit(train, "zscore"))
    variants, skipped = {}, {}
    for name, options in VARIANTS.items():
        try:
            network(args.model, options)
            variants[name] = options
        except ConfigError as e:
            skipped[name] = str(e)
    for options in variants.values():  # warm-up
        one_pass(train.subset(args.batch_size * 2), args.model, options, args.batch_size)
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, options in variants.items():
            times[name].append(one_pass(train, args.model, options, args.batch_size))
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                      f"{torch.get_num_threads()} threads",
           "model": args.model, "images": len(train), "batch_size": args.batch_size, "rounds": args.rounds,
           "seconds": med, "ratio_to_batch": {k: v / med["batch"] for k, v in med.items()}, "skipped": skipped}
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{res['machine']}\n{args.model}, {len(train)} images, batch {args.batch_size}, median of {args.rounds}:")
    for k, v in med.items():
        print(f"  {k:<12} {v:6.2f} s   x{res['ratio_to_batch'][k]:.2f} of batch norm")
    for k, why in skipped.items():
        print(f"  {k:<9} skipped: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
