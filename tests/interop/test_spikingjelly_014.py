"""SpikingJelly 0.0.0.0.14 (``clock_driven``, the API of the rate-based paper's code), in a subprocess with
that release first on the path (``scripts/test.sh`` installs it into ``.venv/peers``; it cannot be
installed beside SpikingJelly 2.x): see ``spikingjelly_014_check.py``."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
RELEASE = ROOT / ".venv" / "peers" / "spikingjelly-0.0.0.0.14"


@pytest.mark.skipif(not (RELEASE / "spikingjelly" / "clock_driven").is_dir(),
                    reason="SpikingJelly 0.0.0.0.14 is not installed in .venv/peers (scripts/test.sh does it)")
def test_clock_driven_models_train_unmodified():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(RELEASE), str(ROOT)]))
    run = subprocess.run([sys.executable, str(pathlib.Path(__file__).with_name("spikingjelly_014_check.py"))],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    nets = ("multi", "single", "dropout")
    assert all(r[f"{n}_fires"] > 0.05 for n in nets), r
    for entry in ("", "_compile"):                                  # rc.transform, torch.compile(backend="ratebp")
        assert all(r[f"{n}{entry}_out"] == 0.0 for n in nets), r        # SpikingJelly's own outputs
        assert all(r[f"{n}{entry}_bptt"] < 1e-4 for n in nets), r       # and its own BPTT gradients
        assert r[f"multi{entry}_rate"] < 1e-5, r                        # rate-based: as the same net in rc.nn
