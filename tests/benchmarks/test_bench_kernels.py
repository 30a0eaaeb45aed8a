"""The kernel benchmark runs end to end (tiny sizes, CPU): its op calls match the ops' schemas."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_kernels_runs_and_writes_json(tmp_path):
    out = tmp_path / "kernels.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--T", "2", "--N", "6",
                           "--dtype", "float32", "--reps", "1", "--json", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["T"] == 2 and row["N"] == 64
    assert all(row[k] > 0 for k in ("fused_spike_ms", "eager_spike_ms", "fused_bptt_ms", "eager_bptt_ms"))
