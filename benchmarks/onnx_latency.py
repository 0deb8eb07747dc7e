"""Inference latency: the exported ONNX file in onnxruntime vs the folded network in PyTorch.

deeplizard's CNN (bn=tutorial) and ResNet-20, both on 1x28x28 inputs with 10 classes, BN
statistics made non-trivial, exported with bnlab.export.to_onnx (standardization not baked, so
both sides compute exactly the folded network on the same input). Batch 1 and batch 256,
contenders alternated in one process (median of rounds); the unfolded network in PyTorch eval is
timed too, for reference. Both runtimes get the same number of threads.

    python benchmarks/onnx_latency.py [--rounds 7] [--threads N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import alternate  # noqa: E402

from bnlab import models  # noqa: E402
from bnlab.data import Standardizer  # noqa: E402
from bnlab.export import to_onnx  # noqa: E402
from bnlab.models.resnet import resnet20  # noqa: E402
from bnlab.nn import fold_batchnorm, is_batchnorm  # noqa: E402

SHAPE = (1, 28, 28)


def deeplizard():
    return models.build("deeplizard-cnn", bn="tutorial", input_shape=SHAPE, num_classes=10, seed=0)


def resnet():
    torch.manual_seed(0)
    return resnet20(SHAPE, 10)


NETWORKS = {"deeplizard-cnn bn=tutorial": deeplizard, "resnet20": resnet}
BATCHES = {1: 50, 256: 3}  # batch size: calls per timing


def calibrated(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, with running statistics from a few training-mode batches (not the 0/1 defaults)."""
    g = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn((64, *SHAPE), generator=g))
        for m in model.modules():
            if is_batchnorm(m):
                m.weight.uniform_(0.5, 1.5, generator=g)
    return model.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="for both runtimes")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    # onnxruntime's threads spin after each run by default, taking the cores from the PyTorch call
    # that follows in the interleaved timing; without spinning each contender has the cores alone
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in NETWORKS.items():
            model = calibrated(make())
            folded = fold_batchnorm(model)[0]
            path = Path(tmp) / "model.onnx"
            report = to_onnx(model, path, input_shape=SHAPE, standardizer=Standardizer("scale", (0.0,), (255.0,)),
                             bake_standardization=False)
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for batch, reps in BATCHES.items():
                x = torch.rand((batch, *SHAPE), generator=torch.Generator().manual_seed(1))
                feed = {report.input_name: x.numpy()}

                def torch_call(net):
                    def run():
                        with torch.no_grad():
                            net(x)
                    return run

                t = alternate({"onnxruntime": lambda: session.run(None, feed), "torch_folded": torch_call(folded),
                               "torch_unfolded": torch_call(model)}, rounds=args.rounds, reps=reps)
                out.append({"network": name, "batch": batch, "onnxruntime_ms": t["onnxruntime"] * 1e3,
                            "torch_folded_ms": t["torch_folded"] * 1e3, "torch_unfolded_ms": t["torch_unfolded"] * 1e3,
                            "ratio": t["onnxruntime"] / t["torch_folded"], "batchnorm_nodes": report.batchnorm_nodes})
    machine = {"threads": args.threads, "torch": torch.__version__, "onnxruntime": ort.__version__,
               "python": platform.python_version(), "cpus": os.cpu_count()}
    if args.json:
        print(json.dumps({"machine": machine, "results": out}, indent=2))
        return
    print(f"{args.threads} thread(s), torch {torch.__version__}, onnxruntime {ort.__version__}; "
          "ratio = onnxruntime / torch folded (< 1: onnxruntime faster)")
    for r in out:
        print(f"{r['network']:<27} batch {r['batch']:>3}: torch folded {r['torch_folded_ms']:8.3f} ms, "
              f"onnxruntime {r['onnxruntime_ms']:8.3f} ms, ratio {r['ratio']:.2f}   "
              f"(torch unfolded {r['torch_unfolded_ms']:.3f} ms)")


if __name__ == "__main__":
    main()
