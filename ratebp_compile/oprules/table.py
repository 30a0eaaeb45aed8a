"""The op table: which family every op belongs to, and whether it is linear.

Each call node of a captured graph resolves to an :class:`OpInfo` (an op *family* — how the op treats
dimensions — and whether it is affine in each tensor operand). Names resolve to ``torch.<name>``,
``torch.nn.functional.<name>``, ``operator.<name>`` and the Tensor method ``<name>``, whichever exist;
module classes map to the family of their op.
"""
from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..nn.spec import FinalMembrane, StateTrace

__all__ = ["OpInfo", "op_info", "is_inplace_method"]


@dataclass(frozen=True)
class OpInfo:
    """family: how the op treats dimensions; name: a short canonical op name; linear: the op is
    affine in each tensor operand (so time averaging commutes with it)."""

    family: str
    name: str
    linear: bool = False



# ---------------------------------------------------------------------------------------------
# The op table. Names resolve to torch.<name>, torch.nn.functional.<name>, operator.<name> and the
# Tensor method <name>, whichever exist.
_FAMILIES: Dict[str, Dict[str, bool]] = {
    # unary, elementwise, time-local
    "pointwise": {**{n: True for n in (
        "neg", "negative", "positive", "clone", "detach", "contiguous", "float", "double", "half", "bfloat16", "to",
        "type",
        "type_as", "alias", "identity", "real", "conj")},
        **{n: False for n in (
            "relu", "relu_", "relu6", "sigmoid", "tanh", "gelu", "silu", "mish", "elu", "selu", "celu", "leaky_relu",
            "softplus", "softsign", "hardtanh", "hardswish", "hardsigmoid", "hardshrink", "softshrink", "tanhshrink",
            "logsigmoid", "threshold", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "abs", "sqrt",
            "rsqrt", "square", "clamp", "clip", "clamp_min", "clamp_max", "sign", "sgn", "sin", "cos", "tan",
            "floor", "ceil", "round", "trunc", "frac", "reciprocal", "erf", "erfc", "logit", "nan_to_num",
            "logical_not", "bitwise_not", "isnan", "isfinite", "heaviside", "prelu", "rrelu", "glu")}},
    # random elementwise
    "dropout": {n: False for n in ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
                                   "feature_alpha_dropout")},
    # two or more tensor operands, broadcast
    "binary": {**{n: True for n in ("add", "sub", "subtract", "rsub", "radd", "iadd", "isub")},
               **{n: False for n in ("pow", "maximum", "minimum", "fmax", "fmin", "where", "gt", "lt", "ge", "le",
                                     "eq", "ne", "floordiv", "floor_divide", "remainder", "fmod", "mod",
                                     "atan2", "logical_and", "logical_or", "logical_xor", "and_", "or_", "xor",
                                     "lerp", "addcmul", "addcdiv", "masked_fill", "hypot")}},
    "mul": {n: True for n in ("mul", "multiply", "imul")},
    "div": {n: True for n in ("div", "divide", "truediv", "true_divide", "itruediv")},
    # dimension 0 is the batch: time must live there
    "batch_first": {**{n: True for n in (
        "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "avg_pool1d",
        "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
        "interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "pixel_shuffle", "pixel_unshuffle",
        "channel_shuffle", "pad")},
        **{n: False for n in (
            "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
            "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d", "lp_pool3d", "group_norm", "instance_norm",
            "local_response_norm", "fractional_max_pool2d", "fractional_max_pool3d")}},
    # the last dimension holds features: time must not
    "feature_last": {"linear": True, "bilinear": False},
    "layer_norm": {"layer_norm": False, "rms_norm": False},
    "softmax": {n: False for n in ("softmax", "log_softmax", "softmin")},
    "reduce": {**{n: True for n in ("mean", "sum", "nansum", "nanmean")},
               **{n: False for n in ("amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod",
                                     "argmax", "argmin", "all", "any", "median", "var_mean", "std_mean")}},
    "reshape": {n: True for n in ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
                                  "reshape_as", "ravel")},
    "permute": {n: True for n in ("permute", "transpose", "t", "movedim", "moveaxis", "swapaxes", "swapdims",
                                  "transpose_")},
    "broadcast": {n: True for n in ("expand", "expand_as", "repeat", "broadcast_to", "tile")},
    "getitem": {"getitem": True},
    "split": {n: True for n in ("split", "chunk", "unbind", "tensor_split", "split_with_sizes")},
    "cat": {n: True for n in ("cat", "concat", "concatenate")},
    "stack": {"stack": True},
    "like": {**{n: True for n in ("zeros_like", "ones_like", "empty_like", "full_like", "new_zeros", "new_ones",
                                  "new_empty", "new_full")},
             **{n: False for n in ("rand_like", "randn_like", "randint_like", "bernoulli")}},
    "matmul": {n: True for n in ("matmul", "mm", "bmm")},
    # results that are not tensors of the computation (shapes, dtypes, ...)
    "meta": {n: True for n in ("size", "dim", "numel", "ndimension", "nelement", "getattr", "is_contiguous",
                               "is_floating_point", "get_device", "element_size")},
}

_MODULES: Sequence[Tuple[type, OpInfo]] = (
    (nn.Identity, OpInfo("pointwise", "identity", True)),
    (nn.Flatten, OpInfo("reshape", "flatten", True)),
    (nn.Unflatten, OpInfo("reshape", "unflatten", True)),
    (nn.modules.conv._ConvNd, OpInfo("batch_first", "conv", True)),
    (nn.modules.pooling._AvgPoolNd, OpInfo("batch_first", "avg_pool", True)),
    (nn.modules.pooling._AdaptiveAvgPoolNd, OpInfo("batch_first", "adaptive_avg_pool", True)),
    (nn.modules.pooling._MaxPoolNd, OpInfo("batch_first", "max_pool", False)),
    (nn.modules.pooling._AdaptiveMaxPoolNd, OpInfo("batch_first", "adaptive_max_pool", False)),
    (nn.modules.pooling._LPPoolNd, OpInfo("batch_first", "lp_pool", False)),
    (nn.Upsample, OpInfo("batch_first", "upsample", True)),
    (nn.PixelShuffle, OpInfo("batch_first", "pixel_shuffle", True)),
    (nn.PixelUnshuffle, OpInfo("batch_first", "pixel_unshuffle", True)),
    (nn.modules.padding._ConstantPadNd, OpInfo("batch_first", "pad", True)),
    (nn.modules.padding._ReflectionPadNd, OpInfo("batch_first", "pad", True)),
    (nn.modules.padding._ReplicationPadNd, OpInfo("batch_first", "pad", True)),
    (nn.GroupNorm, OpInfo("batch_first", "group_norm", False)),
    (nn.modules.instancenorm._InstanceNorm, OpInfo("batch_first", "instance_norm", False)),
    (nn.LocalResponseNorm, OpInfo("batch_first", "local_response_norm", False)),
    (nn.modules.batchnorm._BatchNorm, OpInfo("batchnorm", "batch_norm", True)),
    (nn.Linear, OpInfo("feature_last", "linear", True)),
    (nn.Bilinear, OpInfo("feature_last", "bilinear", False)),
    (nn.LayerNorm, OpInfo("layer_norm", "layer_norm", False)),
    (nn.RMSNorm, OpInfo("layer_norm", "rms_norm", False)),
    (nn.Softmax, OpInfo("softmax", "softmax", False)),
    (nn.LogSoftmax, OpInfo("softmax", "log_softmax", False)),
    (nn.Softmin, OpInfo("softmax", "softmin", False)),
    (nn.modules.dropout._DropoutNd, OpInfo("dropout", "dropout", False)),
    *[(getattr(nn, n), OpInfo("pointwise", n.lower(), False)) for n in (
        "ReLU", "ReLU6", "Sigmoid", "Tanh", "GELU", "SiLU", "Mish", "ELU", "SELU", "CELU", "LeakyReLU", "Softplus",
        "Softsign", "Hardtanh", "Hardswish", "Hardsigmoid", "Hardshrink", "Softshrink", "Tanhshrink",
        "LogSigmoid", "Threshold", "PReLU", "RReLU", "GLU")],
)


def _build_function_table() -> Tuple[Dict[Any, OpInfo], Dict[str, OpInfo]]:
    functions: Dict[Any, OpInfo] = {}
    methods: Dict[str, OpInfo] = {}
    for family, names in _FAMILIES.items():
        for name, linear in names.items():
            info = OpInfo(family, name.rstrip("_") or name, linear)
            methods.setdefault(name, info)
            for namespace in (torch, F, operator, torch.Tensor, torch.special):
                fn = getattr(namespace, name, None)
                if fn is not None and callable(fn):
                    functions.setdefault(fn, info)
    functions[builtins.getattr] = OpInfo("meta", "getattr", True)
    functions[operator.pos] = OpInfo("pointwise", "positive", True)
    functions[torch.einsum] = OpInfo("einsum", "einsum", False)
    # BatchNorm only in the forms batchnorm_parts reads (torch.batch_norm orders its arguments differently)
    functions[F.batch_norm] = OpInfo("batchnorm", "batch_norm", True)
    from ..graph_ops import per_step_batch_norm, sync_batch_norm
    from ..kernels.lif_cell import final_membrane
    functions[per_step_batch_norm] = OpInfo("batchnorm", "per_step_batch_norm", True)
    functions[sync_batch_norm] = OpInfo("batchnorm", "sync_batch_norm", True)
    functions[final_membrane] = OpInfo("state", "final_membrane", False)
    from ..graph_ops import dropout_mask
    functions[dropout_mask] = OpInfo("shared_mask", "dropout_mask", False)
    return functions, methods


_FUNCTIONS, _METHODS = _build_function_table()
_FINAL_MEMBRANE = OpInfo("state", "final_membrane", False)
_STATE_TRACE = OpInfo("state_trace", "state_trace", False)


#: The families whose ops return a view of their first argument (no memory of their own).
VIEW_FAMILIES = ("reshape", "permute", "getitem", "split")


def is_view(node: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    """Whether a call node returns a view of its first argument (and does not write into it)."""
    info = op_info(node, gm) if node.op in ("call_function", "call_method") else None
    return info is not None and info.family in VIEW_FAMILIES and not is_inplace_method(node)


def is_inplace_method(node: torch.fx.Node) -> bool:
    return node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__")


def op_info(node: torch.fx.Node, gm: torch.fx.GraphModule) -> Optional[OpInfo]:
    """The :class:`OpInfo` of a call node, or None for an op the table does not know."""
    if node.op == "call_function":
        if isinstance(node.target, FinalMembrane):
            return _FINAL_MEMBRANE
        if isinstance(node.target, StateTrace):
            return _STATE_TRACE
        try:
            return _FUNCTIONS.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        info = _METHODS.get(node.target)
        if info is None and is_inplace_method(node):
            info = _METHODS.get(node.target[:-1])      # x.add_(y) treats time like x.add(y)
        return info
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        for cls, info in _MODULES:
            if isinstance(module, cls):
                return info
    return None

