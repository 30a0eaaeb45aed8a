"""Errors and warnings raised by ratebp_compile, and helpers that point them at the user's code."""
from __future__ import annotations

import os
import re
from typing import Optional

import torch.fx

__all__ = ["RateBPError", "ApproximationWarning", "RecompileWarning", "user_frame", "describe_node"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_MODELS_DIR = os.path.join(_PACKAGE_DIR, "models")   # the model zoo is user code as far as errors go
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.fx.__file__)).rsplit(os.sep, 1)[0]
_FRAME_RE = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)\n(?P<code>[^\n]*)')


class RateBPError(RuntimeError):
    """A model, an input or an option that ratebp_compile cannot handle.

    The message names the module or op and, where known, the line of the user's source that produced it.
    The user's model and data are left as they were.
    """


class ApproximationWarning(UserWarning):
    """An op on time-varying tensors that the rate pass can only approximate (max pooling, a
    non-linear activation, a product of two time-varying tensors, ...)."""


class RecompileWarning(UserWarning):
    """A transformed model is compiled again and again (its inputs' shapes, its configuration or the
    values of non-tensor arguments keep changing)."""


def _is_library_file(path: str) -> bool:
    path = os.path.abspath(path)
    if path.startswith(_MODELS_DIR + os.sep):
        return False
    return path.startswith(_PACKAGE_DIR + os.sep) or path.startswith(_TORCH_DIR + os.sep)


def user_frame(stack_trace: Optional[str]) -> Optional[str]:
    """The innermost frame of ``stack_trace`` (an fx node's, or a formatted traceback) that is the
    user's code rather than torch's or ours, as ``"file.py:12 in forward: y = self.pool(x)"``."""
    if not stack_trace:
        return None
    frames = [m for m in _FRAME_RE.finditer(stack_trace) if not _is_library_file(m["file"])]
    if not frames:
        return None
    m = frames[-1]
    return f'{m["file"]}:{m["line"]} in {m["func"]}: {m["code"].strip()}'


def dynamo_module_path(name: str) -> str:
    """A module's path in the model from the name of Dynamo's source for it (``L['self'].layers[0].sn`` or
    ``L['self']._modules['layers']._modules['0'].sn`` → ``layers.0.sn``)."""
    path = re.sub(r"^L\['[^']*'\]\.?", "", name)
    path = re.sub(r"\[(\d+)\]", r".\1", path).replace("_modules['", "").replace("']", "")
    return path.strip(".")


def describe_node(node: torch.fx.Node, gm: Optional[torch.fx.GraphModule] = None) -> str:
    """A short, human-readable name for ``node``: the module path and class for module calls,
    the function or method otherwise, followed by the user's source line when it is known."""
    if node.op == "call_module":
        what = f"module '{node.meta.get('ratebp.module_path', node.target)}'"
        if gm is not None:
            try:
                what += f" ({type(gm.get_submodule(node.target)).__name__})"
            except AttributeError:
                pass
    elif node.op == "call_method":
        what = f"method '.{node.target}()'"
    elif node.op == "call_function":
        what = f"function '{getattr(node.target, '__name__', node.target)}'"
    else:
        what = f"{node.op} '{node.target}'"
    where = user_frame(node.stack_trace) or node.meta.get("ratebp.source")
    return f"{what} at {where}" if where else what
