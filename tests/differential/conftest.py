"""The differential suite's tally: cases per mode and outcome, printed at the end of the run."""
from __future__ import annotations

from collections import Counter

import pytest

#: (method, layout, input, streamed) -> Counter of outcomes.
TALLY = pytest.StashKey[dict]()
#: agree: equal in float32; tie / rounding: equal only in float64, with / without a membrane at the
#: threshold within float32 rounding; mismatch: a real difference.
OUTCOMES = ("agree", "tie", "rounding", "mismatch")


def pytest_configure(config):
    config.stash[TALLY] = {}


@pytest.fixture(scope="session")
def tally(request):
    """Record an outcome: ``tally(mode, outcome)`` with ``mode = (method, layout, input, streamed)``."""
    table = request.config.stash[TALLY]

    def record(mode, outcome):
        table.setdefault(mode, Counter())[outcome] += 1

    return record


def pytest_terminal_summary(terminalreporter, config):
    table = config.stash.get(TALLY, {})
    if not table:
        return
    tr = terminalreporter
    tr.section("differential cases: rc.transform against the reference")
    header = f"{'method':<7} {'layout':<6} {'input':<8} {'streamed':<8} {'cases':>5} " + \
        " ".join(f"{o:>8}" for o in OUTCOMES)
    tr.write_line(header)
    totals = Counter()
    for mode in sorted(table, key=lambda m: tuple(map(str, m))):
        counts = table[mode]
        totals.update(counts)
        method, layout, inp, streamed = mode
        tr.write_line(f"{method:<7} {layout:<6} {inp:<8} {streamed:<8} {sum(counts.values()):>5} " +
                      " ".join(f"{counts[o]:>8}" for o in OUTCOMES))
    tr.write_line(f"{'total':<32} {sum(totals.values()):>5} " + " ".join(f"{totals[o]:>8}" for o in OUTCOMES))
