"""Run in a subprocess with SpikingJelly 0.0.0.0.14 first on the path (``spikingjelly.clock_driven``, the
API of the rate-based paper's code; it cannot be installed beside 2.x): a multi-step net and a
single-step loop, unmodified, through ``rc.transform`` and ``torch.compile(backend="ratebp")`` (``*_compile_*``).
Prints one JSON object of comparisons:

- ``*_out``: max |ours − SpikingJelly's forward|;
- ``*_bptt``: max relative error of ``method="bptt"`` gradients against SpikingJelly's own autograd (the
  ``dropout`` net draws its MultiStepDropout mask from the same random numbers);
- ``*_rate``: max relative error of the rate-based gradients against those of the same network written
  with ``rc.nn`` neurons (SpikingJelly's LIF with v_reset = 0 is ``rc.nn.LIF(decay_input=True,
  v_reset=0.0, detach_reset=False)``).
"""
import copy
import json

import torch
from spikingjelly.clock_driven import functional, layer, neuron, surrogate

import ratebp_compile as rc

torch.manual_seed(0)
T, B = 4, 6


def multi_step():
    return torch.nn.Sequential(
        layer.SeqToANNContainer(torch.nn.Linear(5, 8)), neuron.MultiStepLIFNode(tau=2.0, detach_reset=True),
        layer.SeqToANNContainer(torch.nn.Linear(8, 3)), neuron.MultiStepIFNode(surrogate_function=surrogate.ATan()))


class SingleStepLoop(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.sn1 = torch.nn.Linear(5, 8), neuron.LIFNode(tau=2.0)
        self.fc2, self.sn2 = torch.nn.Linear(8, 3), neuron.ParametricLIFNode(init_tau=3.0)

    def forward(self, x):
        return torch.stack([self.sn2(self.fc2(self.sn1(self.fc1(x_t)))) for x_t in x])


def ours_equivalent(net):
    """The same network with rc.nn neurons (for the multi-step net)."""
    twin = torch.nn.Sequential(torch.nn.Linear(5, 8), rc.nn.LIF(tau=2.0, decay_input=True, v_reset=0.0,
                                                                detach_reset=True, surrogate=rc.nn.Sigmoid(4.0)),
                               torch.nn.Linear(8, 3), rc.nn.IF(v_reset=0.0, detach_reset=False,
                                                               surrogate=rc.nn.ATan(2.0)))
    twin[0].load_state_dict(net[0][0].state_dict())
    twin[2].load_state_dict(net[2][0].state_dict())
    return twin


def with_dropout():
    return torch.nn.Sequential(
        layer.SeqToANNContainer(torch.nn.Linear(5, 8)), neuron.MultiStepLIFNode(tau=2.0),
        layer.MultiStepDropout(0.3), layer.SeqToANNContainer(torch.nn.Linear(8, 3)), neuron.MultiStepIFNode())


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def rel(a, b):
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-6)).item() for x, y in zip(a, b))


def main():
    x = torch.rand(T, B, 5) * 2.5
    results = {}
    for name, build in (("multi", multi_step), ("single", SingleStepLoop), ("dropout", with_dropout)):
        net = build()
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.abs_().mul_(1.5)
        peer = copy.deepcopy(net)
        functional.reset_net(peer)
        torch.manual_seed(1)                          # the same dropout mask for both
        expected = peer(x)
        expected.square().sum().backward()
        torch.manual_seed(1)
        out = rc.transform(net, method="bptt")(x)
        out.square().sum().backward()
        results[f"{name}_out"] = (out - expected).abs().max().item()
        results[f"{name}_bptt"] = rel(grads(net), grads(peer))
        results[f"{name}_fires"] = expected.mean().item()
        net.zero_grad()                               # the same through torch.compile(backend="ratebp")
        torch._dynamo.reset()
        functional.reset_net(net)
        torch.manual_seed(1)
        out = torch.compile(net, backend="ratebp", options={"compiler": "eager", "method": "bptt"})(x)
        out.square().sum().backward()
        results[f"{name}_compile_out"] = (out - expected).abs().max().item()
        results[f"{name}_compile_bptt"] = rel(grads(net), grads(peer))
        if name == "multi":
            net.zero_grad()
            rc.transform(net)(x).square().sum().backward()
            twin = ours_equivalent(net)
            rc.transform(twin)(x).square().sum().backward()
            results["multi_rate"] = rel(grads(net), grads(twin))
            net.zero_grad()
            torch._dynamo.reset()
            torch.compile(net, backend="ratebp", options={"compiler": "eager"})(x).square().sum().backward()
            results["multi_compile_rate"] = rel(grads(net), grads(twin))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
