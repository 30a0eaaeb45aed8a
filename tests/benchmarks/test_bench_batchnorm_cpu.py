"""The BatchNorm benchmark runs end to end (a tiny shape) and writes its record."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_batchnorm_cpu_runs_and_writes_json(tmp_path):
    out = tmp_path / "bn.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_batchnorm_cpu.py"), "--shapes", "4x3x8x8",
                           "--threads", "1", "--reps", "1", "--json", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["layout"] for row in rows] == ["contiguous", "channels_last"]
    for row in rows:
        assert row["shape"] == [4, 3, 8, 8] and row["native_ms"] > 0 and row["kernel_ms"] > 0
        assert row["max_abs_diff"] < 1e-4
