"""Mixed precision: how far each method's gradients move from its own float32 gradients under ``torch.autocast``.

    python benchmarks/bench_amp.py                    # CPU: bfloat16 and float16 autocast
    python benchmarks/bench_amp.py --device cuda

For zoo models on one random batch (the same for every run): the gradient of the cross-entropy of the
time-mean logits with every parameter, in float32 and under autocast to bfloat16 / float16, for the
rate-based step (``transform``) and for BPTT (the same capture, ``method="bptt"``). Reported per model and
method: the relative L2 error of the whole gradient under autocast against the same method in float32, and
the cosine of the angle between the two; and, for scale, the same for a float32 step whose input alone was
rounded to bfloat16 (how sensitive the network's gradient is to a perturbation of that size).
The rate-based step is "no further off than BPTT" when its error is at most BPTT's.
"""
from __future__ import annotations

import argparse
import copy
import json

import torch
import torch.nn.functional as F

import ratebp_compile as rc
from ratebp_compile import models

MODELS = (("convnet", 1, 8), ("vgg11", 3, 32), ("resnet18", 3, 32))      # (zoo name, channels, image size)


def gradient(model, x, y, method, dtype):
    model = copy.deepcopy(model)
    step = rc.transform(model, method=method)
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = F.cross_entropy(step(x).mean(0).float(), y)
    loss.backward()
    return torch.cat([p.grad.flatten().float() for p in model.parameters()])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--json")
    args = p.parse_args()
    device = torch.device(args.device)
    rows = []
    for name, channels, size in MODELS:
        torch.manual_seed(0)
        model = models.ZOO[name](num_classes=10, in_channels=channels, width=args.width).to(device)
        x = torch.rand(args.T, args.batch_size, channels, size, size, device=device)
        y = torch.randint(0, 10, (args.batch_size,), device=device)
        for method in ("ratebp", "bptt"):
            reference = gradient(model, x, y, method, None)
            for label, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32, input rounded to bf16", None)):
                inputs = x.bfloat16().float() if dtype is None else x
                g = gradient(model, inputs, y, method, dtype)
                error = float((g - reference).norm() / reference.norm())
                cosine = float(torch.nn.functional.cosine_similarity(g, reference, dim=0))
                rows.append({"model": name, "method": method, "amp": label, "relative_error": error, "cosine": cosine})
                print(f"{name:<9} {method:<7} {label}: relative gradient error {error:.4f}, cosine {cosine:.3f}",
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "config": vars(args), "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
