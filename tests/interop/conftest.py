"""Shared fixtures of the interoperability tests.

SpikingJelly: ``require_spikingjelly()`` skips a test (or, at module level, a whole module) unless
SpikingJelly 2.x (``spikingjelly.activation_based``) is importable; the ``spikingjelly`` fixture does the
same and returns the package. SpikingJelly's model zoo (``activation_based.model.spiking_resnet``,
``sew_resnet``, ``spiking_vgg``) imports ``load_state_dict_from_url`` from torchvision at import time;
the ``torchvision_stub`` fixture provides it, when torchvision is not installed, with stand-in modules
present only while the fixture is active (``tests.interop.spikingjelly_harness.torchvision_stub``, which
the harness's zoo builders also use around their imports), so no other test sees a fake torchvision.
"""
from __future__ import annotations

import importlib
import importlib.metadata

import pytest


def require_spikingjelly(min_major: int = 2):
    """The ``spikingjelly`` package, or ``pytest.skip`` (``allow_module_level``) when it is missing, too
    old (the 0.0.0.0.x ``clock_driven`` API has no ``activation_based.neuron.BaseNode``) or broken."""
    try:
        sj = importlib.import_module("spikingjelly")
        importlib.import_module("spikingjelly.activation_based.neuron")
    except Exception as e:  # ImportError, or a missing dependency of SpikingJelly's own
        pytest.skip(f"SpikingJelly is not importable: {type(e).__name__}: {e}", allow_module_level=True)
    try:
        version = importlib.metadata.version("spikingjelly")
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
    if major < min_major:
        pytest.skip(f"SpikingJelly {version} is installed; these tests need {min_major}.x",
                    allow_module_level=True)
    return sj


@pytest.fixture(scope="session")
def spikingjelly():
    return require_spikingjelly()


@pytest.fixture
def torchvision_stub():
    """``torchvision`` importable (a stub offering only ``load_state_dict_from_url``) while active."""
    from tests.interop.spikingjelly_harness import torchvision_stub as stub

    with stub():
        yield
