"""The scripts in examples/ run and learn (each one a short training run)."""
import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(autouse=True)
def _examples_on_the_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))     # as when run as python examples/<name>.py: digits.py beside it


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_spikingjelly_digits_learns():
    from tests.interop.conftest import require_spikingjelly
    require_spikingjelly()
    pytest.importorskip("sklearn")
    accuracy = _load("spikingjelly_digits").main(["--epochs", "2"])
    assert accuracy > 0.6


@pytest.mark.parametrize("name,library", [("snntorch_digits", "snntorch"), ("norse_digits", "norse")])
def test_snntorch_and_norse_digits_learn(name, library):
    pytest.importorskip(library)
    pytest.importorskip("sklearn")
    accuracy = _load(name).main(["--epochs", "2"])
    assert accuracy > 0.6


def test_data_parallel_example_learns_on_two_processes(tmp_path):
    """``torchrun --standalone --nproc-per-node 2 examples/data_parallel.py`` (gloo on the loopback interface;
    torchrun's logs in ``tmp_path``, not a directory of its own left in the system's temporary directory)."""
    import os
    import re
    import subprocess
    import sys

    pytest.importorskip("sklearn")
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "--log-dir", str(tmp_path / "torchrun")]
    done = subprocess.run(torchrun + [str(EXAMPLES / "data_parallel.py"), "--epochs", "4"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    accuracies = [float(a) for a in re.findall(r"test accuracy ([\d.]+)%", done.stdout)]
    assert len(accuracies) == 4 and accuracies[-1] > 60, done.stdout        # printed once per epoch: rank 0 only
