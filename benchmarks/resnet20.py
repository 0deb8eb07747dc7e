"""ResNet-20 on Fashion-MNIST: training time with bnlab's BN vs torch's, and the inference latency
of the folded network vs its twin built without BN.

1. Training: the same ResNet-20 (bn=tutorial, same seed, same initial weights) with
   ``bn_impl=bnlab`` and ``bn_impl=torch``, Adam, batch 128, one pass over the first
   ``--train-images`` Fashion-MNIST training images with bnlab.train.fit. Rounds alternate the
   two; the median pass time is reported and scaled to a 60,000-image epoch.
2. Inference: the trained network folded (bnlab.nn.fold_batchnorm: a GraphModule without BN)
   vs ResNet-20 built with bn=none (the same convs with biases, no BN layers), eval mode,
   no_grad, batch 1 and batch 256, alternated in one process (median of rounds).

    python benchmarks/resnet20.py [--rounds 5] [--train-images 6000] [--json]

Goals (issue 13): training ratio bnlab / torch <= 1.0; folded / no-BN twin <= 1.02 at both batch
sizes. Run it on an idle machine: any other process makes the ratios noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import alternate  # noqa: E402

from bnlab import data as bdata  # noqa: E402
from bnlab import models  # noqa: E402
from bnlab.nn import fold_batchnorm, is_batchnorm  # noqa: E402
from bnlab.train import fit  # noqa: E402


def network(bn_impl: str = "bnlab", bn: str = "tutorial"):
    return models.build("resnet20", bn=bn, bn_impl=bn_impl, input_shape=(1, 28, 28), num_classes=10, seed=0)


def train_pass(train, bn_impl: str, batch_size: int) -> float:
    net = network(bn_impl)
    t0 = time.perf_counter()
    fit(net, train, None, lr=0.01, batch_size=batch_size, epochs=1, seed=0, progress=False)
    return time.perf_counter() - t0


def training(train, rounds: int, batch_size: int) -> dict:
    train_pass(train.subset(batch_size * 2), "bnlab", batch_size)  # warm-up (kernels compiled, caches)
    train_pass(train.subset(batch_size * 2), "torch", batch_size)
    times = {"bnlab": [], "torch": []}
    for _ in range(rounds):
        for impl in times:
            times[impl].append(train_pass(train, impl, batch_size))
    med = {k: statistics.median(v) for k, v in times.items()}
    scale = 60000 / len(train)
    return {"images": len(train), "batch_size": batch_size, "rounds": rounds,
            "seconds": med, "epoch_seconds": {k: v * scale for k, v in med.items()},
            "ratio_bnlab_over_torch": med["bnlab"] / med["torch"]}


def inference(train, rounds: int) -> dict:
    net = network()
    fit(net, train.subset(2000), None, lr=0.01, batch_size=128, epochs=1, seed=0, progress=False)
    folded, report = fold_batchnorm(net.eval())
    assert not any(is_batchnorm(m) for m in folded.modules()), report
    twin = network(bn="none").eval()
    out = {"bn_layers_folded": len(report.folded)}
    g = torch.Generator().manual_seed(0)
    for batch, reps in ((1, 100), (256, 3)):
        x = torch.randn((batch, 1, 28, 28), generator=g)
        with torch.no_grad():
            med = alternate({"folded": lambda: folded(x), "no-BN twin": lambda: twin(x),
                             "unfolded (BN eval)": lambda: net(x)}, rounds=rounds, reps=reps)
        out[f"batch {batch}"] = {"ms": {k: v * 1000 for k, v in med.items()},
                                 "ratio_folded_over_twin": med["folded"] / med["no-BN twin"]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median is reported (default 5)")
    ap.add_argument("--train-images", type=int, default=6000, help="training images per timed pass (default 6000)")
    ap.add_argument("--batch-size", type=int, default=128, help="training batch size (default 128)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    train = bdata.load("fashion-mnist", "train")
    train = train.subset(args.train_images)
    train = train.standardized(bdata.Standardizer.fit(train, "zscore"))
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                      f"{torch.get_num_threads()} threads",
           "training": training(train, args.rounds, args.batch_size),
           "inference": inference(train, args.rounds)}
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    t = res["training"]
    print(f"{res['machine']}\nResNet-20 training, {t['images']} images, batch {t['batch_size']}, median of {t['rounds']}:")
    for k, v in t["seconds"].items():
        print(f"  bn_impl={k:<6} {v:7.2f} s  (~{t['epoch_seconds'][k]:.0f} s per 60,000-image epoch)")
    print(f"  ratio bnlab / torch = {t['ratio_bnlab_over_torch']:.3f} (goal <= 1.0)")
    inf = res["inference"]
    print(f"ResNet-20 inference, {inf['bn_layers_folded']} BN layers folded:")
    for b in ("batch 1", "batch 256"):
        ms = inf[b]["ms"]
        print(f"  {b:<9} " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items())
              + f"; folded / twin = {inf[b]['ratio_folded_over_twin']:.3f} (goal <= 1.02)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
