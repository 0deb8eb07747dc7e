"""bnlab.nn.SyncBatchNorm in real processes over gloo on 127.0.0.1, against torch's BN on the
concatenated batch (the oracle: what one process with every example computes)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import bnlab.nn as bnn
from bnlab.nn import SyncBatchNorm, convert, merge_moments


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SIZES = (5, 11)  # unequal batches per rank


def data(c=3):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, c, 4, 4, generator=g, dtype=torch.float64) for n in SIZES]
    xs = [x * torch.tensor([1.0, 1e-2, 3.0], dtype=torch.float64).view(1, c, 1, 1)
          + torch.tensor([1e4, -2.0, 0.5], dtype=torch.float64).view(1, c, 1, 1) for x in xs]  # a large mean, a tiny std
    ws = [torch.randn(n, c, 4, 4, generator=g, dtype=torch.float64) for n in SIZES]
    return xs, ws


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        xs, ws = data()
        bn = SyncBatchNorm(3).double()
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([1.5, 0.5, -1.0]))
            bn.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
        x = xs[rank].clone().requires_grad_(True)
        y = bn(x)
        (y * ws[rank]).sum().backward()
        bn.eval()
        y_eval = bn(xs[rank])
        torch.save({"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
                    "rm": bn.running_mean, "rv": bn.running_var, "n": int(bn.num_batches_tracked), "y_eval": y_eval},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sync_bn_over_two_processes_equals_bn_on_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    xs, ws = data()
    ref = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([1.5, 0.5, -1.0]))
        ref.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    x = torch.cat(xs).requires_grad_(True)
    y = ref(x)
    (y * torch.cat(ws)).sum().backward()
    for r, (lo, hi) in enumerate(((0, SIZES[0]), (SIZES[0], sum(SIZES)))):
        torch.testing.assert_close(got[r]["y"], y[lo:hi].detach(), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got[r]["dx"], x.grad[lo:hi], rtol=1e-7, atol=1e-9)
        # every rank holds the same running statistics: those of the whole batch
        torch.testing.assert_close(got[r]["rm"], ref.running_mean)
        torch.testing.assert_close(got[r]["rv"], ref.running_var)
        assert got[r]["n"] == 1
    # the parameter gradients are each rank's own sums: they add up to the whole batch's
    torch.testing.assert_close(got[0]["dw"] + got[1]["dw"], ref.weight.grad)
    torch.testing.assert_close(got[0]["db"] + got[1]["db"], ref.bias.grad)
    ref.eval()
    torch.testing.assert_close(got[1]["y_eval"], ref(xs[1]))  # eval: plain BN with the running statistics


def test_merge_moments_is_exact_and_keeps_a_small_variance_under_a_large_mean():
    g = torch.Generator().manual_seed(1)
    parts = [torch.randn(n, 2, generator=g, dtype=torch.float64) * 1e-2 + 1e4 for n in (3, 0, 17, 8)]
    counts = torch.tensor([float(len(p)) for p in parts])
    means = torch.stack([p.mean(0) if len(p) else torch.zeros(2, dtype=torch.float64) for p in parts])
    m2s = torch.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else torch.zeros(2, dtype=torch.float64) for p in parts])
    n, mean, m2 = merge_moments(counts.double(), means, m2s)
    whole = torch.cat(parts)
    assert n == 28
    torch.testing.assert_close(mean, whole.mean(0))
    torch.testing.assert_close(m2 / n, whole.var(0, unbiased=False), rtol=1e-9, atol=0)
    # the naive sum of squares, E[x^2] - E[x]^2, even in float64 keeps only a few digits of this
    # variance (1e-4 under a mean of 1e4), and in float32 none
    naive = (whole ** 2).mean(0) - whole.mean(0) ** 2
    assert not torch.allclose(naive, whole.var(0, unbiased=False), rtol=1e-6)
    w32 = whole.float()
    naive32 = (w32 ** 2).mean(0) - w32.mean(0) ** 2
    assert not torch.allclose(naive32.double(), whole.var(0, unbiased=False), rtol=0.5)


def test_without_a_process_group_sync_bn_is_plain_bn_and_convert_keeps_state():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 6),
                        bnn.BatchNorm1d(6), bnn.GhostBatchNorm1d(6, virtual_batch_size=4))
    x = torch.randn(8, 2, 4, 4)
    net(x)  # running statistics to keep
    ref = [m.state_dict() for m in (net[1], net[5])]
    expected = net(x)
    convert(net, to="sync")
    assert isinstance(net[1], SyncBatchNorm) and isinstance(net[5], SyncBatchNorm)
    assert isinstance(net[6], bnn.GhostBatchNorm1d)  # a variant keeps its own statistics
    for m, sd in zip((net[1], net[5]), ref):
        for k, v in sd.items():
            assert torch.equal(m.state_dict()[k], v)
    torch.testing.assert_close(net(x), expected)  # world size 1: plain BN
    net.eval()
    folded, _ = bnn.fold_batchnorm(net)
    torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)
