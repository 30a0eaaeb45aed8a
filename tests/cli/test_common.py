"""What the commands share: files written whole or not at all."""
import json
import os
import stat

import pytest

from ratebp_compile.cli.common import write_atomically, write_json


def test_write_json_creates_the_folder_and_replaces_the_record(tmp_path):
    path = tmp_path / "runs" / "record.json"
    write_json(str(path), {"epochs": 1})
    assert json.loads(path.read_text()) == {"epochs": 1}
    write_json(str(path), {"epochs": 2})
    assert json.loads(path.read_text()) == {"epochs": 2} and os.listdir(path.parent) == ["record.json"]
    with open(tmp_path / "plain", "w"):
        pass
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)   # as open() makes


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_a_failed_write_keeps_the_previous_file(tmp_path, error):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"previous")

    def write(f):
        f.write(b"the first half of the next one")
        raise error

    with pytest.raises(error):
        write_atomically(str(path), write)
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_record_that_cannot_be_written_keeps_the_previous_one(tmp_path):
    path = tmp_path / "record.json"
    write_json(str(path), {"epochs": 1})
    with pytest.raises(TypeError):
        write_json(str(path), {"epochs": 2, "model": object()})
    assert json.loads(path.read_text()) == {"epochs": 1} and os.listdir(tmp_path) == ["record.json"]
