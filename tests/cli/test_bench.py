"""``ratebp bench``: the table, the JSON record and the PNG plot."""
import json

import pytest

from ratebp_compile.cli import main


def _bench(capsys, out, *options):
    """``ratebp bench`` on a tiny conv net on the CPU, writing ``out``: its stdout."""
    pytest.importorskip("matplotlib")
    code = main(["bench", "--model", "convnet", "--width", "4", "--batch-size", "4", "--input-size", "8",
                 "--channels", "1", "--steps", "1", "--device", "cpu", "--out", str(out), *options])
    stdout = capsys.readouterr().out
    assert code == 0
    return stdout


def test_bench_writes_table_json_and_png(capsys, tmp_path):
    out = tmp_path / "bench.json"
    stdout = _bench(capsys, out, "--T", "2", "3", "--time-chunk", "2")
    assert "| T | bptt ms | ratebp ms | time rate/BPTT |" in stdout
    png = tmp_path / "bench.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads(out.read_text())
    assert [r["T"] for r in record["results"]] == [2, 3]
    for r in record["results"]:
        for method in ("bptt", "ratebp"):
            assert r[method]["ms"] > 0 and r[method]["peak_MiB"] > 0 and r[method]["saved_MiB"] > 0
    assert record["config"]["model"] == "convnet"


def test_bench_compares_memory_budgets(capsys, tmp_path):
    """Several budgets: one rate-based variant each, their ratios to BPTT, and how each ran its spike pass."""
    out = tmp_path / "bench.json"
    stdout = _bench(capsys, out, "--T", "4", "--memory-budget", "none", "76k")
    assert "| T | bptt ms | ratebp@none ms | ratebp@76k ms | time ratebp@none/BPTT | time ratebp@76k/BPTT |" in stdout
    (r,) = json.loads(out.read_text())["results"]
    assert r["ratebp@none"]["spike_pass"] == "all T steps at once (no memory budget)"
    assert r["ratebp@76k"]["spike_pass"].startswith("in chunks of at most "), r["ratebp@76k"]
    assert r["ratebp@76k"]["spike_pass"].endswith("memory budget 76 KiB)")
    assert r["ratebp@76k"]["peak_MiB"] > 0 and r["ratebp@none"]["peak_MiB"] > 0


def test_bench_bad_option_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--T", "four"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "invalid int value: 'four'" in err
