"""What every op does to time: its family (``table``), its time layout rule (``layout``) and its class
under rate-based backprop (``classify``).
"""
from .classify import APPROXIMATE, BATCHNORM, EXACT, HOOK, NEURON, REFUSED, STATE, STATIC, OpClass, classify
from .layout import Context, arg, is_module_state, output_layout
from .table import VIEW_FAMILIES, OpInfo, is_view, op_info

__all__ = ["OpInfo", "OpClass", "op_info", "is_view", "VIEW_FAMILIES", "output_layout", "classify", "Context", "arg", "is_module_state", "EXACT",
           "APPROXIMATE", "REFUSED", "STATIC", "NEURON", "BATCHNORM", "STATE", "HOOK"]
