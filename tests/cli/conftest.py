"""Fixtures of the command-line tests."""
import pytest

from ratebp_compile.cli import main


@pytest.fixture
def ratebp_train(capsys):
    """``ratebp train`` with the given arguments, in this process: (exit status, stdout, stderr)."""
    def run(*argv):
        code = main(["train", *argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
