"""The rate pass's neuron: value r, Jacobian diag(e), parameter gradients through e_p."""
import torch

from ratebp_compile.nn import rate_neuron
from tests.conftest import assert_close


def test_rate_neuron_value_and_jacobian():
    x = torch.randn(1, 4, 5, dtype=torch.float64, requires_grad=True)
    r, e = torch.rand(1, 4, 5, dtype=torch.float64), torch.rand(1, 4, 5, dtype=torch.float64)
    w = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    e_w = torch.randn(1, 4, 5, dtype=torch.float64)
    out = rate_neuron(x, r, e, [w], [e_w])
    assert torch.equal(out.detach(), r)
    g = torch.randn_like(out)
    out.backward(g)
    assert_close(x.grad, g * e)
    assert_close(w.grad, (g * e_w).sum())
