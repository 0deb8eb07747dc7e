"""One training epoch of the deeplizard BN CNN on Fashion-MNIST, three ways, in one process:

  bnlab       bnlab.train.fit (uint8 data in memory, batches by index slicing, standardized per batch)
  dataloader  the usual hand-written loop over DataLoader(TensorDataset(float inputs), shuffle=True)
  bare        a bare loop slicing a pre-standardized float tensor with a random permutation

Same network (same seed, same initial weights), Adam lr 0.01, batch 1000, same BN layers. Rounds
alternate the three so machine drift hits each equally; the median epoch time is reported.

    python benchmarks/train_epoch.py [--rounds 3] [--batch-size 1000] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from bnlab import data as bdata
from bnlab import models
from bnlab.train import fit


def fresh_model(seed=50):
    torch.manual_seed(seed)
    return models.build("deeplizard-cnn", bn="tutorial", input_shape=(1, 28, 28), num_classes=10)


def epoch_bnlab(train, batch_size):
    m = fresh_model()
    t0 = time.perf_counter()
    fit(m, train, None, lr=0.01, batch_size=batch_size, epochs=1, seed=50, progress=False)
    return time.perf_counter() - t0


def _step(m, opt, x, y):
    loss = F.cross_entropy(m(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def epoch_dataloader(xf, y, batch_size):
    m = fresh_model()
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    loader = DataLoader(TensorDataset(xf, y), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(50))
    t0 = time.perf_counter()
    m.train()
    for xb, yb in loader:
        _step(m, opt, xb, yb)
    return time.perf_counter() - t0


def epoch_bare(xf, y, batch_size):
    m = fresh_model()
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    t0 = time.perf_counter()
    m.train()
    perm = torch.randperm(len(xf), generator=torch.Generator().manual_seed(50))
    for i in range(0, len(xf), batch_size):
        idx = perm[i:i + batch_size]
        _step(m, opt, xf[idx], y[idx])
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description="bnlab trainer vs DataLoader loop vs bare loop, one epoch")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--data-dir")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    train, _ = bdata.load_splits("fashion-mnist", args.data_dir, standardize="zscore")
    xf = torch.cat([x for x, _ in train.batches(10000)])  # float32, standardized once, for the baselines
    y = train.y
    times = {"bnlab": [], "dataloader": [], "bare": []}
    epoch_bare(xf[:2000], y[:2000], args.batch_size)  # warm-up (allocators, BN kernels)
    for _ in range(args.rounds):
        times["bnlab"].append(epoch_bnlab(train, args.batch_size))
        times["dataloader"].append(epoch_dataloader(xf, y, args.batch_size))
        times["bare"].append(epoch_bare(xf, y, args.batch_size))
    # The data pipeline alone: one epoch of batches, no model.
    data_only = {"bnlab": [], "dataloader": []}
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for _ in train.batches(args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(50)):
            pass
        data_only["bnlab"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in DataLoader(TensorDataset(xf, y), batch_size=args.batch_size, shuffle=True):
            pass
        data_only["dataloader"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    dmed = {k: statistics.median(v) for k, v in data_only.items()}
    out = {"median_seconds": med, "all_seconds": times, "batch_size": args.batch_size,
           "ratio_vs_dataloader": med["bnlab"] / med["dataloader"], "ratio_vs_bare": med["bnlab"] / med["bare"],
           "data_only_seconds": dmed, "data_only_ratio": dmed["bnlab"] / dmed["dataloader"],
           "threads": torch.get_num_threads(), "torch": str(torch.__version__)}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"one epoch, deeplizard BN CNN, Fashion-MNIST 60k, batch {args.batch_size}, {out['threads']} threads, "
          f"median of {args.rounds}")
    for k in ("bnlab", "dataloader", "bare"):
        print(f"  {k:<11} {med[k]:6.2f} s   ({', '.join(f'{t:.2f}' for t in times[k])})")
    print(f"bnlab / dataloader = {out['ratio_vs_dataloader']:.2f} (goal <= 0.55)")
    print(f"bnlab / bare       = {out['ratio_vs_bare']:.2f} (goal <= 1.05)")
    print(f"data pipeline alone (no model): bnlab {dmed['bnlab']:.3f} s, dataloader {dmed['dataloader']:.3f} s, "
          f"ratio {out['data_only_ratio']:.2f}")


if __name__ == "__main__":
    main()
