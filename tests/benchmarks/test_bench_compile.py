"""The compiled-against-eager benchmark runs end to end (a small network, streamed, CPU; AOTAutograd without
Inductor, which other tests compile with) and writes its record."""
import functools
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_compile.py"


@functools.cache
def _script():
    """The benchmark script as a module, loaded from its path once."""
    spec = importlib.util.spec_from_file_location("bench_compile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bootstrap_interval_brackets_the_median():
    values = [0.9, 0.95, 1.0, 0.92, 0.97, 0.93, 0.96]
    bootstrap_median = _script().bootstrap_median
    low, high = bootstrap_median(values)
    assert min(values) <= low <= 0.95 <= high <= max(values) and low < high
    assert bootstrap_median([0.9] * 5) == [0.9, 0.9]


def test_bench_compile_runs_and_writes_json(tmp_path):
    out = tmp_path / "compile.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", "convnet", "--compiler", "aot_eager",
                           "--width", "2", "--batch-size", "2", "--T", "4", "--time-chunk", "2", "--warmup", "0",
                           "--rounds", "3", "--json", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["compiler"] == "aot_eager"
    (result,) = record["results"]
    assert result["spike_pass"].startswith("in chunks of at most 2")
    assert len(result["ratios"]) == 3 and result["ratio_95"][0] <= result["ratio_median"] <= result["ratio_95"][1]
    for step in ("eager_ms", "compiled_ms"):
        assert 0 < result[step]["spike"] < result[step]["total"] and 0 < result[step]["rest"] < result[step]["total"]
