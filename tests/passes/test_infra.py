"""The pass runner: a pass that fails on a bug raises an error naming the pass and, where known, the node."""
import importlib
import re

import pytest
import torch

import ratebp_compile as rc
from ratebp_compile.oprules import OpClass
from ratebp_compile.passes import classify_ops, run_pipeline
from tests.passes.util import Tiny, prepare, tiny_input


def test_a_failing_pass_names_the_pass_and_the_node(monkeypatch):
    gm, _ = prepare(Tiny(), [tiny_input()], "classify_ops", inclusive=False)
    module = importlib.import_module("ratebp_compile.passes.classify_ops")    # the module, not the pass

    def classify(node, *args):
        if node.name == "fc":
            raise KeyError("boom")
        return OpClass("exact")

    monkeypatch.setattr(module, "classify", classify)
    with pytest.raises(rc.RateBPError, match=re.compile(r"internal error in pass classify_ops at module 'fc' "
                                                        r"\(Linear\) at .*util\.py:\d+ in forward.*KeyError: 'boom'")):
        run_pipeline(gm, [classify_ops])


def test_a_failing_pass_outside_its_nodes_names_the_pass():
    def broken_pass(gm):
        raise ValueError("invariant")

    gm, _ = prepare(Tiny(), [tiny_input()], "normalize_neurons")
    with pytest.raises(rc.RateBPError, match="internal error in pass broken_pass: ValueError: invariant"):
        run_pipeline(gm, [broken_pass])
    assert isinstance(gm, torch.fx.GraphModule)
