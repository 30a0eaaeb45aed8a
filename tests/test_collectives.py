"""The collectives of a synchronised BatchNorm on one process (no torch.distributed): group keys, and the
custom ops' local behaviour, fake implementations and autograd (``torch.library.opcheck``). Two processes:
tests/distributed/test_sync_batchnorm.py."""
import pytest
import torch

from ratebp_compile import RateBPError
from ratebp_compile.collectives import (WORLD, global_moments, group_key, process_group, sum_gradient_over_ranks,
                                        sum_over_ranks, world_size)


def test_group_keys():
    assert group_key(None) is None and group_key(False) is None
    assert group_key(True) == WORLD and group_key(WORLD) == WORLD
    with pytest.raises(RateBPError, match="unknown process group key 'x'"):
        group_key("x")
    with pytest.raises(RateBPError, match="must be None, True or a torch.distributed ProcessGroup, got 3"):
        group_key(3)


def test_without_torch_distributed_there_is_no_one_to_talk_to():
    assert process_group(WORLD) is None and world_size(WORLD) == 1 and world_size(None) == 1


def test_local_ops():
    mean, var = torch.randn(2, 3), torch.rand(2, 3)
    m, v, total = global_moments(mean, var, 7, WORLD)
    assert torch.equal(m, mean) and torch.equal(v, var) and float(total) == 7 and total.dtype == torch.float64
    x = torch.randn(4, requires_grad=True)
    for op in (sum_over_ranks, sum_gradient_over_ranks):
        y = op(x, WORLD)
        assert torch.equal(y, x.detach())
        (g,) = torch.autograd.grad((y * torch.arange(4.0)).sum(), x)
        assert torch.equal(g, torch.arange(4.0))


@pytest.mark.parametrize("op,args", [
    (torch.ops.ratebp.global_moments.default, (torch.randn(3), torch.rand(3), 5, WORLD)),
    (torch.ops.ratebp.sum_over_ranks.default, (torch.randn(2, 3, requires_grad=True), WORLD)),
    (torch.ops.ratebp.sum_gradient_over_ranks.default, (torch.randn(2, 3, requires_grad=True), WORLD)),
])
def test_opcheck(op, args):
    torch.library.opcheck(op, args)
