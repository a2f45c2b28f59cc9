"""Inputs: files, folders, CSV manifests; bad entries become failed inputs, not crashes."""

from __future__ import annotations

from pathlib import Path

import pytest

from gsd_wsi.errors import ConfigError
from gsd_wsi.manifest import collect_inputs


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_files_folders_and_manifest(tmp_path: Path) -> None:
    a = _touch(tmp_path / "in" / "a.svs")
    _touch(tmp_path / "in" / "b.ndpi")
    _touch(tmp_path / "in" / "notes.txt")
    _touch(tmp_path / "m" / "c.tif")
    manifest = tmp_path / "m" / "list.csv"
    manifest.write_text("path,slide_id,mpp\nc.tif,case-c,0.25\n")
    inputs = collect_inputs([a.parent, manifest], slide_mpp=0.5)
    assert [i.slide_id for i in inputs] == ["a", "b", "case-c"]
    assert [i.mpp for i in inputs] == [0.5, 0.5, 0.25]
    assert inputs[2].path == tmp_path / "m" / "c.tif"
    assert all(i.error is None for i in inputs)


def test_missing_duplicate_and_unsafe(tmp_path: Path) -> None:
    x1 = _touch(tmp_path / "one" / "x.svs")
    x2 = _touch(tmp_path / "two" / "x.svs")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,slide_id\none/x.svs,../escape\n")
    inputs = collect_inputs([x1, x2, tmp_path / "gone.svs", manifest])
    errors = [i.error or "" for i in inputs]
    assert "shared by" in errors[0] and "shared by" in errors[1]
    assert "no such file" in errors[2]
    assert "may only use" in errors[3]


def test_manifest_needs_path_column(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("file\na.svs\n")
    with pytest.raises(ConfigError, match="'path' column"):
        collect_inputs([manifest])
