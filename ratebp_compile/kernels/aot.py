"""Compile every Triton kernel for GPU targets, without a GPU: a kernel that would not compile on a GPU
fails here (CI runs this through tests/kernels/test_compile_targets.py).

    python -m ratebp_compile.kernels.aot --arch 80 90

Each kernel is compiled (to a cubin) in variants chosen so that every value of every compile-time flag,
every supported input dtype, uint8 spikes, both integer widths of the sizes, both the unrolled
and the runtime time loop, and the resumable scan over a chunk of time appear at least once. Must
run without ``TRITON_INTERPRET``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, Iterator, List, Tuple

__all__ = ["variants", "compile_all"]

_PTR = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16", "u8": "*u8"}

# (x dtype, spike dtype, size ints, T_STATIC, DECAY_LOGIT, DECAY_INPUT, HARD_RESET, DETACH_RESET, SURROGATE,
#  STRICT, DELAYED_RESET, mode) — mode: "spike" (r, e), "spike+tangent" (r, e, e_λ), "bptt" (h), "scan" and
#  "scan+tangent" (the spike pass over a chunk of time: loop state in and out). A delayed reset is detached.
_FORWARD = [
    ("fp32", "fp32", "i32", 4, False, False, False, True, 0, False, False, "spike"),
    ("fp16", "u8", "i64", 0, True, True, True, False, 1, True, False, "spike+tangent"),
    ("bf16", "bf16", "i32", 4, True, False, True, True, 2, False, True, "bptt"),
    ("fp32", "u8", "i64", 0, False, True, False, False, 3, False, False, "bptt"),
    ("bf16", "u8", "i32", 16, True, True, False, True, 0, True, True, "spike+tangent"),
    ("fp32", "u8", "i32", 8, False, False, False, True, 0, True, True, "scan"),
    ("fp16", "u8", "i64", 0, True, True, True, False, 1, False, False, "scan+tangent"),
    ("fp32", "u8", "i32", 4, False, False, True, True, 1, True, True, "spike"),
]
# (x dtype, size ints, T_STATIC, DECAY_LOGIT, DECAY_INPUT, HARD_RESET, DETACH_RESET, SURROGATE, STRICT,
#  DELAYED_RESET, DECAY_GRAD)
_BACKWARD = [
    ("fp32", "i32", 4, False, False, False, True, 0, True, True, False),
    ("fp16", "i64", 0, True, True, True, False, 1, False, False, True),
    ("bf16", "i32", 4, True, False, True, True, 2, True, True, True),
    ("fp32", "i64", 0, True, True, False, True, 3, False, True, True),
]


def variants() -> Iterator[Tuple[str, object, Dict[str, str], Dict[str, object]]]:
    """(name, kernel, signature, constexprs) for every variant to compile."""
    from . import lif

    for x, s, ints, t_static, logit, din, hard, det, sg, strict, delayed, mode in _FORWARD:
        signature = {"X": _PTR[x], "DECAY": "*fp32", "S": _PTR[s], "H": "*fp32", "R": _PTR[x], "E": _PTR[x],
                     "EL": _PTR[x], "STATE": "*fp32", "N": ints, "T": ints, "decay": "fp32", "v_threshold": "fp32",
                     "v_reset": "fp32", "width": "fp32"}
        constexprs = dict(T_STATIC=t_static, DECAY_LOGIT=logit, DECAY_INPUT=din, HARD_RESET=hard,
                          DETACH_RESET=det, SURROGATE=sg, STRICT=strict, DELAYED_RESET=delayed,
                          WRITE_H=mode == "bptt", WRITE_STATS=mode != "bptt",
                          DECAY_TANGENT=mode.endswith("+tangent"), STATEFUL=mode.startswith("scan"),
                          BLOCK=lif.BLOCK_SIZE)
        yield f"_lif_forward_kernel[{x}->{s},{mode},T={t_static or 'dyn'},sg={sg},strict={strict}," \
            f"delayed={delayed}]", lif._lif_forward_kernel, signature, constexprs
    for x, ints, t_static, logit, din, hard, det, sg, strict, delayed, decay_grad in _BACKWARD:
        signature = {"GS": _PTR[x], "H": "*fp32", "X": _PTR[x], "DECAY": "*fp32", "GX": _PTR[x], "GLAM": "*fp32",
                     "N": ints, "T": ints, "decay": "fp32", "v_threshold": "fp32", "v_reset": "fp32",
                     "width": "fp32"}
        constexprs = dict(T_STATIC=t_static, DECAY_LOGIT=logit, DECAY_INPUT=din, HARD_RESET=hard,
                          DETACH_RESET=det, SURROGATE=sg, STRICT=strict, DELAYED_RESET=delayed,
                          DECAY_GRAD=decay_grad, BLOCK=lif.BLOCK_SIZE)
        yield f"_lif_backward_kernel[{x},T={t_static or 'dyn'},sg={sg},strict={strict},delayed={delayed}," \
            f"decay_grad={decay_grad}]", lif._lif_backward_kernel, signature, constexprs


def compile_all(archs: List[int]) -> List[str]:
    """Compile every variant for each compute capability in ``archs``; returns one line per compile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import lif

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    lines = []
    for arch in archs:
        for name, kernel, signature, constexprs in variants():
            for key in constexprs:
                signature[key] = "constexpr"
            start = time.perf_counter()
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", arch, 32), options={"num_warps": lif.NUM_WARPS})
            lines.append(f"sm_{arch} {name}: {len(compiled.asm['cubin'])} bytes of cubin "
                         f"in {time.perf_counter() - start:.1f} s")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    args = parser.parse_args(argv)
    for line in compile_all(args.arch):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
