"""``ratebp train`` checkpoints: an interrupt while one is written leaves the previous one, and one that does
not fit the model or its optimizer is refused in one line before any training."""
import io
import os
import re

import pytest
import torch

from ratebp_compile.cli import main, train
from ratebp_compile.cli.common import build_model

SMALL = ["--data", "synthetic", "--width", "4", "--T", "2", "--batch-size", "128", "--device", "cpu"]


def _torn_save_at(n: int):
    """``torch.save`` that writes the ``n``-th checkpoint only halfway, then raises KeyboardInterrupt (as a
    SIGINT would), whether it is given a path or an open file."""
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(obj)
        if len(calls) < n:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        half = buffer.getvalue()[:len(buffer.getvalue()) // 2]
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as out:
                out.write(half)
        else:
            f.write(half)
        raise KeyboardInterrupt

    return save


def test_an_interrupt_while_saving_keeps_the_last_checkpoint(ratebp_train, monkeypatch, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    monkeypatch.setattr(torch, "save", _torn_save_at(2))
    code, _, err = ratebp_train(*SMALL, "--epochs", "3", "--save", str(ckpt), "--out", str(tmp_path / "r.json"))
    monkeypatch.undo()
    assert code == 130
    assert torch.load(ckpt, weights_only=False)["epoch"] == 1          # intact and loadable
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary file left behind
    assert err.splitlines()[-1] == f"ratebp train: interrupted; last completed checkpoint: {ckpt} (epoch 1)"
    code, _, err = ratebp_train("--resume", str(ckpt), "--epochs", "2", "--out", str(tmp_path / "run.json"))
    assert code == 0, err


def test_an_interrupt_while_saving_a_first_checkpoint_leaves_no_file(ratebp_train, monkeypatch, tmp_path):
    """Both methods, one checkpoint each: the second run is interrupted while writing its first one."""
    folder = tmp_path / "ckpts"
    monkeypatch.setattr(torch, "save", _torn_save_at(2))
    code, _, err = ratebp_train(*SMALL, "--epochs", "1", "--method", "both", "--save", str(folder / "ckpt.pt"))
    assert code == 130 and [p.name for p in folder.iterdir()] == ["ckpt-ratebp-seed0.pt"]
    assert err.splitlines()[-1] == (f"ratebp train: interrupted; last completed checkpoints: "
                                    f"{folder / 'ckpt-ratebp-seed0.pt'} (epoch 1), "
                                    f"{folder / 'ckpt-bptt-seed0.pt'} (not written by this run)")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of one epoch of convnet, width 4, on synthetic data (Adam)."""
    folder = tmp_path_factory.mktemp("trained")
    path = folder / "ckpt.pt"
    assert main(["train", *SMALL, "--epochs", "1", "--save", str(path), "--out", str(folder / "run.json")]) == 0
    return torch.load(path, weights_only=False)


def _no_training_step(*args):
    raise AssertionError("a training step ran")


def _resume_altered(ratebp_train, monkeypatch, tmp_path, checkpoint):
    """Resume ``checkpoint`` (saved first), with no training step allowed: the exit code and stderr."""
    path = tmp_path / "altered.pt"
    torch.save(checkpoint, path)
    monkeypatch.setattr(train, "train_step", _no_training_step)
    code, _, err = ratebp_train("--resume", str(path), "--epochs", "2", "--out", str(tmp_path / "run.json"))
    return code, err


@pytest.mark.parametrize("model, width, message", [
    ("vgg11", 4, r"missing block1\.conv\.weight, block1\.conv\.bias, block1\.bn\.weight and 13 more; "
                 r"unexpected features\.0\.conv\.weight, features\.0\.conv\.bias, features\.0\.bn\.weight "
                 r"and \d+ more$"),
    ("convnet", 8, r"of another shape \(checkpoint vs model\): block1\.conv\.weight \[8, 1, 3, 3\] vs \[4, 1, 3, 3\], "
                   r"block1\.conv\.bias \[8\] vs \[4\], block1\.bn\.weight \[8\] vs \[4\] and 10 more$"),
], ids=["another-model", "another-width"])
def test_resume_refuses_the_model_state_of_another_model(ratebp_train, monkeypatch, tmp_path, trained, model,
                                                         width, message):
    foreign = dict(trained, model=build_model(model, width, (1, 8, 8), 10, seed=0).state_dict())
    code, err = _resume_altered(ratebp_train, monkeypatch, tmp_path, foreign)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("ratebp train: error: --resume: the checkpoint's model state does not fit convnet of "
                          "width 4: ") and re.search(message, err.strip()), err


def _adam_state_of_width_8(state):
    """Adam's state after one step of convnet of width 8: as many parameters, of other shapes."""
    module = build_model("convnet", 8, (1, 8, 8), 10, seed=0)
    optimizer = torch.optim.Adam(module.parameters())
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return optimizer.state_dict()


def _one_group_more(state):
    return dict(state, param_groups=state["param_groups"] + [dict(state["param_groups"][0], params=[])])


def _one_parameter_fewer(state):
    (group,) = state["param_groups"]
    last = group["params"][-1]
    return {"state": {i: s for i, s in state["state"].items() if i != last},
            "param_groups": [dict(group, params=group["params"][:-1])]}


@pytest.mark.parametrize("alter, message", [
    (_adam_state_of_width_8,
     r"of another shape \(checkpoint vs parameter\): exp_avg of block1\.conv\.weight \[8, 1, 3, 3\] vs "
     r"\[4, 1, 3, 3\], exp_avg_sq of block1\.conv\.weight \[8, 1, 3, 3\] vs \[4, 1, 3, 3\], "
     r"exp_avg of block1\.conv\.bias \[8\] vs \[4\] and 15 more$"),
    (_one_group_more, r"2 parameter groups in the checkpoint, 1 in the optimizer$"),
    (_one_parameter_fewer, r"parameter group 0 has 9 parameters in the checkpoint, 10 in the optimizer$"),
], ids=["another-width", "one-group-more", "one-parameter-fewer"])
def test_resume_refuses_an_optimizer_state_that_does_not_fit(ratebp_train, monkeypatch, tmp_path, trained, alter,
                                                             message):
    altered = dict(trained, optimizer=alter(trained["optimizer"]))
    code, err = _resume_altered(ratebp_train, monkeypatch, tmp_path, altered)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("ratebp train: error: --resume: the checkpoint's optimizer state does not fit the "
                          "model's parameters: ") and re.search(message, err.strip()), err
