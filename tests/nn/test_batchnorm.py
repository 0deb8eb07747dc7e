"""bnlab BN against torch.nn.BatchNorm* as the oracle, on both backends."""

import itertools
import random

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab.nn import functional as F

BACKENDS = ["cpp", "eager"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    before = bnn.backend_name()
    assert bnn.set_backend(request.param).name == request.param
    yield request.param
    bnn.set_backend(before)


PAIRS = {1: (bnn.BatchNorm1d, nn.BatchNorm1d), 2: (bnn.BatchNorm2d, nn.BatchNorm2d), 3: (bnn.BatchNorm3d, nn.BatchNorm3d)}
SHAPES = {1: [(7, 5), (4, 3, 6), (3, 2)], 2: [(5, 4, 3, 3), (2, 1, 4, 5), (16, 6, 2, 2)], 3: [(3, 2, 2, 3, 2)]}


def _combos(n=40, seed=0):
    rng = random.Random(seed)
    grid = [(kind, shape, mom, eps, affine, track)
            for kind in (1, 2, 3) for shape in SHAPES[kind]
            for mom, eps, affine, track in itertools.product((0.1, 0.5, None), (1e-5, 1e-2), (True, False), (True, False))]
    return rng.sample(grid, n)


@pytest.mark.parametrize("kind,shape,momentum,eps,affine,track", _combos())
def test_matches_torch_over_training_then_eval(backend, kind, shape, momentum, eps, affine, track):
    ours_cls, torch_cls = PAIRS[kind]
    c = shape[1]
    torch.manual_seed(sum(shape) * 7 + kind)
    ours = ours_cls(c, eps=eps, momentum=momentum, affine=affine, track_running_stats=track)
    ref = torch_cls(c, eps=eps, momentum=momentum, affine=affine, track_running_stats=track)
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-1, 1)
    ours.load_state_dict(ref.state_dict())
    for step in range(4):
        if step == 3:
            ours.eval()
            ref.eval()
        x = (torch.randn(shape) * 3 + 1.5).requires_grad_()
        xr = x.detach().clone().requires_grad_()
        dy = torch.randn(shape)
        y, yr = ours(x), ref(xr)
        torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
        y.backward(dy)
        yr.backward(dy)
        torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-4)
        if affine:
            torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(ours.bias.grad, ref.bias.grad, atol=1e-4, rtol=1e-4)
        for key, val in ref.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], val, atol=1e-6, rtol=1e-5, msg=f"{key} at step {step}")


def test_two_values_per_channel_as_accurate_as_torch(backend):
    # With M = 2, dx is a difference of nearly equal terms; every float32 implementation loses
    # digits. Ours must be as close to the float64 truth as torch's float32 kernel is.
    torch.manual_seed(0)
    worst_ours = worst_torch = 0.0
    for _ in range(50):
        x, dy = torch.randn(2, 3) * 3 + 1.5, torch.randn(2, 3)
        grads = []
        for mod, dt in ((bnn.BatchNorm1d(3), torch.float32), (nn.BatchNorm1d(3), torch.float32), (nn.BatchNorm1d(3), torch.float64)):
            xx = x.to(dt).detach().clone().requires_grad_()
            mod.to(dt)(xx).backward(dy.to(dt))
            grads.append(xx.grad.double())
        worst_ours = max(worst_ours, (grads[0] - grads[2]).abs().max().item())
        worst_torch = max(worst_torch, (grads[1] - grads[2]).abs().max().item())
    assert worst_ours <= 2 * worst_torch + 1e-7


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (5, 2, 3, 3), (3, 2, 2, 2, 3)])
def test_gradcheck_float64(backend, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.rand(shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(shape[1], dtype=torch.float64), torch.rand(shape[1], dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.1, 1e-3), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-3), (x, w, b))
    assert torch.autograd.gradcheck(lambda x: F.batch_norm(x, None, None, None, None, True, 0.1, 1e-3), (x,))


def test_functional_matches_torch_functional(backend):
    x = torch.randn(9, 4, 3)
    rm1, rv1 = torch.randn(4), torch.rand(4) + 0.1
    rm2, rv2 = rm1.clone(), rv1.clone()
    y = F.batch_norm(x, rm1, rv1, training=True, momentum=0.3)
    yr = nn.functional.batch_norm(x, rm2, rv2, training=True, momentum=0.3)
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(rm1, rm2)
    torch.testing.assert_close(rv1, rv2)
    torch.testing.assert_close(F.batch_norm(x, rm1, rv1), nn.functional.batch_norm(x, rm2, rv2))


def test_non_contiguous_running_stats_are_updated(backend):
    # running statistics that are strided views: updated outside the kernel, same result as torch
    x = torch.randn(6, 3, 4)
    store1, store2 = torch.zeros(2, 6), torch.zeros(2, 6)
    store1[1], store2[1] = 1.0, 1.0
    w = torch.ones(3, requires_grad=True)
    F.batch_norm(x, store1[0, ::2], store1[1, ::2], w, None, training=True, momentum=0.2)
    nn.functional.batch_norm(x, store2[0, ::2], store2[1, ::2], w, None, training=True, momentum=0.2)
    torch.testing.assert_close(store1, store2)
    assert store1[0, ::2].abs().sum() > 0


def test_float64_and_no_grad_paths(backend):
    ref = nn.BatchNorm2d(3).double()
    ours = bnn.BatchNorm2d(3).double()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)


def test_one_value_per_channel_is_value_error(backend):
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bnn.BatchNorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bnn.BatchNorm2d(3)(torch.randn(1, 3, 1, 1))
    m = bnn.BatchNorm1d(3).eval()
    assert m(torch.randn(1, 3)).shape == (1, 3)  # eval mode is fine with one example


@pytest.mark.parametrize("cls,bad", [(bnn.BatchNorm1d, (2, 3, 4, 4)), (bnn.BatchNorm2d, (2, 3)), (bnn.BatchNorm3d, (2, 3, 4, 4))])
def test_input_dimension_checks(cls, bad):
    with pytest.raises(ValueError, match=r"expected .*D input \(got \dD input\)"):
        cls(3)(torch.randn(bad))


def test_state_dict_both_ways_and_legacy():
    ref = nn.BatchNorm2d(4)
    ref(torch.randn(8, 4, 3, 3))
    ours = bnn.BatchNorm2d(4)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    back = nn.BatchNorm2d(4)
    back.load_state_dict(ours.state_dict())
    assert int(back.num_batches_tracked) == 1
    from collections import OrderedDict

    legacy = OrderedDict((k, v) for k, v in ref.state_dict().items() if k != "num_batches_tracked")
    legacy._metadata = {"": {"version": 1}}
    fresh = bnn.BatchNorm2d(4)
    fresh.load_state_dict(legacy)
    assert int(fresh.num_batches_tracked) == 0
    assert repr(ours) == "BatchNorm2d(4, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)"


def test_bias_false_matches_torch(backend):
    import inspect

    if "bias" not in inspect.signature(nn.BatchNorm2d).parameters:
        pytest.skip("this torch has no BatchNorm bias flag")
    ref, ours = nn.BatchNorm2d(3, bias=False), bnn.BatchNorm2d(3, bias=False)
    assert ours.bias is None and list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    ours(x).sum().backward()
    ref(xr).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    assert type(bnn.convert(ref)) is bnn.BatchNorm2d


def test_convert_both_ways_keeps_state_and_mode():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 5),
                          nn.Sequential(nn.BatchNorm1d(5)))
    model(torch.randn(4, 1, 4, 4))
    model.eval()
    x = torch.randn(4, 1, 4, 4)
    before = model(x)
    bnn.convert(model, to="bnlab")
    assert type(model[1]) is bnn.BatchNorm2d and type(model[5][0]) is bnn.BatchNorm1d and not model[1].training
    torch.testing.assert_close(model(x), before)
    bnn.convert(model, to="torch")
    assert type(model[1]) is nn.BatchNorm2d and type(model[5][0]) is nn.BatchNorm1d
    torch.testing.assert_close(model(x), before)
    assert type(bnn.convert(nn.BatchNorm1d(2))) is bnn.BatchNorm1d


def test_non_contiguous_input(backend):
    x = torch.randn(4, 5, 6, 3).permute(0, 3, 1, 2)  # (4, 3, 5, 6), not contiguous
    torch.testing.assert_close(bnn.BatchNorm2d(3)(x), nn.BatchNorm2d(3)(x))


def test_backend_is_chosen_once_and_validated(monkeypatch):
    from bnlab.errors import ConfigError
    from bnlab.nn import _backend

    with pytest.raises(ConfigError, match="BN backend 'fast' does not exist"):
        bnn.set_backend("fast")
    monkeypatch.setattr(_backend, "_chosen", None)
    monkeypatch.setenv("BNLAB_BN_BACKEND", "eager")
    assert bnn.backend_name() == "eager"
    monkeypatch.setenv("BNLAB_BN_BACKEND", "cpp")  # read once: a later change does not switch mid-run
    assert bnn.backend_name() == "eager"
    monkeypatch.setattr(_backend, "_chosen", None)
    monkeypatch.setenv("BNLAB_BN_BACKEND", "fast")
    with pytest.raises(ConfigError, match="BN backend 'fast'"):
        bnn.BatchNorm1d(2)(torch.randn(3, 2))
    monkeypatch.setattr(_backend, "_chosen", None)
    monkeypatch.delenv("BNLAB_BN_BACKEND")
    assert bnn.backend_name() == "cpp"


def test_batch_statistics_are_outputs_of_the_step(backend):
    x = torch.randn(6, 3, 4, 4, requires_grad=True)
    y, mean, var = F.batch_norm_stats(x, None, None, torch.ones(3, requires_grad=True), torch.zeros(3), 0.1, 1e-5)
    torch.testing.assert_close(mean, x.detach().mean((0, 2, 3)))
    torch.testing.assert_close(var, x.detach().var((0, 2, 3), unbiased=False))
    assert not mean.requires_grad and not var.requires_grad and y.requires_grad
    y.sum().backward()
    assert x.grad is not None


def test_a_build_lock_left_by_a_killed_process_does_not_hang_the_next_one():
    # torch's builder waits, without end, for its lock file to go; a bnlab process SIGKILLed
    # while loading the kernels left one behind and every later process hung (found when a
    # test SIGKILLed a Ray worker in its start-up)
    import subprocess
    import sys

    from bnlab.nn._backend import build_dir, cpp_backend

    if cpp_backend() is None:
        pytest.skip("the compiled kernels do not build here")
    stale = build_dir() / "lock"
    stale.touch()
    try:
        out = subprocess.run([sys.executable, "-c", "import bnlab.nn as n; print(n.backend_name())"],
                             capture_output=True, text=True, timeout=60, env={**__import__("os").environ,
                                                                              "BNLAB_BN_BACKEND": "cpp"})
    finally:
        stale.unlink(missing_ok=True)
    assert out.returncode == 0 and out.stdout.split() == ["cpp"], out.stderr
