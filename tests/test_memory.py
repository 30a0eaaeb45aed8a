"""Memory: what the rate-based step keeps for backward does not grow with T (BPTT's does)."""
import pytest
import torch

import ratebp_compile as rc
from ratebp_compile import models
from ratebp_compile.memory import SavedTensorMeter
from tests.conftest import inputs_unchanged


def _saved_bytes(method, T, model_fn):
    torch.manual_seed(0)
    tm = rc.transform(model_fn(), method=method)
    x = torch.rand(T, 2, 3, 16, 16)
    tm.compile_for(x)
    with inputs_unchanged(x):
        with SavedTensorMeter() as meter:
            out = tm(x)
        out.mean(0).sum().backward()
    return meter.bytes


@pytest.mark.parametrize("model_fn", [lambda: models.resnet18(width=4), lambda: models.vgg11(width=4)],
                         ids=["resnet18", "vgg11"])
def test_saved_bytes_flat_in_T(model_fn):
    r2, r16 = _saved_bytes("ratebp", 2, model_fn), _saved_bytes("ratebp", 16, model_fn)
    assert r2 > 0
    assert abs(r16 - r2) <= 0.05 * r2, (r2, r16)
    b2, b16 = _saved_bytes("bptt", 2, model_fn), _saved_bytes("bptt", 16, model_fn)
    assert b16 > 6 * b2                   # the meter does see BPTT's growth
    assert r16 < b16 / 8


def test_meter_counts_storages_once():
    x = torch.randn(100, requires_grad=True)
    with SavedTensorMeter() as meter:
        y = x.exp()                       # saves its output
        z = (y * y).sum()                 # saves y twice
    assert meter.bytes == 400
    z.backward()


def test_live_tensor_tracker_peak():
    from ratebp_compile.memory import LiveTensorTracker

    x = torch.randn(1000)
    with LiveTensorTracker() as tracker:
        a = x * 2                          # 4000 B alive
        b = a + 1                          # 8000 B alive
        del a
        c = b * 3                          # a freed: 8000 B alive
        del b, c
        d = torch.empty(3000)              # 12000 B
        del d
    assert tracker.peak_bytes == 12000
    assert tracker.current_bytes == 0


def test_live_tensor_tracker_ignores_views_and_in_place_results_of_earlier_tensors():
    from ratebp_compile.memory import LiveTensorTracker

    x = torch.randn(1000)
    with LiveTensorTracker() as tracker:
        v = x.view(10, 100)[2:5]          # views of a tensor from before: no new memory
        x.mul_(2)                          # in place: no new memory
        a = v * 2                          # 1200 B
        a.add_(1)
        w = a.view(-1)                     # a view of a tracked tensor: counted once
    assert tracker.peak_bytes == 1200
    del v, a, w


def _step_peak(T, time_chunk):
    from ratebp_compile.memory import LiveTensorTracker

    torch.manual_seed(0)
    tm = rc.transform(models.vgg11(width=4), time_chunk=time_chunk)
    x = torch.rand(T, 8, 3, 16, 16)
    with inputs_unchanged(x):
        tm(x).mean(0).sum().backward()                 # compiles
        with LiveTensorTracker() as tracker:
            tm(x).mean(0).sum().backward()
    return tracker.peak_bytes


def test_peak_memory_flat_in_T_with_a_streamed_spike_pass():
    """Saved bytes miss the spike pass's transients; streamed over chunks of time, the whole step's
    peak stays flat in T (unstreamed it grows)."""
    p4, p16 = _step_peak(4, 4), _step_peak(16, 4)
    assert p16 <= 1.1 * p4, (p4, p16)
    assert _step_peak(16, None) > 1.4 * p4


def _traced(fn, *args):
    import torch.fx as fx

    from ratebp_compile.capture import propagate_shapes

    gm = fx.symbolic_trace(fn)
    propagate_shapes(gm, list(args))
    return gm


def _chain(x):
    a = x * 2              # 1 KiB, read by its view and by the sum
    b = a.view(16, 16)     # a view: no memory of its own, keeps a alive
    c = b + 1              # 1 KiB, an output
    d = a.sum()            # 4 bytes, an output; a dies here
    e = c * 3              # 1 KiB, dead at once
    return c, d, e.shape[0]


def test_graph_peak_bytes_follows_liveness_and_views():
    """The estimate is the liveness of the nodes' values: inputs do not count, a view keeps its base alive,
    outputs live to the end; it equals what the tracker measures when the graph runs."""
    from ratebp_compile.memory import LiveTensorTracker, graph_peak_bytes

    x = torch.rand(256)
    gm = _traced(_chain, x)
    assert graph_peak_bytes(gm) == 1024 + 1024 + 4        # at d: a, c, d alive (at e: c, d, e)
    with LiveTensorTracker() as tracker:
        gm(x)
    assert tracker.peak_bytes == graph_peak_bytes(gm)
    scratch = {"add": 5000}
    assert graph_peak_bytes(gm, transient=lambda n: scratch.get(n.name, 0)) == 2048 + 5000     # a, c and scratch
    assert graph_peak_bytes(gm, resize=lambda n, t: t.untyped_storage().nbytes() // 2) == 512 + 512 + 2


def test_format_bytes():
    from ratebp_compile.memory import format_bytes

    assert [format_bytes(n) for n in (512, 40 * 1024, 3 * 2 ** 20 + 2 ** 19, 12 * 2 ** 30)] == \
        ["512 B", "40 KiB", "3.5 MiB", "12 GiB"]


def test_device_memory_bytes(tmp_path, monkeypatch):
    """The CPU's memory is the machine's, or a container's lower limit."""
    import os

    from ratebp_compile import memory
    from ratebp_compile.memory import device_memory_bytes

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 2 ** 30 < device_memory_bytes(torch.device("cpu")) <= physical
    assert device_memory_bytes(torch.device("meta")) is None
    limit, unlimited = tmp_path / "memory.max", tmp_path / "none"
    limit.write_text("1073741824\n")
    unlimited.write_text("max\n")
    monkeypatch.setattr(memory, "_CGROUP_LIMITS", (str(unlimited), str(tmp_path / "missing"), str(limit)))
    assert device_memory_bytes(torch.device("cpu")) == min(physical, 2 ** 30)
    monkeypatch.setattr(memory, "_CGROUP_LIMITS", (str(unlimited),))
    assert device_memory_bytes(torch.device("cpu")) == physical


def test_budget_on_device():
    """A budget in bytes on a device: bytes as given, a fraction of the device's memory, none for None or for
    a fraction of a device whose memory is unknown (the spike pass's schedule and the CPU memory kept both
    read it)."""
    from ratebp_compile.memory import budget_on_device, device_memory_bytes
    cpu = torch.device("cpu")
    assert budget_on_device(1000, cpu) == 1000 and budget_on_device(1000, torch.device("meta")) == 1000
    assert budget_on_device(0.25, cpu) == int(0.25 * device_memory_bytes(cpu))
    assert budget_on_device(None, cpu) is None and budget_on_device(0.25, torch.device("meta")) is None
