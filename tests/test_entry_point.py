"""backend="ratebp" after `pip install .` in a fresh virtual environment, found through the
torch_dynamo_backends entry point before anything imports ratebp_compile (and without Triton)."""
import subprocess
import sys
import textwrap

import torch

from tests.conftest import REPO

SCRIPT = textwrap.dedent("""
    import sys, torch
    import torch.nn.functional as F
    assert "ratebp" in torch._dynamo.list_backends(), torch._dynamo.list_backends()
    assert "ratebp_compile" not in sys.modules
    backend = torch._dynamo.lookup_backend("ratebp")
    assert backend.__module__ == "ratebp_compile.backend", backend
    from ratebp_compile import kernels, models
    assert not kernels.triton_available()              # no Triton here: the ops' PyTorch path
    model = models.resnet18(num_classes=4, width=4)
    x = torch.rand(2, 2, 3, 16, 16)
    given = x.clone()
    out = torch.compile(model, backend="ratebp", options={"compiler": "eager"})(x)
    F.cross_entropy(out.mean(0), torch.tensor([0, 3])).backward()
    assert all(p.grad is not None for p in model.parameters()) and torch.equal(x, given)
    print("ok")
""")


def test_backend_entry_point_in_a_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run(pip + [f"torch=={torch.__version__.split('+')[0]}"], check=True, timeout=900)
    subprocess.run(pip + [str(REPO)], check=True, timeout=900)
    result = subprocess.run([python, "-c", SCRIPT], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
