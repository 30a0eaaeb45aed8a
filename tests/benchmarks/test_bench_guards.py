"""The guard benchmark runs end to end (a tiny model, CPU) and reports the lookup against the step."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_guards_runs_and_writes_json(tmp_path):
    out = tmp_path / "guards.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_guards.py"), "--width", "2",
                           "--batch-size", "2", "--T", "2", "--steps", "1", "--lookups", "5", "--json", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["step_ms"] > 0 and 0 < figures["lookup_us"] and 0 < figures["lookup_fraction_of_step"] < 1
    assert figures["guarded"]["neurons"] == 17
