import os
import stat

import pytest

from meduet.io.atomic import atomic_path, write_json, write_text


def test_atomic_write_replaces_whole_file_with_normal_permissions(tmp_path):
    target = write_text(tmp_path / "sub" / "a.txt", "new")
    assert target.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    write_json(target, {"b": 1, "a": [1, 2]})
    assert target.read_text().startswith('{\n  "a"')  # sorted keys: stable bytes for DVC


def test_failed_write_leaves_target_and_no_temp_file(tmp_path):
    target = tmp_path / "x.nii.gz"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.name.endswith(".nii.gz")  # writers pick the format from the suffix
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]
