"""Gather what ``benchmarks/gpu_check.sh`` left in its folder into one JSON, ``gpu_check.json``, and print a summary.

    python benchmarks/gpu_check_report.py gpu-check/
"""
from __future__ import annotations

import json
import platform
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {"missing": f"{path.name}: {e}"}


def tests(path: Path) -> dict:
    """Counts and the failing tests' names and messages from pytest's JUnit XML."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        return {"missing": f"{path.name}: {e}"}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in suite.iter("testcase"):
        for tag in ("failure", "error"):
            bad = case.find(tag)
            if bad is not None:
                failed.append({"test": f"{case.get('classname')}::{case.get('name')}",
                               "message": (bad.get("message") or "")[:500]})
    return {**counts, "seconds": float(suite.get("time", 0)), "failed": failed}


def environment() -> dict:
    env = {"python": platform.python_version()}
    try:
        import torch
        env.update(torch=torch.__version__, cuda=torch.version.cuda,
                   device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
        import triton
        env["triton"] = triton.__version__
    except ImportError as e:
        env["import_error"] = str(e)
    return env


def main(folder: str) -> None:
    out = Path(folder)
    report = {"environment": environment(),
              "status": {p.stem: _json(p) for p in sorted(out.glob("*.status"))},
              "tests": {p.stem: tests(p) for p in sorted(out.glob("*tests.xml"))},
              "step": _json(out / "step.json"),
              "kernels": _json(out / "kernels.json")}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print(f"environment: {report['environment']}")
    print(f"status: {report['status']}")
    for name, t in report["tests"].items():
        if "missing" in t:
            print(f"{name}: {t['missing']}")
            continue
        print(f"{name}: {t['tests']} run, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped")
        for f in t["failed"]:
            print(f"  FAILED {f['test']}: {f['message'][:200]}")
    print(f"wrote {out / 'gpu_check.json'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu-check")
