"""``cpu_memory``: a CPU step keeps the memory it frees for the next step. Each case runs in a fresh process
(the malloc settings belong to the process): a freed 48 MiB tensor is mapped and faulted in again on every
allocation under glibc's defaults and not after ``keep_freed``; ``RATEBP_KEEP_CPU_MEMORY=0`` leaves malloc
alone; a CPU step applies its memory budget and says so in ``show``; a second call never keeps less."""
import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="malloc's thresholds are glibc's")

_FAULTS = """
import json, resource, sys, torch
from ratebp_compile import cpu_memory

def faults():
    counts = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.empty(12 * 2 ** 20)       # 48 MiB: over glibc's largest dynamic mmap threshold (32 MiB)
        t.fill_(1.0)
        del t
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return counts[1:]                       # after the first allocation

result = {"before": faults()}
"""


def _run(code: str, env=None) -> dict:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_keep_freed_stops_the_faults_and_never_keeps_less():
    result = _run(_FAULTS + """
result["said"] = cpu_memory.keep_freed(2 ** 30)
result["after"] = faults()
result["kept"] = cpu_memory.kept_bytes()
cpu_memory.keep_freed(100 * 2 ** 20)
result["kept_after_less"] = cpu_memory.kept_bytes()
print(json.dumps(result))
""")
    pages = 48 * 2 ** 20 // 4096
    assert all(n >= pages // 2 for n in result["before"]), result     # mapped anew each time
    # kept: the heap grows to hold the tensor at most once (where it lands depends on what else the process
    # holds), and every later allocation reuses those pages
    assert sum(result["after"]) < pages + pages // 100, result
    assert result["kept"] == result["kept_after_less"] == 2 ** 30
    assert result["said"] == "freed memory kept for the next step, up to 1.0 GiB (malloc's trim and mmap thresholds)"


def test_the_environment_variable_leaves_malloc_alone():
    result = _run(_FAULTS + """
result["said"] = cpu_memory.keep_freed(2 ** 30)
result["after"] = faults()
result["kept"] = cpu_memory.kept_bytes()
print(json.dumps(result))
""", env={"RATEBP_KEEP_CPU_MEMORY": "0"})
    pages = 48 * 2 ** 20 // 4096
    assert all(n >= pages // 2 for n in result["after"]), result
    assert result["kept"] == 0 and result["said"] == "malloc left as it is (RATEBP_KEEP_CPU_MEMORY=0)"


def test_a_cpu_step_keeps_its_memory_budget_and_show_says_so():
    """The budget in bytes is what is kept; a budget under glibc's own 64 MiB keeps 64 MiB; the training
    step still leaves its input unchanged."""
    result = _run("""
import json, torch
import ratebp_compile as rc
from ratebp_compile import cpu_memory, models
from ratebp_compile.program import CPU_MEMORY
result = {"kept_at_import": cpu_memory.kept_bytes()}
x = torch.rand(3, 2, 3, 16, 16)
before = x.clone()
tm = rc.transform(models.resnet18(width=4), memory_budget=300 * 2 ** 20)
tm(x).mean(0).sum().backward()
result["unchanged"] = torch.equal(x, before)
result["kept"] = cpu_memory.kept_bytes()
result["meta"] = tm.compiled.step.meta[CPU_MEMORY]
result["show"] = rc.show(tm, "memory").splitlines()[-1]
rc.transform(models.resnet18(width=4), memory_budget=2 ** 20, example_inputs=[x])
result["kept_small_budget"] = cpu_memory.kept_bytes()
print(json.dumps(result))
""")
    assert result["kept_at_import"] == 0                           # nothing changes until a CPU step is built
    assert result["unchanged"]
    assert result["kept"] == result["kept_small_budget"] == 300 * 2 ** 20
    assert result["meta"] == "freed memory kept for the next step, up to 300 MiB (malloc's trim and mmap thresholds)"
    assert result["show"] == f"CPU: {result['meta']}."
    small = _run("""
import json
from ratebp_compile import cpu_memory
cpu_memory.keep_freed(2 ** 20)
print(json.dumps({"kept": cpu_memory.kept_bytes()}))
""")
    assert small["kept"] == 64 * 2 ** 20
