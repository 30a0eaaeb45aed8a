"""Training-step time of other libraries' networks through ``rc.transform``: rate-based vs BPTT, and the
library's own BPTT, in one process (medians); and the rate-based step through
``torch.compile(model, backend="ratebp")`` (``--compiler none`` leaves it out).

    python benchmarks/bench_peers.py [--T 16] [--batch-size 32] [--reps 7] [--threads 2] [--compiler inductor]

The same two-layer MLP (256 → 512 → 10) in each library, as its tutorials write it: snnTorch ``Leaky``
with the membrane passed through the loop, Norse ``LIFCell`` called step by step, SpikingJelly
multi-step ``LIFNode``. Needs the three libraries (``pip install --no-deps``; see scripts/test.sh).
"""
from __future__ import annotations

import argparse

import torch
from timing import median_seconds

import ratebp_compile as rc


def _snntorch():
    import snntorch as snn

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.lif1 = torch.nn.Linear(256, 512), snn.Leaky(beta=0.9)
            self.fc2, self.lif2 = torch.nn.Linear(512, 10), snn.Leaky(beta=0.9)

        def forward(self, x):
            mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
            out = []
            for t in range(x.shape[0]):
                spk1, mem1 = self.lif1(self.fc1(x[t]), mem1)
                spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
                out.append(spk2)
            return torch.stack(out)
    return Net(), None


def _norse():
    import norse.torch as norse

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.lif1 = torch.nn.Linear(256, 512), norse.LIFCell()
            self.fc2, self.lif2 = torch.nn.Linear(512, 10), norse.LIFCell()

        def forward(self, x):
            s1 = s2 = None
            out = []
            for x_t in x:
                z1, s1 = self.lif1(self.fc1(x_t) * 10, s1)
                z2, s2 = self.lif2(self.fc2(z1) * 10, s2)
                out.append(z2)
            return torch.stack(out)
    return Net(), None


def _spikingjelly():
    from spikingjelly.activation_based import functional, layer, neuron

    net = torch.nn.Sequential(layer.Linear(256, 512), neuron.LIFNode(step_mode="m"),
                              layer.Linear(512, 10), neuron.LIFNode(step_mode="m"))
    return net, functional.reset_net


LIBRARIES = {"snnTorch Leaky": _snntorch, "Norse LIFCell": _norse, "SpikingJelly LIFNode": _spikingjelly}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compiler", choices=["inductor", "aot_eager", "eager", "none"], default="inductor",
                        help="the backend's compiler for the torch.compile column (none: no such column)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.rand(args.T, args.batch_size, 256) * 2
    compiled = args.compiler != "none"
    print("| network | rate-based ms | our BPTT ms | its own BPTT ms | rate-based / its BPTT |" +
          (" rate-based, torch.compile ms | / its BPTT |" if compiled else ""))
    print("|---|---|---|---|---|" + ("---|---|" if compiled else ""))
    for name, build in LIBRARIES.items():
        try:
            build()
        except ImportError as e:
            print(f"| {name} | not installed ({e.name}) | | | |" + (" | |" if compiled else ""))
            continue
        row = {}
        for method in ("ratebp", "bptt"):
            model, _ = build()
            step = rc.transform(model, method=method)
            row[method] = median_seconds(lambda: (model.zero_grad(), step(x).sum().backward()), args.reps)
        model, reset = build()

        def own():
            model.zero_grad()
            if reset is not None:
                reset(model)
            model(x).sum().backward()
        row["own"] = median_seconds(own, args.reps)
        line = f"| {name} | {1e3 * row['ratebp']:.1f} | {1e3 * row['bptt']:.1f} | {1e3 * row['own']:.1f} | " \
               f"{row['ratebp'] / row['own']:.2f} |"
        if compiled:
            model, reset = build()
            torch._dynamo.reset()
            step = torch.compile(model, backend="ratebp", options={"compiler": args.compiler})

            def compiled_step():
                model.zero_grad()
                if reset is not None:                     # SpikingJelly's neurons keep the last membrane
                    reset(model)
                step(x).sum().backward()
            compiled_step()                               # compiles
            seconds = median_seconds(compiled_step, args.reps)
            line += f" {1e3 * seconds:.1f} | {seconds / row['own']:.2f} |"
        print(line)


if __name__ == "__main__":
    main()
