"""The streamed spike pass's pieces: chunk bounds, time slices, BatchNorm moments over chunks."""
import pytest
import torch

from ratebp_compile.errors import RateBPError
from ratebp_compile.options import StepOptions
from ratebp_compile.stream import ChannelMoments, chunk_bounds, dense_order, memory_order, time_slice
from ratebp_compile.time_layout import TimeLayout


@pytest.mark.parametrize("T,chunk,expected", [
    (32, 8, [(0, 8), (8, 8), (16, 8), (24, 8)]),
    (10, 8, [(0, 5), (5, 5)]),
    (7, 3, [(0, 3), (3, 2), (5, 2)]),
    (3, 8, [(0, 3)]),
    (5, 1, [(i, 1) for i in range(5)]),
])
def test_chunk_bounds_cover_T_in_near_equal_chunks(T, chunk, expected):
    bounds = chunk_bounds(T, chunk)
    assert bounds == expected
    assert sum(n for _, n in bounds) == T and max(n for _, n in bounds) <= chunk


def test_time_slice_stacked_and_merged():
    x = torch.arange(4 * 3 * 2).view(4, 3, 2)            # [T=4, B=3, 2]
    assert torch.equal(time_slice(x, TimeLayout(0), 4, 1, 2), x[1:3])
    assert torch.equal(time_slice(x.transpose(0, 1), TimeLayout(1), 4, 2, 2), x.transpose(0, 1)[:, 2:4])
    merged = x.flatten(0, 1)                              # [T·B, 2]
    assert torch.equal(time_slice(merged, TimeLayout(0, merged=True), 4, 1, 2), x[1:3].flatten(0, 1))


def test_dense_order():
    """The order a fused neuron runs in: a channels-last [T, B, C, H, W] is dense in [T, B, H, W, C]; a
    contiguous tensor, one whose leading dimensions are not outermost, and one that is not dense run as
    they are."""
    x = torch.empty(4, 2, 3, 5, 5)
    assert memory_order(x) == [0, 1, 2, 3, 4] and dense_order(x) is None              # contiguous already
    last = torch.empty(8, 3, 5, 5).contiguous(memory_format=torch.channels_last).unflatten(0, (4, 2))
    assert dense_order(last) == dense_order(last, leading=2) == [0, 1, 3, 4, 2]
    assert last.permute(0, 1, 3, 4, 2).is_contiguous()
    assert dense_order(x.transpose(0, 1)) is None                                     # time not outermost
    assert dense_order(x.transpose(1, 2)) == [0, 2, 1, 3, 4]                          # time outermost only
    assert dense_order(x.transpose(1, 2), leading=2) is None                          # batch not next
    assert dense_order(torch.empty(4, 2, 10)[:, :, ::2]) is None                      # not dense
    one = torch.empty(6, 3, 1, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (2, 3))
    assert dense_order(one, leading=2) is None                  # contiguous as well: nothing to permute


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_channel_moments_over_chunks_equal_the_whole(dtype):
    x = (torch.randn(12, 5, 3, 3, dtype=torch.float64) * 0.3 + 4.0).to(dtype)   # a large mean
    moments = ChannelMoments()
    for part in x.split([5, 4, 3]):
        moments.add(part)
    mean, var = moments.result()
    assert mean.dtype == var.dtype == torch.promote_types(dtype, torch.float32)
    ref_var, ref_mean = torch.var_mean(x.double(), [0, 2, 3], unbiased=False)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(mean.double(), ref_mean, rtol=tol, atol=tol)
    torch.testing.assert_close(var.double(), ref_var, rtol=tol, atol=tol)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "8"])
def test_bad_time_chunk(bad):
    with pytest.raises(RateBPError, match="time_chunk must be a positive int or None"):
        StepOptions(time_chunk=bad)
