"""Event-camera data through tonic: streams of any length binned into T frames, frames made per batch, the
datasets found in --data-dir and never downloaded, and a training run on generated event streams in tonic's
own structured-array format (no files needed)."""
import json

import numpy as np
import pytest
import torch

tonic = pytest.importorskip("tonic")

from ratebp_compile.cli import main  # noqa: E402
from ratebp_compile.cli.data import CLIError, encode, load_dataset  # noqa: E402
from ratebp_compile.cli.events import EventFrames, bin_events, load_tonic  # noqa: E402

DTYPE = np.dtype([("x", int), ("y", int), ("t", int), ("p", int)])          # tonic's NMNIST events


def _stream(n, size=34, duration=300_000, seed=0, early=None):
    """``n`` events on a ``size``×``size``×2 sensor over ``duration`` µs (all in the first tenth with ``early``)."""
    rng = np.random.default_rng(seed)
    events = np.zeros(n, dtype=DTYPE)
    events["x"], events["y"] = rng.integers(0, size, n), rng.integers(0, size, n)
    events["p"] = rng.integers(0, 2, n)
    events["t"] = np.sort(rng.integers(0, duration // 10 if early else duration, n))
    events["t"][-1] = duration                        # every stream spans the same time
    return events


@pytest.mark.parametrize("n", [40, 3000])
def test_streams_of_any_length_become_T_frames_of_counts(n):
    frames = bin_events(_stream(n), (34, 34, 2), 34, T=6)
    assert frames.shape == (6, 2, 34, 34) and frames.dtype == torch.float32
    # every event counted once, but the last: tonic's bins are half-open, [first time, last time)
    assert int(frames.sum()) == n - 1
    early = bin_events(_stream(n, early=True), (34, 34, 2), 34, T=6)
    assert int(early[0].sum()) == n - 1 and int(early[1:].sum()) == 0      # binned by time


def test_a_large_sensor_is_downsampled():
    frames = bin_events(_stream(500, size=128), (128, 128, 2), 48, T=4)
    assert frames.shape == (4, 2, 48, 48) and int(frames.sum()) == 499


class FakeNMNIST:
    """Generated streams in tonic's format, with tonic's dataset interface (``targets``, ``(events, target)``)."""

    sensor_size = (34, 34, 2)
    sizes = {True: 40, False: 12}

    def __init__(self, save_to, train=True):
        self.train = train
        self.targets = [i % 10 for i in range(self.sizes[train])]

    def __getitem__(self, i):
        target = self.targets[i]
        events = _stream(50 + 30 * target, seed=i + (0 if self.train else 1000))    # more events for larger labels
        return events, target

    def __len__(self):
        return len(self.targets)


class FakeCIFAR10DVS(FakeNMNIST):
    """A dataset tonic gives without a train/test split (and on a 128×128 sensor)."""

    sensor_size = (128, 128, 2)

    def __init__(self, save_to):
        self.train = True
        self.targets = [i % 10 for i in range(100)]

    def __getitem__(self, i):
        return _stream(60, size=128, seed=i), self.targets[i]


class _Datasets:
    NMNIST = FakeNMNIST
    CIFAR10DVS = FakeCIFAR10DVS


def test_frames_are_made_per_batch():
    frames = EventFrames(FakeNMNIST("x"), range(40), (34, 34, 2), 34, T=5)
    assert frames.shape == (40, 5, 2, 34, 34) and len(frames) == 40
    batch = frames[torch.tensor([3, 7])]
    assert batch.shape == (2, 5, 2, 34, 34) and int(batch[0].sum()) == 50 + 30 * 3 - 1
    assert frames[2:5].shape == (3, 5, 2, 34, 34) and frames[0].shape == (5, 2, 34, 34)
    data = load_tonic("NMNIST", "unused", T=5, datasets=_Datasets)
    assert data.name == "tonic:NMNIST" and data.frames and data.steps == 5 and data.step_shape(5) == (2, 34, 34)
    assert len(data.train_y) == 40 and len(data.test_y) == 12 and data.num_classes == 10
    assert encode(data.train_x[torch.tensor([0, 1, 2])], 5, "direct", steps=5).shape == (5, 3, 2, 34, 34)


def test_a_dataset_without_a_split_gets_a_fixed_stratified_one():
    data = load_tonic("CIFAR10DVS", "unused", T=2, datasets=_Datasets)
    assert data.train_y.bincount().tolist() == [9] * 10 and data.test_y.bincount().tolist() == [1] * 10
    assert not set(data.train_x.indices) & set(data.test_x.indices)
    assert data.step_shape(2) == (2, 48, 48) and data.test_x[0:2].shape == (2, 2, 2, 48, 48)
    again = load_tonic("CIFAR10DVS", "unused", T=2, datasets=_Datasets)
    assert again.test_x.indices == data.test_x.indices


def test_missing_files_are_never_downloaded(tmp_path):
    with pytest.raises(CLIError, match=r"tonic:NMNIST was not found in .*; fetch it once with "
                                       r"tonic.datasets.NMNIST\(save_to="):
        load_dataset("tonic:NMNIST", str(tmp_path), 4)
    assert not any(tmp_path.rglob("*.zip")) and not any(tmp_path.rglob("*.bin"))
    with pytest.raises(CLIError, match="needs --data-dir"):
        load_dataset("tonic:DVSGesture", None, 4)
    with pytest.raises(CLIError, match="unknown event dataset tonic:NCARS"):
        load_tonic("NCARS", str(tmp_path), 4)


def test_train_on_generated_event_streams(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(tonic.datasets, "NMNIST", FakeNMNIST)
    out = tmp_path / "events.json"
    code = main(["train", "--data", "tonic:NMNIST", "--data-dir", str(tmp_path), "--model", "convnet", "--width", "4",
                 "--T", "3", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    record = json.loads(out.read_text())
    assert record["config"]["data"] == "tonic:NMNIST" and len(record["runs"][0]["epochs"]) == 1
