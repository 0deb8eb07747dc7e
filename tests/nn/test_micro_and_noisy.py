"""Batch Renorm over micro-batches (norm="ghost-renorm") and Santurkar et al.'s noisy BN (norm="noisy")."""

import copy

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab.errors import ConfigError
from bnlab.nn import fold_batchnorm, norm_layer


def _warm(m, shape, seed=0):
    """Running statistics away from (0, 1), so renorm's corrections are not trivial."""
    g = torch.Generator().manual_seed(seed)
    m.train()
    for _ in range(3):
        m(torch.randn(*shape, generator=g) * 2 + 1)
    return m


@pytest.mark.parametrize("cls,shape", [(bnn.BatchRenorm1d, (14, 5)), (bnn.BatchRenorm2d, (10, 3, 4, 4))])
def test_ghost_renorm_renormalizes_each_micro_batch_against_the_same_running_statistics(cls, shape):
    torch.manual_seed(0)
    ghost = _warm(cls(shape[1], virtual_batch_size=4), shape)
    with torch.no_grad():
        ghost.weight.uniform_(0.5, 1.5)
        ghost.bias.uniform_(-0.5, 0.5)
    whole = cls(shape[1])  # the oracle: plain renorm with the same state, applied to each micro-batch alone
    whole.load_state_dict(ghost.state_dict())
    x = torch.randn(*shape) * 3 - 1
    y = ghost(x)
    # 14 (or 10) examples: micro-batches of 4, 4, 4 and 2 (or 4, 4, 2)
    chunks = x.split(4)
    expected = torch.cat([copy.deepcopy(whole)(c) for c in chunks])
    torch.testing.assert_close(y, expected)
    # the running statistics move once, towards the micro-batches' mean statistics
    dims = [0] + list(range(2, x.dim()))
    means = torch.stack([c.mean(dims) for c in chunks]).mean(0)
    vars_ = torch.stack([c.var(dims, unbiased=True) for c in chunks]).mean(0)
    torch.testing.assert_close(ghost.running_mean, 0.9 * whole.running_mean + 0.1 * means)
    torch.testing.assert_close(ghost.running_var, 0.9 * whole.running_var + 0.1 * vars_)
    assert int(ghost.num_batches_tracked) == int(whole.num_batches_tracked) + 1


def test_ghost_renorm_with_no_correction_is_ghost_bn_and_gradcheck():
    x = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    a = bnn.BatchRenorm1d(3, rmax=1.0, dmax=0.0, virtual_batch_size=4).double()
    b = bnn.GhostBatchNorm1d(3, virtual_batch_size=4).double()
    torch.testing.assert_close(a(x), b(x))  # the last micro-batch of 1 is merged into the one before, in both
    torch.testing.assert_close(a.running_var, b.running_var)
    # r and d carry no gradient (Ioffe 2017): with running statistics that clamp both, they are
    # constants, and the analytic gradient must match the numerical one on every micro-batch
    m = bnn.BatchRenorm1d(3, rmax=3.0, dmax=5.0, virtual_batch_size=4).double()
    m.running_mean.fill_(100.0)
    m.running_var.fill_(1e-4)
    assert torch.autograd.gradcheck(lambda t: copy.deepcopy(m)(t), (x,))  # the same running statistics every call


def test_the_micro_batch_must_hold_two_examples():
    with pytest.raises(ConfigError, match="virtual_batch_size >= 2"):
        bnn.BatchRenorm2d(3, virtual_batch_size=1)
    assert "virtual_batch_size=4" in repr(norm_layer("ghost-renorm", 3, virtual_batch_size=4))
    for norm in ("ghost-renorm", "noisy"):
        with pytest.raises(ConfigError, match="exists only in bnlab"):
            norm_layer(norm, 3, impl="torch")


def test_noisy_bn_is_a_fresh_per_channel_shift_and_scale_of_bn_at_every_step():
    torch.manual_seed(0)
    noisy = bnn.NoisyBatchNorm2d(4, noise_shift=0.5, noise_scale=0.5)
    plain = bnn.BatchNorm2d(4)
    x = torch.randn(8, 4, 5, 5) * 2 + 3
    z = plain(x)  # what BN alone gives (and the same running statistics)
    outs = [noisy(x) for _ in range(2)]
    torch.testing.assert_close(noisy.running_mean, 0.19 * x.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    for y in outs:
        # each channel is s * z + m for one s in [0.5, 1.5] and one m in [-0.5, 0.5]: fit them back
        for c in range(4):
            zc, yc = z[:, c].flatten(), y[:, c].flatten()
            s = ((yc - yc.mean()) * (zc - zc.mean())).sum() / (zc - zc.mean()).pow(2).sum()
            m = yc.mean() - s * zc.mean()
            torch.testing.assert_close(yc, s * zc + m, rtol=1e-4, atol=1e-4)
            assert 0.5 <= s <= 1.5 and -0.5 <= m <= 0.5
    assert not torch.allclose(outs[0], outs[1])  # drawn anew at every step
    torch.manual_seed(7)
    a = noisy(x)
    torch.manual_seed(7)
    torch.testing.assert_close(noisy(x), a)  # from the global generator: seeded runs repeat
    # eval mode is plain BN with the running statistics; so folding treats it as BN
    noisy.eval()
    ref = bnn.BatchNorm2d(4).eval()
    ref.load_state_dict(noisy.state_dict())
    torch.testing.assert_close(noisy(x), ref(x))
    net = nn.Sequential(nn.Conv2d(4, 4, 3), bnn.NoisyBatchNorm2d(4)).eval()
    folded, report = fold_batchnorm(net)
    torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="noise_scale"):
        bnn.NoisyBatchNorm1d(3, noise_scale=1.0)
