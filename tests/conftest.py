import numpy as np
import pytest

from bnlab.data.idx import write_idx

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


def make_idx_dataset(directory, n_train=60, n_test=20, size=28, classes=10, gz=True, seed=0):
    """Write the four MNIST-style IDX files with random content; returns the directory."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, size, size), dtype=np.uint8))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", rng.integers(0, classes, n, dtype=np.uint8))
    return directory


@pytest.fixture
def idx_dir(tmp_path):
    return make_idx_dataset(tmp_path / "mnist")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path_factory):
    # Keep tests away from the user's cache and data dir settings.
    monkeypatch.delenv("BNLAB_DATA_DIR", raising=False)
    monkeypatch.setenv("BNLAB_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


def randomize_bn(model, seed=1):
    """Random running statistics and affine parameters in every BN layer (those that track
    statistics), then eval mode: BN layers that are not the identity, for folding tests."""
    import torch

    from bnlab.nn import is_batchnorm

    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if is_batchnorm(m) and m.running_mean is not None:
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.3)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()
