"""Peak resident memory of `bnlab train` on Fashion-MNIST (goal <= 600 MB).

Runs the CLI in a child process and reads the child's peak RSS from getrusage. For scale it also
reports a child that only imports torch, and the size the two splits would take as float32.

    python benchmarks/memory.py [--epochs 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path


def peak_rss_mb(cmd: list[str]) -> float:
    """Peak RSS (MB) of a command run to completion in a fresh process."""
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if r.returncode == 0 else -1)")
    out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, check=True).stdout
    kb = int(out.strip())
    if kb < 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return kb / 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    bnlab = str(Path(sys.executable).parent / "bnlab")
    train_cmd = [bnlab, "train", "--dataset", "fashion-mnist", "--model", "deeplizard-cnn", "--bn", "tutorial",
                 "--epochs", str(args.epochs), "--quiet"]
    res = {
        "bnlab_train_mb": peak_rss_mb(train_cmd),
        "import_torch_only_mb": peak_rss_mb([sys.executable, "-c", "import torch"]),
        "float32_splits_mb": (60000 + 10000) * 784 * 4 / 2**20,
        "uint8_splits_mb": (60000 + 10000) * 784 / 2**20,
        "command": " ".join(["bnlab", *train_cmd[1:]]),
    }
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"peak RSS of `{res['command']}`: {res['bnlab_train_mb']:.0f} MB (goal <= 600 MB)")
    print(f"  for scale: a process that only imports torch peaks at {res['import_torch_only_mb']:.0f} MB;")
    print(f"  both splits as uint8 take {res['uint8_splits_mb']:.0f} MB, as float32 {res['float32_splits_mb']:.0f} MB")


if __name__ == "__main__":
    main()
