import os
import stat

import pytest

from chatforge.fileio import atomic_dir, atomic_path, atomic_write_json, atomic_write_text


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_written_files_and_folders_get_umask_permissions_not_private(tmp_path):
    old = os.umask(0o022)
    try:
        f = atomic_write_text(tmp_path / "a.txt", "x")
        assert _mode(f) == 0o644  # mkstemp alone would leave 0600: unreadable for a server user
        with atomic_dir(tmp_path / "bundle") as d:
            (d / "w").write_text("w")
        assert _mode(tmp_path / "bundle") == 0o755
    finally:
        os.umask(old)


def test_atomic_dir_replaces_whole_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "b"
    with atomic_dir(target) as d:
        (d / "one").write_text("1")
    with atomic_dir(target) as d:
        (d / "two").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["two"]
    with pytest.raises(RuntimeError), atomic_dir(target) as d:
        (d / "three").write_text("3")
        raise RuntimeError("half-way")
    assert sorted(p.name for p in target.iterdir()) == ["two"]
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temp folders left


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(ValueError), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise ValueError("writer failed")
    assert target.read_text().strip().startswith("{") and '"v": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def _tree_modes(root) -> dict[str, int]:
    return {str(p.relative_to(root)): _mode(p) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)],
                         ids=["umask022", "umask077"])
def test_private_writers_inside_atomic_dir_get_the_umask_permissions(tmp_path, umask, file_mode, dir_mode):
    """safetensors writes through its own 0600 temp file and mkdtemp makes 0700 folders: after the
    rename every file and folder has what the umask gives (and a strict umask is honoured, not widened)."""
    import tempfile

    import torch
    from safetensors.torch import save_file

    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "bundle") as d:
            save_file({"w": torch.zeros(2)}, str(d / "weights.safetensors"))
            (d / "sub").mkdir()
            (d / "sub" / "a.json").write_text("{}")
            tempfile.mkdtemp(dir=d, prefix="private")
        with atomic_path(tmp_path / "last.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))
        modes = _tree_modes(tmp_path / "bundle")
    finally:
        os.umask(old)
    assert len(modes) == 5
    for rel, mode in modes.items():
        want = dir_mode if (tmp_path / "bundle" / rel).is_dir() else file_mode
        assert mode == want, f"{rel}: {oct(mode)} != {oct(want)}"
    assert _mode(tmp_path / "last.safetensors") == file_mode
