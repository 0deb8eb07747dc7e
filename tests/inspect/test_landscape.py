"""bnlab.inspect.landscape: Santurkar et al.'s loss landscape and gradient shift, on any model,
checked against a plain autograd computation on a copy of the model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlab.nn as bnn
from bnlab.errors import ConfigError
from bnlab.inspect import LandscapeProbe, gradient_shift, loss_landscape


class Net(nn.Module):
    """Registration order differs from the forward order (head first), and a BN in between."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(6 * 4 * 4, 5)
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.bn = bnn.BatchNorm2d(6)
        self.mid = nn.Conv2d(6, 6, 3, stride=2, padding=1)

    def forward(self, x):
        return self.head(torch.relu(self.mid(torch.relu(self.bn(self.conv(x))))).flatten(1))


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 2, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)


def grads_at(model, x, y, names):
    """The oracle: a fresh copy of the model at the given weights, its loss and gradients."""
    m = copy.deepcopy(model)
    loss = F.cross_entropy(m(x), y)
    params = dict(m.named_parameters())
    return float(loss.detach()), dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names])))


def moved(model, delta):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n in delta:
                p -= delta[n]
    return m


def test_loss_landscape_matches_autograd_and_leaves_the_model_alone():
    torch.manual_seed(0)
    net = Net().train()
    x, y = batch()
    before = copy.deepcopy(net.state_dict())
    names = [n for n, _ in net.named_parameters()]
    out = loss_landscape(net, x, y, [0.05, 0.2, 0.8])
    loss0, g = grads_at(net, x, y, names)
    assert out["loss"] == pytest.approx(loss0, rel=1e-6)
    gnorm = torch.cat([t.flatten() for t in g.values()]).norm().item()
    assert out["grad_norm"] == pytest.approx(gnorm, rel=1e-5)
    for eta, loss, change in zip(out["steps"], out["losses"], out["grad_changes"]):
        l2, g2 = grads_at(moved(net, {n: eta * g[n] for n in names}), x, y, names)
        assert loss == pytest.approx(l2, rel=1e-5)
        assert change == pytest.approx(torch.cat([(g2[n] - g[n]).flatten() for n in names]).norm().item(), rel=1e-4)
    every = [out["loss"], *out["losses"]]
    assert out["loss_range"] == pytest.approx(max(every) - min(every))
    assert out["beta"] == pytest.approx(max(c / (e * gnorm) for c, e in zip(out["grad_changes"], out["steps"])),
                                        rel=1e-4)
    for k, v in net.state_dict().items():  # weights and running statistics untouched (the copies ran)
        assert torch.equal(v, before[k]), k
    assert net.training


def test_gradient_shift_moves_only_the_layers_before_each_one_in_forward_order():
    torch.manual_seed(1)
    net = Net().train()
    x, y = batch(1)
    names = [n for n, _ in net.named_parameters()]
    lr = 0.3
    res = gradient_shift(net, x, y, lr)
    # conv is first in the forward pass (head is registered first): mid and head are measured
    assert [r["layer"] for r in res] == ["mid:Conv2d", "head:Linear"]
    _, g = grads_at(net, x, y, names)
    earlier = {"mid": ["conv.weight", "conv.bias", "bn.weight", "bn.bias"],
               "head": ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "mid.weight", "mid.bias"]}
    for r in res:
        layer = r["layer"].split(":")[0]
        _, g2 = grads_at(moved(net, {n: lr * g[n] for n in earlier[layer]}), x, y, names)
        a = torch.cat([g[f"{layer}.weight"].flatten(), g[f"{layer}.bias"].flatten()])
        b = torch.cat([g2[f"{layer}.weight"].flatten(), g2[f"{layer}.bias"].flatten()])
        assert r["l2"] == pytest.approx((a - b).norm().item(), rel=1e-4)
        assert r["cos"] == pytest.approx(torch.nn.functional.cosine_similarity(a, b, dim=0).item(), rel=1e-5)
        assert r["rel"] == pytest.approx(r["l2"] / a.norm().item(), rel=1e-5)
        assert r["l2"] > 0
    named = gradient_shift(net, x, y, lr, layers=["bn"])
    assert [r["layer"] for r in named] == ["bn:BatchNorm2d"]
    with pytest.raises(ConfigError, match="has no such module: 'nope'"):
        gradient_shift(net, x, y, lr, layers=["nope"])
    with pytest.raises(ConfigError, match="positive lr"):
        gradient_shift(net, x, y, 0.0)
    with pytest.raises(ConfigError, match="positive step sizes"):
        loss_landscape(net, x, y, [])


def test_random_layers_replay_the_same_draws_within_a_probe():
    """Dropout and noisy BN draw anew at every call; the probe replays one draw, so a step of
    (almost) zero changes (almost) nothing."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(128, 32), bnn.NoisyBatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5),
                        nn.Linear(32, 5)).train()
    x, y = batch(2)
    out = loss_landscape(net, x, y, [1e-9])
    assert out["grad_changes"][0] < 1e-6 * out["grad_norm"]
    assert gradient_shift(net, x, y, 1e-9)[0]["cos"] == pytest.approx(1.0, abs=1e-6)


def test_the_probe_records_during_training_without_changing_it():
    from bnlab.data import Dataset
    from bnlab.train import fit

    g = torch.Generator().manual_seed(0)
    train = Dataset("toy", "train", torch.randn(96, 2, 8, 8, generator=g), torch.randint(0, 5, (96,), generator=g),
                    [str(i) for i in range(5)])

    def run(callbacks):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(2, 4, 3), bnn.NoisyBatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(),
                            nn.Linear(4 * 36, 5))
        h = fit(net, train, optimizer="sgd", lr=0.1, batch_size=16, epochs=2, callbacks=callbacks, progress=False)
        return net, h

    probe = LandscapeProbe(every=4)
    net_a, h_a = run([probe])
    net_b, h_b = run([])
    assert [e["train_loss"] for e in h_a.epochs] == [e["train_loss"] for e in h_b.epochs]
    for (k, a), b in zip(net_a.state_dict().items(), net_b.state_dict().values()):
        assert torch.equal(a, b), k
    land = [r for r in probe.records if r["layer"] == "landscape"]
    assert [r["step"] for r in land] == [1, 4, 8, 12]  # 12 steps: step 1 and every 4th
    assert {r["layer"] for r in probe.records} == {"landscape", "ics:5:Linear"}
    s = probe.summary()
    assert set(s) == {"loss_range", "grad_change", "beta", "ics_l2", "ics_rel", "ics_cos"}
    assert s["beta"] == pytest.approx(sum(r["beta"] for r in land) / 4)
    with pytest.raises(ConfigError, match="whole K >= 1"):
        LandscapeProbe(every=0)
