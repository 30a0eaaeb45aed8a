"""The peer-library benchmark runs end to end (tiny sizes, CPU) and prints one row per library."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_bench_peers_prints_a_row_per_library():
    for library in ("snntorch", "norse", "spikingjelly"):
        pytest.importorskip(library)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_peers.py"), "--T", "2", "--batch-size",
                           "2", "--reps", "1", "--compiler", "eager"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["snnTorch Leaky", "Norse LIFCell", "SpikingJelly LIFNode"]
    assert all(float(r.split("|")[2]) > 0 and float(r.split("|")[6]) > 0 for r in rows)    # transform, compile
