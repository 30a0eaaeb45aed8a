"""show: readable, stable text naming every neuron and approximation; DOT and SVG with one drawn node
per graph node; transformed and torch.compile'd models alike."""
import re
import shutil
import xml.etree.ElementTree as ET

import pytest
import torch
import torch.nn.functional as F

import ratebp_compile as rc
from ratebp_compile import models
from tests.conftest import inputs_unchanged
from tests.passes.util import Tiny, tiny_input

EXPECTED_ANNOTATED = """\
=== captured graph, annotated ===================================================
node       computes                       shape            time  kind
x          placeholder                    [2, 3, 2, 5, 5]  T@0   input
flatten    .flatten(x, 0, 1)              [6, 2, 5, 5]     T·@0  exact
conv       Conv2d(flatten)                [6, 3, 5, 5]     T·@0  exact
bn         BatchNorm2d(conv)              [6, 3, 5, 5]     T·@0  batchnorm
unflatten  .unflatten(bn, 0, [2, -1])     [2, 3, 3, 5, 5]  T@0   exact
lif        LIF[λ=0.5 Vth=0.5](unflatten)  [2, 3, 3, 5, 5]  T@0   neuron
mean       .mean(lif, [3, 4])             [2, 3, 3]        T@0   exact
fc         Linear(mean)                   [2, 3, 4]        T@0   exact
output     fc
"""


def test_annotated_text_is_exactly_this():
    tm = rc.transform(Tiny(), example_inputs=[tiny_input(T=2, B=3)])
    assert rc.show(tm, "annotated") == EXPECTED_ANNOTATED


def _vgg_with_max_pool():
    model = models.SpikingVGG([4, "M", 8, "AA"], [8, 3])
    x = torch.rand(3, 2, 3, 16, 16)
    with pytest.warns(rc.ApproximationWarning), inputs_unchanged(x):
        tm = rc.transform(model)
        F.cross_entropy(tm(x).mean(0), torch.tensor([0, 2])).backward()
    return tm


def test_full_text_names_every_neuron_and_approximation():
    tm = _vgg_with_max_pool()
    text = rc.show(tm)
    assert text == rc.show(tm)                                   # stable
    assert text.startswith("SpikingVGG: rate-based training step, T = 3, 2 neurons, 1 approximated ops")
    for title in ("captured graph, annotated", "spike graph", "rate graph", "memory", "passes"):
        assert f"=== {title}" in text
    neurons = [n.name for n in tm.compiled.step.meta["ratebp.source"].graph.nodes
               if isinstance(n.target, rc.nn.NeuronSpec)]
    assert len(neurons) == 2 and all(re.search(rf"^{n}\s.*neuron$", text, re.M) for n in neurons)
    assert re.search(r"^features_1_layer\s+MaxPool2d\(.*approximate$", text, re.M)
    assert re.search(r"features_1_layer: max_pool is not linear.*vgg\.py:\d+", text)
    assert re.search(r"rate-based:\s+[\d.]+ MiB.*\n\s+BPTT:\s+[\d.]+ MiB", text)


def test_memory_summary_grows_with_T_for_bptt_only():
    numbers = {}
    for T in (2, 8):
        tm = rc.transform(models.resnet18(width=4), example_inputs=[torch.rand(T, 2, 3, 16, 16)])
        text = rc.show(tm, "memory")
        rate, bptt = (float(re.search(rf"{name}:\s+([\d.]+) MiB", text).group(1)) for name in ("rate-based", "BPTT"))
        numbers[T] = rate, bptt
    assert numbers[2][0] == numbers[8][0]
    assert numbers[8][1] > 3 * numbers[2][1]


def test_dot_has_one_node_per_graph_node_and_highlights():
    tm = _vgg_with_max_pool()
    graph = tm.compiled.step.meta["ratebp.source"].graph
    dot = rc.show(tm, format="dot")
    assert len(re.findall(r"^\s+n\d+ \[label=", dot, re.M)) == len(graph.nodes)
    assert re.search(r'label="features_1_layer\\nMaxPool2d[^"]*", fillcolor="#e63946"', dot)     # approximated
    assert dot.count('fillcolor="#f4a261"') == 2                                              # neurons


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz (dot) is not installed")
@pytest.mark.parametrize("stage", ["annotated", "spike", "rate"])
def test_svg_is_valid_xml_with_one_node_per_graph_node(stage):
    tm = _vgg_with_max_pool()
    program = tm.compiled.step
    graph = {"annotated": program.meta["ratebp.source"], "spike": program.spike, "rate": program.rate}[stage].graph
    svg = rc.show(tm, stage, format="svg")
    root = ET.fromstring(svg)
    ns = {"svg": "http://www.w3.org/2000/svg"}
    drawn = root.findall(".//svg:g[@class='node']", ns)
    assert len(drawn) == len(graph.nodes)
    titles = {g.find("svg:title", ns).text for g in drawn}
    assert len(titles) == len(graph.nodes)


def test_show_of_a_compiled_model():
    torch._dynamo.reset()
    model = Tiny()
    opt = torch.compile(model, backend="ratebp", options={"compiler": "eager"})
    x = tiny_input()
    with inputs_unchanged(x):
        opt(x).sum().backward()
    text = rc.show(opt)
    assert text.startswith("torch.compile graph: rate-based training step, T = 2, 1 neurons")
    assert "rate_neuron" in text and rc.show(opt, format="dot").startswith("digraph")
    torch._dynamo.reset()


def test_show_errors():
    with pytest.raises(rc.RateBPError, match="nothing compiled yet"):
        rc.show(rc.transform(Tiny()))
    tm = rc.transform(Tiny(), example_inputs=[tiny_input()])
    with pytest.raises(rc.RateBPError, match="unknown stage"):
        rc.show(tm, "nope")
    with pytest.raises(rc.RateBPError, match="format must be"):
        rc.show(tm, format="png")
    with pytest.raises(rc.RateBPError, match="expects a module"):
        rc.show(42)
