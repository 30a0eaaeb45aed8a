"""``ratebp train``: short runs on digits and synthetic data, checkpoints, one-line errors."""
import json
import re

import pytest
import torch

from ratebp_compile.cli import main

TINY = ["--width", "4", "--T", "2", "--epochs", "1", "--batch-size", "128", "--device", "cpu"]


@pytest.mark.parametrize("data", ["digits", "synthetic"])
def test_one_epoch(ratebp_train, tmp_path, data):
    out = tmp_path / "run.json"
    code, stdout, stderr = ratebp_train("--data", data, *TINY, "--out", str(out))
    assert code == 0, stderr
    assert "epoch 1/1" in stderr and "ms/step" in stderr and "MiB" in stderr     # the progress bar
    assert "ratebp" in stdout and "test acc" in stdout
    record = json.loads(out.read_text())
    (run,) = record["runs"]
    assert run["method"] == "ratebp" and len(run["epochs"]) == 1
    assert 0.0 <= run["test_acc"] <= 100.0 and run["peak_MiB"] > 0 and run["step_ms"] > 0
    assert record["config"]["data"] == data and record["environment"]["torch"] == torch.__version__


def test_a_sequence_dataset_trains_an_mlp(ratebp_train, tmp_path):
    out = tmp_path / "timing.json"
    code, stdout, err = ratebp_train("--data", "timing", "--model", "mlp", "--width", "2", "--T", "8", "--epochs", "1",
                                     "--device", "cpu", "--out", str(out))
    assert code == 0, err
    record = json.loads(out.read_text())
    assert record["config"]["data"] == "timing" and 0.0 <= record["runs"][0]["test_acc"] <= 100.0


def test_both_methods_compare(ratebp_train, tmp_path):
    out = tmp_path / "both.json"
    code, stdout, _ = ratebp_train("--data", "synthetic", *TINY, "--method", "both", "--encoding", "poisson",
                           "--optimizer", "sgd", "--lr", "0.05", "--schedule", "step", "--out", str(out))
    assert code == 0
    assert "rate-based vs BPTT: accuracy" in stdout and "peak memory" in stdout
    record = json.loads(out.read_text())
    assert [r["method"] for r in record["runs"]] == ["ratebp", "bptt"]
    assert {"accuracy_gap_points", "step_time_ratio", "peak_memory_ratio"} <= set(record["summary"])
    png = out.with_suffix(".png")                  # per-epoch curves of both methods beside the record
    assert f"plot:   {png}" in stdout and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_continues_the_run_exactly(ratebp_train, tmp_path):
    """Two epochs, or one epoch and a resumed second: the same second epoch (with a schedule that does not
    depend on the number of epochs)."""
    args = ["--data", "synthetic", "--width", "4", "--T", "3", "--batch-size", "128", "--device", "cpu",
            "--time-chunk", "2", "--schedule", "none"]
    ckpt = tmp_path / "ckpt.pt"
    assert ratebp_train(*args, "--epochs", "1", "--save", str(ckpt), "--out", str(tmp_path / "a.json"))[0] == 0
    assert torch.load(ckpt, weights_only=False)["epoch"] == 1
    code, _, err = ratebp_train("--resume", str(ckpt), "--epochs", "2", "--save", str(ckpt),
                        "--out", str(tmp_path / "b.json"))
    assert code == 0, err
    assert ratebp_train(*args, "--epochs", "2", "--out", str(tmp_path / "c.json"))[0] == 0
    resumed = json.loads((tmp_path / "b.json").read_text())["runs"][0]["epochs"]
    straight = json.loads((tmp_path / "c.json").read_text())["runs"][0]["epochs"]
    assert [e["epoch"] for e in resumed] == [1, 2] and torch.load(ckpt, weights_only=False)["epoch"] == 2
    for key in ("loss", "train_acc", "test_acc"):
        assert resumed[1][key] == pytest.approx(straight[1][key], rel=1e-6), key
    code, _, err = ratebp_train("--resume", str(ckpt), "--epochs", "2")
    assert code == 2 and "already trained 2 epochs" in err


@pytest.mark.parametrize("argv,message", [
    (["--data", "cifar10", "--data-dir", "/nonexistent/ratebp"], "cifar10"),
    (["--data", "mnist"], "mnist"),
    (["--T", "0"], "--T must be at least 1"),
    (["--method", "eprop"], "invalid choice: 'eprop'"),
    (["--epochs", "two"], "invalid int value: 'two'"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--resume", "/nonexistent/ckpt.pt"], "no such file"),
    (["--data", "timing", "--T", "16"], "--model convnet takes images; this data has 8 features per step"),
    (["--data", "timing", "--model", "mlp", "--T", "5"], "--T must divide 16, got 5"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--lr", "-1"], "CUDA|--lr must be positive"),
])
def test_bad_input_is_one_line(capsys, argv, message):
    try:
        code = main(["train", *argv])
    except SystemExit as e:                  # argparse's errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("ratebp train: error: ") and re.search(message, err), err


def test_resume_refuses_a_different_model(ratebp_train, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    assert ratebp_train("--data", "synthetic", *TINY, "--save", str(ckpt), "--out", str(tmp_path / "a.json"))[0] == 0
    code, _, err = ratebp_train("--resume", str(ckpt), "--model", "vgg11", "--epochs", "2")
    assert code == 2 and "trained with --model convnet, not vgg11" in err and err.count("\n") == 1
