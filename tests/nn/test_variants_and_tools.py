import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab.errors import ConfigError
from conftest import randomize_bn as _randomize_bn


def _train_steps(mod, ref, shape, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(shape, generator=g) * 2 + 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        dy = torch.randn(shape, generator=g)
        ya, yb = mod(xa), ref(xb)
        torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mod.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mod.bias.grad, ref.bias.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mod.running_mean, ref.running_mean)
    torch.testing.assert_close(mod.running_var, ref.running_var)
    mod.eval(), ref.eval()
    x = torch.randn(shape, generator=g)
    torch.testing.assert_close(mod(x), ref(x))


@pytest.mark.parametrize("cls,ref_cls,shape", [(bnn.BatchRenorm1d, nn.BatchNorm1d, (8, 5)),
                                               (bnn.BatchRenorm2d, nn.BatchNorm2d, (6, 3, 4, 4))])
def test_renorm_with_rmax1_dmax0_is_batchnorm(cls, ref_cls, shape):
    _train_steps(cls(shape[1], rmax=1.0, dmax=0.0), ref_cls(shape[1]), shape)


@pytest.mark.parametrize("cls,ref_cls,shape", [(bnn.GhostBatchNorm1d, nn.BatchNorm1d, (8, 5)),
                                               (bnn.GhostBatchNorm2d, nn.BatchNorm2d, (6, 3, 4, 4))])
def test_ghost_with_full_virtual_batch_is_batchnorm(cls, ref_cls, shape):
    _train_steps(cls(shape[1], virtual_batch_size=shape[0]), ref_cls(shape[1]), shape)


def test_ghost_uses_virtual_batch_statistics():
    torch.manual_seed(0)
    x = torch.randn(12, 4) * 3
    gbn = bnn.GhostBatchNorm1d(4, virtual_batch_size=4, affine=False)
    y = gbn(x)
    for k in range(3):
        chunk = x[4 * k:4 * k + 4]
        expect = (chunk - chunk.mean(0)) / torch.sqrt(chunk.var(0, unbiased=False) + 1e-5)
        torch.testing.assert_close(y[4 * k:4 * k + 4], expect, atol=1e-5, rtol=1e-5)
    means = torch.stack([x[i:i + 4].mean(0) for i in (0, 4, 8)]).mean(0)
    torch.testing.assert_close(gbn.running_mean, 0.1 * means)
    # a last virtual batch of a single example is merged, never a ValueError
    assert gbn(torch.randn(9, 4)).shape == (9, 4)


def test_renorm_corrects_towards_running_stats():
    torch.manual_seed(0)
    m = bnn.BatchRenorm1d(3, rmax=3.0, dmax=5.0, affine=False)
    with torch.no_grad():
        m.running_mean.fill_(1.0)
        m.running_var.fill_(4.0)
    x = torch.randn(64, 3) * 0.5 + 2.0
    y = m(x)
    sigma_b = torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    r = (sigma_b / 2.0000025).clamp(1 / 3, 3)
    d = ((x.mean(0) - 1.0) / 2.0000025).clamp(-5, 5)
    expect = (x - x.mean(0)) / sigma_b * r + d
    torch.testing.assert_close(y, expect, atol=1e-4, rtol=1e-4)
    # gradient does not flow through r and d: the sum of dx over the batch is zero as in BN
    x.requires_grad_()
    m2 = bnn.BatchRenorm1d(3, rmax=3.0, dmax=5.0)
    m2(x).pow(2).sum().backward()
    torch.testing.assert_close(x.grad.sum(0), torch.zeros(3), atol=1e-4, rtol=0)


def test_renorm_warmup_schedule():
    m = bnn.BatchRenorm1d(2, rmax=3.0, dmax=5.0, warmup_steps=(2, 6))
    limits = []
    for _ in range(8):
        limits.append(m.current_limits())
        m(torch.randn(4, 2))
    assert limits[0] == (1.0, 0.0) and limits[1] == (1.0, 0.0)
    assert limits[4] == (2.0, 2.5) and limits[6] == limits[7] == (3.0, 5.0)
    with pytest.raises(ConfigError, match="rmax >= 1"):
        bnn.BatchRenorm1d(2, rmax=0.5)
    with pytest.raises(ConfigError, match="virtual_batch_size >= 2"):
        bnn.GhostBatchNorm1d(2, virtual_batch_size=1)


# ------------------------------------------------------------------ folding

def deeplizard_bn():
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2, 2), bnn.BatchNorm2d(6),
        nn.Conv2d(6, 12, 5), nn.ReLU(), nn.MaxPool2d(2, 2), nn.Flatten(),
        nn.Linear(192, 120), nn.ReLU(), bnn.BatchNorm1d(120),
        nn.Linear(120, 60), nn.ReLU(), nn.Linear(60, 10))


SITES = {
    "conv->bn (preceding)": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), bnn.BatchNorm2d(4), nn.ReLU()), (3, 2, 6, 6), 1, 0),
    "linear->bn (preceding)": (lambda: nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh()), (4, 5), 1, 0),
    "bn->conv no padding (following)": (lambda: nn.Sequential(nn.ReLU(), bnn.BatchNorm2d(2), nn.Conv2d(2, 3, 3)), (3, 2, 6, 6), 1, 0),
    "bn->flatten->linear (following)": (lambda: nn.Sequential(nn.ReLU(), bnn.BatchNorm2d(2), nn.Flatten(), nn.Dropout(), nn.Linear(2 * 9, 4)), (3, 2, 3, 3), 1, 0),
    "bn->linear (following)": (lambda: nn.Sequential(nn.Tanh(), bnn.BatchNorm1d(5), nn.Linear(5, 3)), (4, 5), 1, 0),
    "relu both sides (left)": (lambda: nn.Sequential(nn.Conv2d(2, 2, 3), nn.ReLU(), bnn.BatchNorm2d(2), nn.ReLU()), (3, 2, 6, 6), 0, 1),
    "bn->padded conv (left)": (lambda: nn.Sequential(nn.MaxPool2d(2), bnn.BatchNorm2d(2), nn.Conv2d(2, 3, 3, padding=1)), (3, 2, 6, 6), 0, 1),
    "deeplizard BN net": (deeplizard_bn, (5, 1, 28, 28), 2, 0),
    "renorm and ghost": (lambda: nn.Sequential(nn.Linear(4, 6), bnn.BatchRenorm1d(6), nn.ReLU(), bnn.GhostBatchNorm1d(6, 4), nn.Linear(6, 2)), (5, 4), 2, 0),
    "nested sequential": (lambda: nn.Sequential(nn.Sequential(nn.Conv2d(1, 3, 3), bnn.BatchNorm2d(3)), nn.ReLU()), (2, 1, 5, 5), 1, 0),
}


@pytest.mark.parametrize("site", list(SITES))
def test_fold_is_exact_at_every_site(site):
    make, shape, n_folded, n_left = SITES[site]
    torch.manual_seed(0)
    model = _randomize_bn(make())
    x = torch.randn(shape)
    expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    folded, report = bnn.fold_batchnorm(model)
    assert len(report.folded) == n_folded and len(report.left) == n_left, str(report)
    remaining = sum(bnn.is_batchnorm(m) for m in folded.modules())
    assert remaining == n_left
    torch.testing.assert_close(folded(x), expected, atol=1e-5, rtol=1e-5)
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, state[k])


def test_fold_report_and_errors():
    model = _randomize_bn(deeplizard_bn())
    _, report = bnn.fold_batchnorm(model)
    assert report.folded == [{"bn": "3", "into": "4", "side": "following"}, {"bn": "10", "into": "11", "side": "following"}]
    _, report = bnn.fold_batchnorm(_randomize_bn(SITES["relu both sides (left)"][0]()))
    assert "preceded by ReLU and followed by ReLU" in report.left[0]["reason"] and "left" in str(report)
    nostats = nn.Sequential(nn.Linear(3, 3), bnn.BatchNorm1d(3, track_running_stats=False))
    assert "track_running_stats=False" in bnn.fold_batchnorm(nostats)[1].left[0]["reason"]
    with pytest.raises(ConfigError, match="nn.Sequential"):
        bnn.fold_batchnorm(nn.Linear(2, 2))


# ------------------------------------------------------------------ recalibration

def test_recalibration_equals_population_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), bnn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 5), nn.BatchNorm1d(5))
    model.train()
    data = torch.randn(100, 6) * 2 + 3
    model[0].bias.data += 5  # make running stats stale
    model.eval()
    before_modes = [m.training for m in model.modules()]
    nbt = int(model[1].num_batches_tracked)
    bnn.recalibrate_batchnorm(model, [(data[i:i + 30], None) for i in range(0, 100, 30)])  # 30,30,30,10
    assert [m.training for m in model.modules()] == before_modes
    assert int(model[1].num_batches_tracked) == nbt
    with torch.no_grad():
        h = model[0](data).double()
        torch.testing.assert_close(model[1].running_mean, h.mean(0).float())
        torch.testing.assert_close(model[1].running_var, h.var(0, unbiased=True).float())
        # the second BN sees the first in training mode, batch by batch, dropout off
        outs = []
        for i in range(0, 100, 30):
            z = model[0](data[i:i + 30])
            z = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5) * model[1].weight + model[1].bias
            outs.append(model[4](torch.relu(z)))
        h2 = torch.cat(outs).double()
        torch.testing.assert_close(model[5].running_mean, h2.mean(0).float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model[5].running_var, h2.var(0).float(), atol=1e-5, rtol=1e-5)


def test_recalibration_needs_batches():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with pytest.raises(ConfigError, match="no batches"):
        bnn.recalibrate_batchnorm(model, [])
    assert torch.equal(model[1].running_mean, torch.zeros(2))
