"""bnlab BN vs torch's native BN: time per call, measured alternately in one process.

Training mode: forward + backward (input and parameter gradients, running-stat update).
Eval mode: forward only, no grad. Prints one row per shape with the ratio bnlab / torch
(< 1 means bnlab is faster) and, for reference, the same math in plain PyTorch ops.

    python benchmarks/bn_layer.py [--rounds 7] [--reps 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _timing import alternate  # noqa: E402

import bnlab.nn as bnn  # noqa: E402
from bnlab.nn import _backend  # noqa: E402

SHAPES = [(1000, 6, 12, 12), (64, 64, 24, 24), (256, 64, 12, 12), (1000, 120)]


def layer_pair(shape):
    c = shape[1]
    if len(shape) == 4:
        return nn.BatchNorm2d(c), bnn.BatchNorm2d(c)
    return nn.BatchNorm1d(c), bnn.BatchNorm1d(c)


def train_step(module, x, dy):
    def run():
        xx = x.detach().requires_grad_()
        module(xx).backward(dy)
    return run


def eval_step(module, x):
    def run():
        with torch.no_grad():
            module(x)
    return run


def with_backend(name, fn):
    def run():
        old = _backend.get_backend().name
        bnn.set_backend(name)
        try:
            fn()
        finally:
            bnn.set_backend(old)
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    backend = bnn.backend_name()
    for shape in SHAPES:
        x, dy = torch.randn(shape) * 2 + 1, torch.randn(shape)
        ref, ours = layer_pair(shape)
        t = alternate({
            "torch": train_step(ref, x, dy),
            "bnlab": train_step(ours, x, dy),
            "ops": with_backend("eager", train_step(ours, x, dy)),
        }, args.rounds, args.reps)
        ref.eval(), ours.eval()
        e = alternate({"torch": eval_step(ref, x), "bnlab": eval_step(ours, x)}, args.rounds, args.reps)
        rows.append({
            "shape": list(shape),
            "train_torch_ms": t["torch"] * 1e3, "train_bnlab_ms": t["bnlab"] * 1e3,
            "train_ratio": t["bnlab"] / t["torch"], "train_ops_ratio": t["ops"] / t["torch"],
            "eval_torch_ms": e["torch"] * 1e3, "eval_bnlab_ms": e["bnlab"] * 1e3,
            "eval_ratio": e["bnlab"] / e["torch"],
        })
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
            "backend": backend, "rounds": args.rounds, "reps": args.reps}
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
        return
    print(f"bnlab backend {backend}, torch {meta['torch']}, {meta['threads']} threads; median of {args.rounds} rounds x {args.reps} calls")
    print(f"{'shape':>18} | {'train fwd+bwd: torch':>20} {'bnlab':>8} {'ratio':>6} {'ops ratio':>9} | {'eval fwd: torch':>15} {'bnlab':>8} {'ratio':>6}")
    for r in rows:
        print(f"{str(tuple(r['shape'])):>18} | {r['train_torch_ms']:>18.3f}ms {r['train_bnlab_ms']:>6.3f}ms {r['train_ratio']:>6.2f} "
              f"{r['train_ops_ratio']:>9.2f} | {r['eval_torch_ms']:>13.3f}ms {r['eval_bnlab_ms']:>6.3f}ms {r['eval_ratio']:>6.2f}")
    worst = max(max(r["train_ratio"], r["eval_ratio"]) for r in rows)
    print(f"worst ratio {worst:.2f} (goal <= 1.00, moonshot <= 0.90)")


if __name__ == "__main__":
    main()
