"""ratebp_compile: train spiking neural networks with rate-based backpropagation, by compilation.

    import ratebp_compile as rc
    model = rc.transform(snn)        # same parameters; train mode runs the rate-based training step
    print(rc.show(model))            # the captured and rewritten graphs
    opt = torch.compile(snn, backend="ratebp")     # the same step through torch.compile
"""
from . import backend, models, nn
from .errors import ApproximationWarning, RateBPError, RecompileWarning
from .runtime import RateBPModule, transform
from .show import show

__all__ = ["transform", "show", "RateBPModule", "RateBPError", "ApproximationWarning", "RecompileWarning", "nn",
           "models", "backend"]
__version__ = "0.1.0"
