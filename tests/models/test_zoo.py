"""Model zoo: shapes, T = 1 rate-based gradients equal BPTT's on every model, reference specs."""
import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import ratebp_compile as rc
from ratebp_compile import models
from ratebp_compile.nn import IF, LIF, ATan, ParametricLIF
from tests.conftest import inputs_unchanged

ZOO = {
    "resnet18": lambda: models.resnet18(num_classes=5, width=4),
    "resnet19": lambda: models.resnet19(num_classes=5, width=4),
    "vgg11": lambda: models.vgg11(num_classes=5, width=4),
    "vgg13": lambda: models.vgg13(num_classes=5, width=4),
    "vggsnn": lambda: models.vggsnn(num_classes=5, width=4),
    "mlp": lambda: models.SpikingMLP(3 * 32 * 32, (16, 16), 5, batch_norm=True),
    "convnet28": lambda: models.convnet28(num_classes=5, in_channels=3, width=4),
    "resnet18-plif": lambda: models.resnet18(num_classes=5, width=4, neuron=partial(ParametricLIF, init_tau=2.0)),
    "vgg11-if-hard": lambda: models.vgg11(num_classes=5, width=4,
                                          neuron=partial(IF, v_reset=0.0, detach_reset=False, surrogate=ATan())),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_T1_rate_gradients_equal_bptt(name):
    model = ZOO[name]().double()
    bptt = copy.deepcopy(model)
    x = torch.rand(1, 3, 3, 32, 32, dtype=torch.float64) * 2
    y = torch.randint(0, 5, (3,))
    with inputs_unchanged(x):
        out = rc.transform(model)(x)
        assert out.shape == (1, 3, 5)
        F.cross_entropy(out.mean(0), y).backward()
    F.cross_entropy(bptt.train()(x).mean(0), y).backward()
    for (n, p), q in zip(model.named_parameters(), bptt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10, msg=n)


@pytest.mark.parametrize("name", ["resnet18", "vggsnn", "mlp"])
def test_zoo_trains_at_T4(name):
    model = ZOO[name]()
    tm = rc.transform(model)
    x = torch.rand(4, 2, 3, 32, 32)
    with inputs_unchanged(x):
        out = tm(x)
        assert out.shape == (4, 2, 5)
        F.cross_entropy(out.mean(0), torch.tensor([0, 1])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


def test_widths_and_dvs_variant():
    assert models.resnet18(width=16).layers[3][0].conv1.out_channels == 128
    assert models.resnet19(width=8).head[0].out_features == 64
    m = models.vggsnn(num_classes=10, in_channels=2, width=8, dvs=True)
    assert m(torch.rand(2, 1, 2, 48, 48)).shape == (2, 1, 10)
    assert models.convnet28(width=4).classifier.in_features == 8 * 49          # a 7×7 map of 2w channels
    assert models.convnet(width=4).classifier.in_features == 8 * 4
    m = models.ZOO["mlp"](num_classes=2, in_channels=8, width=2)                 # 8 features per step, 16 hidden
    assert m(torch.rand(5, 3, 8)).shape == (5, 3, 2) and m.hidden[0].fc.out_features == 16


def test_from_reference_spec_layouts():
    meta = {"arch": {"kind": "resnet", "blocks": [1, 1], "widths": [4, 8], "head": "resnet19"}, "in_channels": 2,
            "num_classes": 3, "decay": 0.3, "v_threshold": 0.7}
    m = models.from_reference_spec(meta)
    assert [tuple(p.shape) for p in m.parameters()] == [
        (4, 2, 3, 3), (4,), (4,), (4, 4, 3, 3), (4,), (4,), (4, 4, 3, 3), (4,), (4,),
        (8, 4, 3, 3), (8,), (8,), (8, 8, 3, 3), (8,), (8,), (8, 4, 1, 1), (8,), (8,),
        (16, 8), (16,), (3, 16), (3,)]
    assert isinstance(m.sn0, LIF) and m.sn0.decay == 0.3 and m.sn0.v_threshold == 0.7
    vgg = models.from_reference_spec({"arch": {"kind": "vgg", "feature": [4, "A", 8, "AA3"], "classifier": [72, 6, 3]},
                                      "in_channels": 1, "num_classes": 3, "decay": 0.2, "v_threshold": 1.0})
    assert vgg(torch.rand(2, 2, 1, 16, 16)).shape == (2, 2, 3)
    with pytest.raises(ValueError, match="unknown reference architecture"):
        models.from_reference_spec({**meta, "arch": {"kind": "transformer"}})
    with pytest.raises(ValueError, match="missing"):
        models.from_reference_spec({"arch": {"kind": "vgg"}})
    with pytest.raises(ValueError, match="unknown VGG feature entry"):
        models.SpikingVGG([4, "Z"], [4, 2])
