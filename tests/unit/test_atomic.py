"""Atomic writes: complete files only, with ordinary permissions."""

import os
import stat

import pytest

from medseg.atomic import write_atomic, write_text_atomic


def test_written_files_get_ordinary_permissions_not_owner_only(tmp_path):
    old = os.umask(0o022)
    try:
        import importlib

        import medseg.atomic

        importlib.reload(medseg.atomic)
        path = medseg.atomic.write_text_atomic(tmp_path / "report.html", "<html></html>")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_failing_writer_leaves_neither_output_nor_temporary_file(tmp_path):
    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(tmp_path / "out.csv", broken)
    assert list(tmp_path.iterdir()) == []


def test_existing_file_is_replaced_whole(tmp_path):
    write_text_atomic(tmp_path / "a.txt", "old")
    write_text_atomic(tmp_path / "a.txt", "new")
    assert (tmp_path / "a.txt").read_text() == "new" and len(list(tmp_path.iterdir())) == 1
