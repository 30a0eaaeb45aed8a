"""``ratebp train --nproc 2``: two gloo processes (torchrun --standalone, loopback) train one model on halves of
each batch; with --sync-bn that is one process with the whole batch, to float rounding. One record and one
checkpoint are written (rank 0), and the checkpoint resumes into one process with the whole batch."""
import json
import tempfile

import pytest
import torch

from ratebp_compile.cli.train import _without_nproc

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")     # torchrun under capture

ARGS = ["--data", "digits", "--width", "4", "--T", "2", "--epochs", "1", "--device", "cpu", "--threads", "1",
        "--schedule", "none"]


def test_two_processes_equal_one_with_the_whole_batch(ratebp_train, tmp_path):
    two, one = tmp_path / "two.json", tmp_path / "one.json"
    ckpt = tmp_path / "two.pt"
    code, stdout, err = ratebp_train(*ARGS, "--nproc", "2", "--batch-size", "32", "--sync-bn", "--out", str(two),
                                     "--save", str(ckpt))
    assert code == 0, err
    # one record (with its plot) and one checkpoint, written by rank 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.json", "two.png", "two.pt"]
    code, _, err = ratebp_train(*ARGS, "--batch-size", "64", "--out", str(one))
    assert code == 0, err
    a, b = (json.loads(p.read_text()) for p in (two, one))
    assert a["config"]["processes"] == 2 and a["config"]["sync_bn"] and b["config"]["processes"] == 1
    (ea,), (eb,) = a["runs"][0]["epochs"], b["runs"][0]["epochs"]
    assert ea["loss"] == pytest.approx(eb["loss"], rel=1e-5)
    assert ea["train_acc"] == pytest.approx(eb["train_acc"], abs=1e-9)
    assert abs(ea["test_acc"] - eb["test_acc"]) <= 100 / 359 * 2 + 1e-9      # at most two test images differ
    saved = torch.load(ckpt, weights_only=False)
    assert saved["epoch"] == 1 and saved["config"]["global_batch"] == 64
    assert not any(k.startswith("module.") for k in saved["model"])           # the model's own keys, not DDP's

    resumed = tmp_path / "resumed.json"
    code, stdout, err = ratebp_train("--resume", str(ckpt), "--epochs", "2", "--device", "cpu", "--out", str(resumed))
    assert code == 0, err
    record = json.loads(resumed.read_text())
    assert record["config"]["batch_size"] == 64 and record["config"]["processes"] == 1
    assert [e["epoch"] for e in record["runs"][0]["epochs"]] == [1, 2]


def test_a_failing_process_fails_the_run(ratebp_train, tmp_path, monkeypatch):
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    code, _, _ = ratebp_train(*ARGS, "--nproc", "2", "--resume", str(tmp_path / "missing.pt"),
                              "--out", str(tmp_path / "x.json"))
    assert code != 0 and not (tmp_path / "x.json").exists()
    assert list(temp.iterdir()) == []              # torchrun's log directory is gone


def test_the_launcher_drops_its_own_option():
    assert _without_nproc(["--nproc", "2", "--T", "4", "--nproc=3", "--sync-bn"]) == ["--T", "4", "--sync-bn"]
