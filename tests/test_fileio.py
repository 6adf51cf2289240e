"""fastddpm.fileio: a failed atomic write leaves the old file as it was, and no temporary file behind."""
import os

import pytest

from fastddpm import fileio


def test_atomic_write_bytes_failure_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "f.bin"
    fileio.atomic_write_bytes(str(p), b"old")

    def boom(fd):
        raise OSError("fsync failed")

    monkeypatch.setattr(fileio.os, "fsync", boom)
    with pytest.raises(OSError, match="fsync failed"):
        fileio.atomic_write_bytes(str(p), b"new contents")
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]
