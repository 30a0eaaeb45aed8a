"""MultiStep: a per-step model as a sequence model; a per-step model compiled as it is is refused."""
import copy

import pytest
import torch
from torch import nn

import ratebp_compile as rc
from ratebp_compile.nn import LIFCell, MultiStep, ParametricLIFCell
from tests.conftest import assert_model_unchanged, inputs_unchanged, snapshot_model


def _per_step_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), LIFCell(decay=0.4, v_threshold=0.5), nn.Linear(8, 3),
                         ParametricLIFCell(v_threshold=0.05))


def _user_loop(net, x):
    """What the user's training loop computes: reset, then one call per step."""
    for m in net.modules():
        if isinstance(m, LIFCell | ParametricLIFCell):
            m.reset()
    return torch.stack([net(x_t) for x_t in x])


def test_eager_equals_the_users_loop_and_resets_state():
    net = _per_step_net()
    x = torch.rand(5, 6, 4) * 4
    expected = _user_loop(copy.deepcopy(net), x)
    ms = MultiStep(net)
    assert torch.equal(ms(x), expected)
    assert torch.equal(ms(x), expected)           # state from the first call does not leak into the second
    assert expected.sum() > 0


@pytest.mark.parametrize("method", ["bptt", "ratebp"])
def test_transformed_multistep_trains_like_the_users_loop(method):
    net = _per_step_net()
    ref = copy.deepcopy(net)
    x, y = torch.rand(5, 6, 4) * 4, torch.randint(0, 3, (6,))
    expected = _user_loop(ref, x)
    model = rc.transform(MultiStep(net), method=method)
    with inputs_unchanged(x, y):
        out = model(x)
        torch.nn.functional.cross_entropy(out.mean(0), y).backward()
    assert torch.equal(out, expected)
    if method == "bptt":
        torch.nn.functional.cross_entropy(expected.mean(0), y).backward()
        for (name, p), q in zip(net.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    else:
        assert all(p.grad is not None for p in net.parameters())
    assert model.programs, "the compiled step ran"


def test_a_per_step_model_called_once_per_step_is_refused():
    """The tutorial loop ``for t: net(x[t])`` on a transformed per-step model would read the batch as time."""
    net = _per_step_net()
    snap = snapshot_model(net)
    x = torch.rand(5, 6, 4)
    with inputs_unchanged(x), pytest.raises(rc.RateBPError, match=r"module '1' \(LIFCell\) is a single-step neuron "
                                                                   r"called once per forward.*MultiStep.*porting\.md"):
        rc.transform(net)(x[0])
    assert_model_unchanged(net, snap)
    assert all(m.v is None for m in net.modules() if isinstance(m, LIFCell | ParametricLIFCell))
