"""Event-camera datasets through ``tonic``: ``--data tonic:NMNIST``, ``tonic:DVSGesture``, ``tonic:CIFAR10DVS``.

The files must already be in ``--data-dir`` (tonic's layout: what ``tonic.datasets.<Name>(save_to=dir)``
downloads); nothing is downloaded here. Each event stream — of any length — is binned into T frames with
tonic's transforms (``Downsample`` to the size below, then ``ToFrame(n_time_bins=T)``): a frame holds the
event count per polarity and pixel (tonic's bins span [first event's time, last event's time), so the
events at the very last timestamp are not counted). Frames are made batch by batch as the training loop asks for them
(:class:`EventFrames`), not held in memory for the whole dataset.

| name | sensor | frames | classes | split |
|---|---|---|---|---|
| NMNIST | 34×34×2 | 34×34 | 10 | tonic's train / test |
| DVSGesture | 128×128×2 | 48×48 | 11 | tonic's train / test |
| CIFAR10DVS | 128×128×2 | 48×48 | 10 | none in the data: a fixed stratified 90 / 10 split |
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import torch

from .data import CLIError, Dataset, stratified_split

__all__ = ["TONIC_DATASETS", "EventFrames", "bin_events", "load_tonic"]


@dataclass(frozen=True)
class _Source:
    classes: int
    size: int                 # frames are size × size
    has_split: bool           # tonic's train=True/False; otherwise a split of our own


TONIC_DATASETS = {"NMNIST": _Source(10, 34, True), "DVSGesture": _Source(11, 48, True),
                  "CIFAR10DVS": _Source(10, 48, False)}


def _tonic():
    try:
        import tonic
    except ImportError:
        raise CLIError("--data tonic:... needs tonic (pip install --no-deps tonic tqdm importRosbag expelliarmus; "
                       "its other dependencies numpy, scipy and h5py)") from None
    return tonic


def frame_transform(sensor_size: Tuple[int, int, int], size: int, T: int):
    """tonic's transform from an event stream on ``sensor_size`` (W, H, P) to T frames ``[T, P, size, size]``."""
    transforms = _tonic().transforms
    steps = []
    if sensor_size[0] != size or sensor_size[1] != size:
        steps.append(transforms.Downsample(sensor_size=sensor_size, target_size=(size, size)))
    steps.append(transforms.ToFrame(sensor_size=(size, size, sensor_size[2]), n_time_bins=T))
    return transforms.Compose(steps)


def bin_events(events: Any, sensor_size: Tuple[int, int, int], size: int, T: int) -> torch.Tensor:
    """One event stream (tonic's structured array: x, y, t, p) as T frames ``[T, P, size, size]`` (float32)."""
    return torch.as_tensor(frame_transform(sensor_size, size, T)(events), dtype=torch.float32)


class EventFrames:
    """A tonic dataset's samples as T frames each, computed when indexed: ``frames[i]``, ``frames[a:b]`` and
    ``frames[index_tensor]`` give ``[..., T, P, size, size]`` float32; ``shape`` is ``[N, T, P, size, size]``."""

    def __init__(self, dataset, indices: Sequence[int], sensor_size: Tuple[int, int, int], size: int, T: int):
        self.dataset, self.indices = dataset, list(indices)
        self.transform = frame_transform(sensor_size, size, T)
        self.shape = torch.Size([len(self.indices), T, sensor_size[2], size, size])

    def __len__(self) -> int:
        return len(self.indices)

    def _frames(self, i: int) -> torch.Tensor:
        events, _ = self.dataset[self.indices[i]]
        return torch.as_tensor(self.transform(events), dtype=torch.float32)

    def __getitem__(self, key):
        if isinstance(key, int):
            return self._frames(key)
        positions = range(len(self))[key] if isinstance(key, slice) else torch.as_tensor(key).flatten().tolist()
        return torch.stack([self._frames(i) for i in positions]) if len(positions) else torch.empty(0, *self.shape[1:])


def load_tonic(name: str, data_dir: Optional[str], T: int, datasets=None) -> Dataset:
    """``tonic:<name>`` from ``data_dir``, binned into ``T`` frames (``datasets``: where the classes are looked
    up, ``tonic.datasets`` by default)."""
    source = TONIC_DATASETS.get(name)
    if source is None:
        raise CLIError(f"unknown event dataset tonic:{name}; choose from "
                       f"{', '.join('tonic:' + n for n in TONIC_DATASETS)}")
    if data_dir is None:
        raise CLIError(f"--data tonic:{name} needs --data-dir, the folder tonic keeps the dataset in")
    base = getattr(datasets if datasets is not None else _tonic().datasets, name)

    def refuse(self):
        raise CLIError(f"tonic:{name} was not found in {data_dir}; fetch it once with "
                       f"tonic.datasets.{name}(save_to={data_dir!r}{', train=...' if source.has_split else ''})")
    cls = type(name, (base,), {"download": refuse})          # tonic downloads what is missing: not here
    if source.has_split:
        train, test = cls(save_to=data_dir, train=True), cls(save_to=data_dir, train=False)
        train_idx, test_idx = list(range(len(train))), list(range(len(test)))
        train_y, test_y = torch.as_tensor(train.targets, dtype=torch.long), torch.as_tensor(test.targets, dtype=torch.long)
    else:
        train = test = cls(save_to=data_dir)
        targets = torch.as_tensor(train.targets, dtype=torch.long)
        train_idx, test_idx = (i.tolist() for i in stratified_split(targets, 0.1))
        train_y, test_y = targets[train_idx], targets[test_idx]
    sensor = tuple(base.sensor_size)
    return Dataset(f"tonic:{name}", EventFrames(train, train_idx, sensor, source.size, T), train_y,
                   EventFrames(test, test_idx, sensor, source.size, T), test_y, num_classes=source.classes,
                   steps=T, frames=True)
