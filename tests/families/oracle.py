"""The test oracle of every closed-form eligibility: the generic engine, forward-mode AD through the
family's own ``step`` (``Family.scan``)."""
import torch

from ratebp_compile.families import Family
from tests.conftest import assert_close


def assert_closed_form_is_forward_mode_ad(dyn, params, x, chunks):
    """``dyn``'s closed-form scan over ``x`` split into ``chunks`` equals the generic engine chunk by chunk
    (spikes exactly; r, e and each parameter's per-element eligibility to the dtype's tolerance); returns
    the closed form's spikes."""
    closed, generic, parts = None, None, []
    for chunk in x.split(chunks):
        s_c, closed = dyn.scan(chunk, closed, params)
        s_g, generic = Family.scan(dyn, chunk, generic, params)
        assert torch.equal(s_c, s_g)
        parts.append(s_c)
    for ours, theirs in zip(dyn.finish(closed, params, x.dtype), Family.finish(dyn, generic, params, x.dtype)):
        assert_close(ours, theirs)
    return torch.cat(parts)
