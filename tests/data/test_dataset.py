import numpy as np
import pytest
import torch

from bnlab.data import Dataset, Standardizer, index_batches, load, load_splits
from bnlab.errors import ConfigError
from conftest import FMNIST_DIR, make_idx_dataset

fmnist = pytest.mark.skipif(not __import__("os").path.isdir(FMNIST_DIR), reason="dataset-fashion-mnist not installed")


@fmnist
def test_fashion_mnist_real_counts_and_stats():
    train, test = load_splits("fashion-mnist", standardize="zscore")
    assert len(train) == 60000 and len(test) == 10000
    assert train.x.shape == (60000, 1, 28, 28) and train.x.dtype == torch.uint8
    assert test.x.shape == (10000, 1, 28, 28)
    assert train.class_counts() == [6000] * 10 and test.class_counts() == [1000] * 10
    s = train.standardizer
    assert s.mode == "zscore"
    assert s.mean[0] / 255 == pytest.approx(0.2860, abs=5e-5)
    assert s.std[0] / 255 == pytest.approx(0.3530, abs=5e-5)
    assert test.standardizer == s  # test data standardized with train statistics
    xs = torch.cat([x for x, _ in train.batches(10000)])
    assert xs.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert xs.std().item() == pytest.approx(1.0, abs=1e-4)


def test_standardization_uses_train_split_only(tmp_path):
    d = make_idx_dataset(tmp_path / "m", n_train=50, n_test=20)
    train, test = load_splits("mnist", d, standardize="zscore")
    x = train.x.double()
    assert train.standardizer.mean[0] == pytest.approx(x.mean().item())
    assert train.standardizer.std[0] == pytest.approx(x.std(unbiased=False).item())
    assert test.standardizer.mean[0] != pytest.approx(test.x.double().mean().item())
    te_only = load("mnist", "test", d, standardize="zscore")
    assert te_only.standardizer == train.standardizer


def test_scale_maps_pixels_to_unit_interval(tmp_path):
    d = make_idx_dataset(tmp_path / "m", n_train=20, n_test=5)
    train = load("mnist", "train", d, standardize="scale")
    x, _ = next(train.batches(20))
    assert torch.allclose(x, train.x.float() / 255)
    none = load("mnist", "train", d)
    assert torch.equal(next(none.batches(20))[0], train.x.float())


def test_per_channel_stats_rgb():
    g = torch.Generator().manual_seed(0)
    x = torch.stack([torch.randint(0, 50, (30, 8, 8), generator=g), torch.randint(100, 256, (30, 8, 8), generator=g),
                     torch.full((30, 8, 8), 7)], 1).to(torch.uint8)
    ds = Dataset("t", "train", x, torch.zeros(30, dtype=torch.long), ["a"])
    s = Standardizer.fit(ds, "zscore")
    xd = x.double()
    for c in range(3):
        assert s.mean[c] == pytest.approx(xd[:, c].mean().item())
    assert s.std[2] == 1.0  # constant channel: no division by zero
    z = s(x)
    assert torch.allclose(z[:, :2].mean((0, 2, 3)), torch.zeros(2), atol=1e-5)


def test_float_features_standardize():
    train = load("iris", "train", standardize="zscore")
    assert train.x.dtype == torch.float32 and train.input_shape == (4,)
    z = torch.cat([x for x, _ in train.batches(32)])
    assert torch.allclose(z.mean(0), torch.zeros(4), atol=1e-5)
    sc = load("iris", "train", standardize="scale")
    assert sc.standardizer.std == tuple(train.x.abs().amax(0).tolist())


def test_digits_and_iris_fixed_split():
    a, b = load("digits", "train"), load("digits", "train")
    assert torch.equal(a.y, b.y) and len(a) + len(load("digits", "test")) == 1797
    assert a.x.dtype == torch.uint8 and a.input_shape == (1, 8, 8) and int(a.x.max()) == 255
    assert len(load("iris", "train")) + len(load("iris", "test")) == 150


@pytest.mark.parametrize("n,b,drop,expected", [(10, 3, False, [3, 3, 3, 1]), (10, 3, True, [3, 3, 3]),
                                               (9, 3, False, [3, 3, 3]), (2, 5, False, [2]), (2, 5, True, [])])
def test_batch_sizes(n, b, drop, expected):
    assert [len(range(n)[i]) if isinstance(i, slice) else len(i) for i in index_batches(n, b, drop_last=drop)] == expected
    assert [len(i) for i in index_batches(n, b, shuffle=True, generator=torch.Generator(), drop_last=drop)] == expected


def test_shuffle_is_seeded_permutation():
    order1 = torch.cat(list(index_batches(100, 7, shuffle=True, generator=torch.Generator().manual_seed(3))))
    order2 = torch.cat(list(index_batches(100, 7, shuffle=True, generator=torch.Generator().manual_seed(3))))
    order3 = torch.cat(list(index_batches(100, 7, shuffle=True, generator=torch.Generator().manual_seed(4))))
    assert torch.equal(order1, order2) and not torch.equal(order1, order3)
    assert sorted(order1.tolist()) == list(range(100))


def test_batches_cover_dataset_with_labels(tmp_path):
    d = make_idx_dataset(tmp_path / "m", n_train=23, n_test=5)
    train = load("mnist", "train", d)
    xs, ys = zip(*train.batches(5, shuffle=True, generator=torch.Generator().manual_seed(0)))
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (23, 1, 28, 28) and x.dtype == torch.float32
    # every (image, label) pair survives shuffling together
    orig = {(bytes(train.x[i].numpy()), int(train.y[i])) for i in range(23)}
    got = {(bytes(x[i].to(torch.uint8).numpy()), int(y[i])) for i in range(23)}
    assert orig == got


def test_bad_batch_size_and_mode():
    with pytest.raises(ConfigError, match="batch size"):
        list(index_batches(5, 0))
    with pytest.raises(ConfigError, match="unknown standardization 'minmax'"):
        load("iris", "train", standardize="minmax")
    with pytest.raises(ConfigError, match="unknown dataset 'nope'"):
        load("nope")
    with pytest.raises(ConfigError, match="unknown split"):
        load("iris", "valid")


def test_standardizer_dict_round_trip():
    s = Standardizer("zscore", (72.9, 1.0), (90.0, 2.0))
    assert Standardizer.from_dict(s.to_dict()) == s
    np.testing.assert_allclose(s(torch.tensor([[72.9, 3.0]])).numpy(), [[0.0, 1.0]], atol=1e-6)


def test_class_batches_are_non_iid_seeded_and_counted_ahead():
    from bnlab.data.dataset import class_index_batches

    labels = torch.tensor([0] * 37 + [1] * 20 + [2] * 33 + [3] * 10)
    batches = class_index_batches(labels, 8, 2, generator=torch.Generator().manual_seed(1))
    again = class_index_batches(labels, 8, 2, generator=torch.Generator().manual_seed(1))
    other = class_index_batches(labels, 8, 2, generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(a, b) for a, b in zip(batches, again)) and len(batches) == len(again)
    assert not all(torch.equal(a, b) for a, b in zip(batches, other))
    for b in batches:
        cls, counts = labels[b].unique(return_counts=True)
        assert len(cls) <= 2 and len(b) <= 8 and len(b) >= 2
        assert all(c <= 4 or len(cls) == 1 for c in counts)  # 4 of each class (8 when two pieces of one met)
    seen = torch.cat(batches)
    assert len(seen.unique()) == len(seen)  # no example twice in an epoch
    # every example but a class's last piece of one (37 = 9 * 4 + 1, 33 = 8 * 4 + 1)
    assert len(seen) == 100 - 2
    # the count depends only on the class counts, so the learning-rate schedule can know it
    assert len(other) == len(batches) == -(-(9 + 5 + 8 + 3) // 2)


def test_dataset_class_batches_and_their_errors():
    x = torch.zeros(40, 2)
    ds = Dataset("toy", "train", x, torch.arange(40) % 4, [str(i) for i in range(4)])
    got = list(ds.batches(10, classes=2, generator=torch.Generator().manual_seed(0)))
    assert len(got) == ds.num_batches(10, classes=2) == 4
    assert all(len(y.unique()) <= 2 for _, y in got)
    with pytest.raises(ConfigError, match="only 4 classes"):
        ds.num_batches(10, classes=5)
    with pytest.raises(ConfigError, match="divide the batch size"):
        list(ds.batches(10, classes=3))
