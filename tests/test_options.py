"""StepOptions: the user's options parsed and defaulted in one place; step_kind: the one rule for which step runs."""
import pytest

from ratebp_compile.errors import RateBPError
from ratebp_compile.options import (DEFAULT_CACHE_SIZE, DEFAULT_MEMORY_BUDGET, StepOptions, budget_bytes,
                                    parse_memory_budget, step_kind)


def test_defaults_and_layouts():
    opts = StepOptions()
    assert (opts.method, opts.input_layout, opts.grad_scale, opts.memory_budget, opts.time_chunk, opts.cache_size,
            opts.compiler) == ("ratebp", "TB", "bptt", DEFAULT_MEMORY_BUDGET, None, DEFAULT_CACHE_SIZE, "inductor")
    assert opts.layouts(2) == ["TB", "TB"]
    listed = StepOptions(input_layout=["TB", "static"])
    assert listed.input_layout == ("TB", "static") and listed.layouts(2) == ["TB", "static"]
    with pytest.raises(RateBPError, match="input_layout lists 2 layouts for 3 inputs"):
        listed.layouts(3)


@pytest.mark.parametrize("options,match", [
    (dict(method="eprop"), "method must be one of"),
    (dict(grad_scale="mean"), "grad_scale must be one of"),
    (dict(input_layout="BT"), "input_layout must be one of"),
    (dict(input_layout=[]), "input_layout must be one of"),
    (dict(time_chunk=0), "time_chunk must be a positive int or None, got 0"),
    (dict(time_chunk=True), "time_chunk must be a positive int or None"),
    (dict(cache_size=None), "cache_size must be a positive int, got None"),
    (dict(memory_budget=0), "memory_budget must be bytes"),
    (dict(memory_budget=1.5), "memory_budget must be bytes"),
    (dict(memory_budget="1G"), "memory_budget must be bytes"),
    (dict(memory_budget=True), "memory_budget must be bytes"),
    (dict(compiler="tvm"), "compiler must be one of"),
])
def test_bad_values(options, match):
    with pytest.raises(RateBPError, match=match):
        StepOptions(**options)


def test_parse_names_unknown_options():
    assert StepOptions.parse({"time_chunk": None}, "here").time_chunk is None
    with pytest.raises(RateBPError, match=r"here: unknown option\(s\) \['chunk'\]"):
        StepOptions.parse({"chunk": 2}, "here")


@pytest.mark.parametrize("text,expected", [
    ("512M", 512 * 2 ** 20), ("2g", 2 * 2 ** 30), ("1.5G", 3 * 2 ** 29), ("64k", 65536), ("1000", 1000),
    ("0.25", 0.25), ("1", 1.0), ("none", None), (" None ", None),
])
def test_memory_budget_as_written(text, expected):
    assert parse_memory_budget(text) == expected and type(parse_memory_budget(text)) is type(expected)


@pytest.mark.parametrize("text", ["", "lots", "-1G", "0", "2.5", "1e", "G"])
def test_memory_budget_as_written_refused(text):
    with pytest.raises(RateBPError, match="memory"):
        parse_memory_budget(text)


def test_budget_in_bytes():
    assert budget_bytes(None, 100) is None
    assert budget_bytes(1000, 10 ** 9) == 1000
    assert budget_bytes(0.25, 4000) == 1000


@pytest.mark.parametrize("method,training,grad,expected", [
    ("ratebp", True, True, "ratebp"), ("bptt", True, True, "bptt"),
    ("ratebp", False, True, "plain"), ("bptt", False, True, "plain"),
    ("ratebp", True, False, "plain"), ("bptt", True, False, "plain"),
])
def test_step_kind(method, training, grad, expected):
    assert step_kind(method, training, grad) == expected
