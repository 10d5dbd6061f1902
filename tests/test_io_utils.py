"""ssr_jax/io_utils.py: the atomic file write."""

import os

import pytest

from ssr_jax import io_utils


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with io_utils.atomic_write(path, "w", encoding="utf-8") as f:
        f.write("new")
        assert path.read_text() == "old"  # not visible before the rename
    assert path.read_text() == "new"
    assert os.listdir(tmp_path) == ["a.txt"]
    with io_utils.atomic_write(str(tmp_path / "b.bin")) as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"


def test_atomic_write_failure_keeps_old_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with io_utils.atomic_write(path, "w", suffix=".tmp.txt") as f:
            f.write("half")
            assert any(n.endswith(".tmp.txt") for n in os.listdir(tmp_path))
            raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]
    with pytest.raises(ValueError, match="use 'w' or 'wb'"):
        with io_utils.atomic_write(path, "a"):
            pass
