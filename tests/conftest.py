"""Shared test configuration: one tolerance table, fixed seeds, the reference fixtures' location."""
from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter, on CPU tensors. This must be set before
# ratebp_compile.kernels is imported (triton.jit reads it when a kernel is defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
#: The paper authors' reference gradients (../shared beside the repository; RATEBP_FIXTURES overrides).
REFERENCE_DIR = Path(os.environ.get("RATEBP_FIXTURES", REPO.parent / "shared" / "fixtures" / "reference"))

#: (rtol, atol) per dtype for comparisons against a reference computed in the same dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (2e-2, 1e-2),
}
#: The fixtures' own criterion: |ours - ref| <= FIXTURE_ATOL + FIXTURE_RTOL * max|ref|.
FIXTURE_RTOL, FIXTURE_ATOL = 1e-4, 1e-6


def assert_close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    """Compare with the tolerance of ``expected``'s dtype (integers: exactly)."""
    if not expected.dtype.is_floating_point:
        assert torch.equal(actual, expected), msg
        return
    rtol, atol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=msg or None)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bytes (NaNs included): what "the step left its input unchanged" means."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    def raw(t):
        return t.detach().contiguous().view(-1).view(torch.uint8)
    return torch.equal(raw(a), raw(b))


@contextmanager
def inputs_unchanged(*inputs):
    """Asserts, on leaving, that the tensors among ``inputs`` hold bitwise what they held on entering: a
    training step writes nothing it does not own."""
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    before = [t.detach().clone() for t in tensors]
    yield
    for i, (t, b) in enumerate(zip(tensors, before)):
        assert bitwise_equal(t, b), f"the step changed its input {i}"


def snapshot_model(model: torch.nn.Module):
    """What must survive a failed transform: the state and every module's attributes."""
    return copy.deepcopy(model.state_dict()), {n: sorted(vars(m)) for n, m in model.named_modules()}


def assert_model_unchanged(model: torch.nn.Module, snap) -> None:
    state, attrs = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert {n: sorted(vars(m)) for n, m in model.named_modules()} == attrs


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def reference_files():
    files = sorted(REFERENCE_DIR.glob("*.pt"))
    if not files:
        raise FileNotFoundError(f"no reference fixtures in {REFERENCE_DIR} (set RATEBP_FIXTURES)")
    return files


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="also run the tests marked slow (heavy torch.compile runs another test already covers)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a heavy test left out of the default run; --slow runs it")


def pytest_collection_modifyitems(config, items):
    """Tests marked slow are skipped, with the reason in the summary, unless ``--slow`` is given."""
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)
