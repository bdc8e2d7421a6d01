"""The write-then-rename helpers every output goes through: a file or a folder appears
whole or not at all, and an existing one is refused when asked."""

from __future__ import annotations

import os

import pytest

from llmarch_compose.artifacts.atomic import atomic_folder, atomic_path, write_atomic


def test_a_folder_appears_whole_and_replaces_the_earlier_one(tmp_path):
    out = tmp_path / "out"
    for text in ("first", "second"):
        with atomic_folder(out) as tmp:
            (tmp / "a.txt").write_text(text)
            assert not (out / "a.txt").exists() or (out / "a.txt").read_text() != text
    assert (out / "a.txt").read_text() == "second"
    assert sorted(os.listdir(tmp_path)) == ["out"], "temporary folders left behind"


def test_a_failed_folder_leaves_the_earlier_one_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    with atomic_folder(out) as tmp:
        (tmp / "a.txt").write_text("kept")
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert (out / "a.txt").read_text() == "kept"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_refusing_an_existing_destination(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FileExistsError):
        with atomic_folder(out, overwrite=False):
            pass
    with pytest.raises(FileExistsError):  # one that appears while the folder is written
        with atomic_folder(tmp_path / "late", overwrite=False) as tmp:
            (tmp / "a.txt").write_text("x")
            (tmp_path / "late").mkdir()
    assert os.listdir(tmp_path / "late") == []
    with pytest.raises(FileExistsError):
        with atomic_path(out, overwrite=False):
            pass
    assert sorted(os.listdir(tmp_path)) == ["late", "out"]


def test_a_file_is_written_whole(tmp_path):
    write_atomic(tmp_path / "a" / "b.json", "{}")
    assert (tmp_path / "a" / "b.json").read_text() == "{}"
    with pytest.raises(ValueError):
        with atomic_path(tmp_path / "a" / "b.json") as tmp:
            tmp.write_text("half")
            raise ValueError
    assert (tmp_path / "a" / "b.json").read_text() == "{}"
    assert os.listdir(tmp_path / "a") == ["b.json"]
