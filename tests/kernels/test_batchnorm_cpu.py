"""The spike pass's BatchNorm on CPU (``kernels.batchnorm_cpu``) against ``torch.native_batch_norm`` and the
exact statistics in float64: shapes with and without a partial block, per-channel data far from zero, float32
and float64, no affine parameters, the statistics alone, threads, what it refuses, and the spike pass taking
it with its input left as it was."""
import pytest
import torch

from ratebp_compile import graph_ops
from ratebp_compile.kernels import batchnorm_cpu as B

pytestmark = pytest.mark.skipif(not B.LIBRARY.get(), reason=f"no C compiler: {B.LIBRARY.unavailable_reason()}")


def _input(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn((1, shape[1]) + (1,) * (len(shape) - 2), generator=g, dtype=torch.float64) * 50
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + centre).to(dtype)


def _exact(x):
    dims = [0] + list(range(2, x.dim()))
    return x.double().mean(dims), x.double().var(dims, unbiased=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape,layout", [((16, 4, 32, 32), "contiguous"), ((7, 3, 5, 7), "contiguous"),
                                          ((5, 2, 3000), "contiguous"), ((3, 5, 2, 4, 4), "contiguous"),
                                          ((16, 16, 32, 32), "channels_last"), ((7, 3, 5, 7), "channels_last"),
                                          ((11, 37, 9, 9), "channels_last")], ids=str)
def test_equals_batchnorm_to_rounding(shape, layout, dtype):
    """Contiguous and channels-last (rows of C channels: 16 is two full vector groups of float32, 37 four
    and a partial one; 11·9·9 rows are three full blocks of 256 and a partial one)."""
    x = _input(shape, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x_before = x.clone()
    weight = torch.rand(shape[1], dtype=dtype) + 0.5
    bias = torch.randn(shape[1], dtype=dtype)
    assert B.usable(x, weight, bias)
    y, mean, var = B.batch_norm(x, weight, bias, 1e-5)
    exact_mean, exact_var = _exact(x)
    eps = torch.finfo(dtype).eps
    # the statistics within a few ulps of the exact ones, as far as the data's conditioning allows: the mean
    # of its magnitude plus the spread, the variance times 1 + |mean|/spread (x − mean loses those digits)
    spread = exact_var.sqrt()
    assert ((mean.double() - exact_mean).abs() / (exact_mean.abs() + spread)).max() < 8 * eps
    assert ((var.double() - exact_var).abs() / exact_var / (1 + exact_mean.abs() / spread)).max() < 8 * eps
    # y = (x − mean)·a + β within a few ulps of its terms, and no further from the exact y than
    # native_batch_norm's
    channel = (1, -1) + (1,) * (x.dim() - 2)
    scale = (weight.double() / (exact_var + 1e-5).sqrt()).view(channel)
    exact_y = (x.double() - exact_mean.view(channel)) * scale + bias.double().view(channel)
    terms = (x.double() - exact_mean.view(channel)).abs() * scale + (exact_mean.view(channel) * scale).abs() + \
        bias.double().abs().view(channel)
    assert ((y.double() - exact_y).abs() <= 8 * eps * terms).all()
    ref_y = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, 1e-5)[0]
    assert (y.double() - exact_y).abs().max() <= 2 * (ref_y.double() - exact_y).abs().max() + eps
    assert y.dtype == mean.dtype == var.dtype == dtype
    assert y.stride() == x.stride()
    assert torch.equal(x, x_before)


def test_without_affine_parameters_and_statistics_alone():
    x = _input((8, 3, 6, 6), torch.float32)
    y, mean, var = B.batch_norm(x, None, None, 1e-3)
    ref_y = torch.native_batch_norm(x, None, None, None, None, True, 0.0, 1e-3)[0]
    torch.testing.assert_close(y, ref_y, rtol=0, atol=1e-5)
    none, mean_alone, var_alone = B.batch_norm(x, None, None, 0.0, normalise=False)
    assert none is None and torch.equal(mean_alone, mean) and torch.equal(var_alone, var)
    ref_mean, ref_var = torch.batch_norm_update_stats(x, None, None, 0.0)
    torch.testing.assert_close(graph_ops.batch_moments(x), (ref_mean, ref_var), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_threads_give_the_same_result(layout):
    """Threads split the channels (contiguous) or the blocks of rows (channels-last, whose sums are added in
    order): the results are bitwise those of one thread."""
    if not B.LIBRARY.openmp:
        pytest.skip("the library was built without OpenMP here: it runs on one thread")
    x = _input((4, 7, 30, 30), torch.float32)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = B.batch_norm(x, None, None, 1e-5)
        torch.set_num_threads(3)
        three = B.batch_norm(x, None, None, 1e-5)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, three):
        assert torch.equal(a, b)


def test_refuses_what_it_does_not_take(monkeypatch):
    x = _input((4, 3, 8, 8), torch.float32)
    w = torch.ones(3, requires_grad=True)
    assert B.usable(x)
    assert not B.usable(x.half())                                       # dtype
    assert B.usable(x.to(memory_format=torch.channels_last))            # rows of channels
    assert not B.usable(x.transpose(2, 3))                              # layout
    assert not B.usable(x[:, :, :2, :2].contiguous())                   # under 16 elements per slab
    assert not B.usable(x[:3, :, :2, :2].contiguous(memory_format=torch.channels_last))  # under 16 rows
    assert not B.usable(x.flatten(1))                                   # [N, C]: BatchNorm1d without length
    assert not B.usable(x, w)                                           # autograd through the weight
    with torch.no_grad():
        assert B.usable(x, w)
    assert not B.usable(x, torch.ones(3, dtype=torch.float64))          # a parameter in another dtype
    assert not B.usable(x, torch.ones(4)) and not B.usable(x, None, torch.ones(1))   # not [C]: PyTorch's error
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        assert not B.usable(mode.from_tensor(x))                        # tracing: PyTorch's BatchNorm
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not B.usable(x)                                              # Dynamo: PyTorch's BatchNorm


def test_the_spike_pass_batchnorm_takes_it(monkeypatch):
    """``spike_batch_norm`` on a BatchNorm's parameters, and the spike pass of a transformed model with
    BatchNorm layers, run the C kernel; the training step's gradients are those with PyTorch's BatchNorm
    to rounding, and the input is left as it was."""
    import copy

    import ratebp_compile as rc
    from ratebp_compile.models import convnet

    calls = []
    real = B.batch_norm
    monkeypatch.setattr(B, "batch_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    bn = torch.nn.BatchNorm2d(4)
    x = _input((6, 4, 5, 5), torch.float32)
    with torch.no_grad():
        y, mean, var = graph_ops.spike_batch_norm(x, bn.weight, bn.bias, 1e-5)
    assert calls == [1]
    ref_y = torch.native_batch_norm(x, bn.weight, bn.bias, None, None, True, 0.0, 1e-5)[0]
    torch.testing.assert_close(y, ref_y, rtol=0, atol=1e-5)

    torch.manual_seed(0)
    model = convnet(width=4).double()
    reference = copy.deepcopy(model)
    inputs = torch.rand(4, 2, 1, 16, 16, dtype=torch.float64)
    before = inputs.clone()
    grads = []
    for net, kernel in ((model, True), (reference, False)):
        if not kernel:
            monkeypatch.setattr(B, "usable", lambda *a, **k: False)
        calls.clear()
        rc.transform(net)(inputs).sum().backward()
        assert bool(calls) == kernel
        grads.append([p.grad for p in net.parameters()])
    assert torch.equal(inputs, before)
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
